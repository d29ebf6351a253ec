"""The Hugging Face Hub download protocol, so unmodified ``huggingface_hub`` reads the registry.

A Hub revision is a version number, an alias, a 40-hex revision id or ``main`` (latest ready).
Every version has a 40-hex revision id, which the client treats as an immutable commit and
caches; numbers and aliases are exposed as tags, ``main`` as the only branch. Every file is
described as an LFS file whose oid is its sha256, which also names it in the client's cache.
Errors carry the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``) on top of Quiver's JSON error body.
"""

from __future__ import annotations

import hashlib
from datetime import UTC
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlmodel import col, select

from quiver.errors import InvalidReference, NotFound, QuiverError, RepoNotFound
from quiver.refs import REVISION_RE, AdapterRef, parse_repo
from quiver.registry import crud
from quiver.registry.api_blobs import blob_response
from quiver.registry.deps import Reader, RegistryDep
from quiver.registry.models import Alias, Version
from quiver.wire import VersionInfo

__all__ = ["router", "hub_ref"]

router = APIRouter(tags=["huggingface"])


def hub_ref(repo: str, revision: str | None) -> AdapterRef:
    """The Quiver reference a Hub ``revision`` of ``repo`` stands for."""
    rev = unquote(revision or "main")
    if rev in ("main", "latest", "refs/heads/main"):
        return AdapterRef(repo)
    rev = rev.removeprefix("refs/tags/")
    if rev.isdigit() and int(rev) >= 1:
        return AdapterRef(repo, version=int(rev))
    if REVISION_RE.match(rev):
        return AdapterRef(repo, revision=rev)
    crud.check_alias_name(rev)
    return AdapterRef(repo, alias=rev)


def _hub_error(exc: QuiverError, code: str, commit: str | None = None) -> JSONResponse:
    headers = {"X-Error-Code": code, "X-Error-Message": exc.message}
    if commit:
        headers["X-Repo-Commit"] = commit
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)


async def _resolve(reg, repo: str, revision: str | None) -> VersionInfo | JSONResponse:
    try:
        parse_repo(repo)
    except InvalidReference as exc:
        return _hub_error(RepoNotFound(exc.message, details=exc.details), "RepoNotFound")
    try:
        ref = hub_ref(repo, revision)
    except QuiverError as exc:
        return _hub_error(NotFound(exc.message, details=exc.details), "RevisionNotFound")

    def load(session) -> VersionInfo:
        r, v = crud.resolve(session, ref=ref)
        return crud.version_infos(session, [v], {r.id: r.name})[0]

    try:
        return await reg.db.run(load)
    except RepoNotFound as exc:
        return _hub_error(exc, "RepoNotFound")
    except NotFound as exc:
        return _hub_error(exc, "RevisionNotFound")


def _pointer(sha256: str, size: int) -> tuple[str, int]:
    """The git oid and size of the LFS pointer file standing for a blob."""
    text = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()
    oid = hashlib.sha1(b"blob %d\0" % len(text) + text, usedforsecurity=False).hexdigest()
    return oid, len(text)


def _tree_entry(path: str, sha256: str, size: int) -> dict[str, Any]:
    oid, pointer_size = _pointer(sha256, size)
    return {"type": "file", "path": path, "size": size, "oid": oid,
            "lfs": {"oid": sha256, "size": size, "pointerSize": pointer_size}}


def _model_info(info: VersionInfo) -> dict[str, Any]:
    created = info.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z") \
        if info.created_at else None
    siblings = []
    for f in info.files:
        oid, pointer_size = _pointer(f.sha256, f.size)
        siblings.append({"rfilename": f.path, "size": f.size, "blobId": oid,
                         "lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": pointer_size}})
    tags = ["peft", "lora", f"base_model:adapter:{info.base_model}", f"quiver:{info.ref}"]
    return {"_id": info.revision, "id": info.repo, "modelId": info.repo, "sha": info.revision,
            "author": info.repo.split("/")[0] if "/" in info.repo else None,
            "lastModified": created, "createdAt": created, "private": False, "gated": False,
            "disabled": False, "downloads": 0, "likes": 0, "library_name": "peft",
            "pipeline_tag": "text-generation", "tags": tags,
            "cardData": {"base_model": info.base_model, "library_name": "peft"},
            "siblings": siblings, "usedStorage": info.size_bytes}


@router.get("/api/models/{repo:path}/revision/{revision}")
async def model_info_at(repo: str, revision: str, reg: RegistryDep, _: Reader) -> Response:
    info = await _resolve(reg, repo, revision)
    return info if isinstance(info, Response) else JSONResponse(_model_info(info))


@router.get("/api/models/{repo:path}/tree/{revision}/{path:path}")
@router.get("/api/models/{repo:path}/tree/{revision}")
async def tree(repo: str, revision: str, reg: RegistryDep, _: Reader, path: str = "",
               recursive: str = "false") -> Response:
    info = await _resolve(reg, repo, revision)
    if isinstance(info, Response):
        return info
    prefix = path.strip("/")
    deep = recursive.lower() in ("true", "1")
    entries: list[dict[str, Any]] = []
    folders: dict[str, int] = {}
    for f in info.files:
        if prefix and not f.path.startswith(prefix + "/"):
            continue
        rest = f.path[len(prefix) + 1:] if prefix else f.path
        if "/" in rest and not deep:
            folder = (prefix + "/" if prefix else "") + rest.split("/")[0]
            folders[folder] = folders.get(folder, 0) + f.size
            continue
        if deep:
            parts = f.path.split("/")[:-1]
            for i in range(len(prefix.split("/")) if prefix else 0, len(parts)):
                folder = "/".join(parts[: i + 1])
                folders.setdefault(folder, 0)
        entries.append(_tree_entry(f.path, f.sha256, f.size))
    if prefix and not entries and not folders:
        return _hub_error(NotFound(f"no folder {prefix!r} in {info.ref}"), "EntryNotFound",
                          info.revision)
    dirs = [{"type": "directory", "path": p, "size": 0,
             "oid": hashlib.sha1(p.encode(), usedforsecurity=False).hexdigest()}
            for p in sorted(folders)]
    return JSONResponse(dirs + entries)


@router.get("/api/models/{repo:path}/refs")
async def refs(repo: str, reg: RegistryDep, _: Reader) -> Response:
    try:
        parse_repo(repo)
    except InvalidReference as exc:
        return _hub_error(RepoNotFound(exc.message), "RepoNotFound")

    def load(session) -> dict[str, Any]:
        r = crud.get_repo(session, name=repo)
        versions = list(session.exec(
            select(Version.number, Version.revision)
            .where(Version.repo_id == r.id, col(Version.status).in_(crud.VISIBLE))
            .order_by(Version.number)))
        by_number = dict(versions)
        aliases = session.exec(select(Alias.name, Version.revision)
                               .join(Version, Version.id == Alias.version_id)
                               .where(Alias.repo_id == r.id).order_by(Alias.name))
        branches = []
        if r.latest_version is not None and r.latest_version in by_number:
            branches.append({"name": "main", "ref": "refs/heads/main",
                             "targetCommit": by_number[r.latest_version]})
        tags = [{"name": str(n), "ref": f"refs/tags/{n}", "targetCommit": rev}
                for n, rev in versions]
        tags += [{"name": a, "ref": f"refs/tags/{a}", "targetCommit": rev} for a, rev in aliases]
        return {"branches": branches, "converts": [], "tags": tags, "pullRequests": []}

    try:
        return JSONResponse(await reg.db.run(load))
    except RepoNotFound as exc:
        return _hub_error(exc, "RepoNotFound")


@router.get("/api/models/{repo:path}")
async def model_info(repo: str, reg: RegistryDep, _: Reader) -> Response:
    info = await _resolve(reg, repo, None)
    return info if isinstance(info, Response) else JSONResponse(_model_info(info))


@router.api_route("/{repo:path}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
async def resolve_file(repo: str, revision: str, path: str, request: Request, reg: RegistryDep,
                       _: Reader) -> Response:
    info = await _resolve(reg, repo, revision)
    if isinstance(info, Response):
        return info
    entry = next((f for f in info.files if f.path == path), None)
    if entry is None:
        return _hub_error(NotFound(f"no file {path!r} in {info.ref}", details={"path": path}),
                          "EntryNotFound", info.revision)
    headers = {"X-Repo-Commit": info.revision, "X-Linked-Etag": f'"{entry.sha256}"',
               "X-Linked-Size": str(entry.size)}
    return await blob_response(reg, request, entry.sha256, entry.size, headers)
