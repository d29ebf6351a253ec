"""Pushing: one multipart request for small adapters, manifest-first resumable uploads for large.

Bytes stream from the socket to the blob store (the one-request form spools to a temporary file
first, so its headers are checked before anything is stored). A push becomes a version only in
its last step; until then nothing of it is visible, and an interrupted upload resumes with the
parts the store already holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import ValidationError
from sqlmodel import Session, col, select
from starlette.datastructures import UploadFile
from starlette.types import Message

from quiver.errors import (Conflict, InvalidRequest, PayloadTooLarge, QuiverError, UploadNotFound)
from quiver.refs import parse_repo
from quiver.registry import crud, pipeline
from quiver.registry.auth import Principal
from quiver.registry.deps import RegistryDep, Writer
from quiver.registry.models import (Blob, HashDeclaration, ManifestFile, PushMetadata, Upload,
                                    UploadCreate, Version)
from quiver.registry.state import Registry
from quiver.registry.storage.base import CHUNK_SIZE, PartAssembler, check_sha256
from quiver.registry.safetensors_check import header_length, parse_safetensors_header
from quiver.registry.validation import FileSource, check_manifest, inspect_adapter
from quiver.wire import VersionInfo

__all__ = ["router"]

router = APIRouter(tags=["push"])
_T = TypeVar("_T")


def _validation_error(exc: ValidationError, what: str) -> InvalidRequest:
    return InvalidRequest(f"invalid {what}", details=[{"loc": list(e["loc"]), "msg": e["msg"]}
                                                      for e in exc.errors()])


# --- one request -------------------------------------------------------------------------------

async def _hash_upload(upload: UploadFile) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    await upload.seek(0)
    while chunk := await upload.read(CHUNK_SIZE):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _upload_source(path: str, size: int, upload: UploadFile) -> FileSource:
    async def read_prefix(n: int) -> bytes:
        await upload.seek(0)
        return await upload.read(n)

    return FileSource(path=path, size=size, read_prefix=read_prefix)


async def _upload_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    await upload.seek(0)
    while chunk := await upload.read(CHUNK_SIZE):
        yield chunk


@router.post("/api/v1/repos/{repo:path}/-/push", status_code=201, response_model=VersionInfo)
async def push(repo: str, request: Request, reg: RegistryDep, principal: Writer) -> VersionInfo:
    """Push a small adapter in one ``multipart/form-data`` request."""
    settings = reg.settings
    parse_repo(repo)
    principal.require_write(repo)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_single_push_bytes:
        raise PayloadTooLarge(
            f"one-request pushes are limited to {settings.max_single_push_bytes} bytes; use the "
            "manifest-first upload", details={"limit": settings.max_single_push_bytes})
    form = await _capped(request, settings.max_single_push_bytes).form(
        max_files=1000, max_fields=20, max_part_size=settings.max_json_bytes)
    try:
        raw = form.get("metadata")
        if not isinstance(raw, str):
            raise InvalidRequest("the form needs a 'metadata' field holding PushMetadata JSON")
        try:
            meta = PushMetadata.model_validate_json(raw)
        except ValidationError as exc:
            raise _validation_error(exc, "metadata") from None
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not uploads:
            raise InvalidRequest("the push holds no files")
        files, sources, by_path = [], {}, {}
        for upload in uploads:
            path = upload.filename or ""
            sha, size = await _hash_upload(upload)
            try:
                files.append(ManifestFile(path=path, size=size, sha256=sha))
            except ValidationError as exc:
                raise _validation_error(exc, f"file {path!r}") from None
            by_path[path] = upload
        normal = check_manifest(meta, files, max_file_bytes=settings.max_file_bytes,
                                max_push_bytes=settings.max_single_push_bytes)
        by_path = {n.path: by_path[f.path] for n, f in zip(normal, files, strict=True)}
        files = normal
        ctx = await pipeline.prepare_push(reg, repo=repo, meta=meta, principal=principal)
        for f in files:
            sources[f.path] = _upload_source(f.path, f.size, by_path[f.path])
        facts = await inspect_adapter(meta, sources, ctx.base,
                                      max_json_bytes=settings.max_json_bytes)
        # An open upload row shields the new blobs from collection until the version exists.
        upload = _new_upload(reg, uuid.uuid4().hex, repo, meta,
                             [f.model_dump() for f in files], principal.name)
        await _insert_upload(reg, upload)
        try:
            for f in files:
                await _store_blob(reg, f, _upload_chunks(by_path[f.path]))
            info = await pipeline.publish(reg, ctx=ctx, meta=meta, files=files, facts=facts,
                                          principal=principal, upload_id=upload.id)
        except BaseException:
            await asyncio.shield(_mark(reg, upload.id, "aborted", None))
            raise
        return info
    finally:
        await form.close()


def _capped(request: Request, limit: int) -> Request:
    """The same request, refusing its body once more than ``limit`` bytes arrived (chunked
    uploads carry no Content-Length to check up front)."""
    seen = 0

    async def receive() -> Message:
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise PayloadTooLarge(f"one-request pushes are limited to {limit} bytes; use the "
                                  "manifest-first upload", details={"limit": limit})
        return message

    return Request(request.scope, receive)


async def _store_blob(reg: Registry, f: ManifestFile, chunks: AsyncIterator[bytes]) -> None:
    have = await reg.db.run(lambda s: s.get(Blob, f.sha256) is not None)
    if not have or not await reg.store.exists(f.sha256):
        await reg.store.put_stream(chunks, expected_sha256=f.sha256, expected_size=f.size)
    await reg.db.run(lambda s: crud.record_blob(s, sha256=f.sha256, size=f.size))


# --- manifest first ----------------------------------------------------------------------------

# A file listed without its sha256 is staged under a key of its own (``_staging_key``, kept in
# its entry's "sha256" with "staged": true) until the client declares the hash ("declared").
# Its parts travel under that key; completing verifies them against the declared hash.

def _staging_key(upload_id: str, path: str) -> str:
    return hashlib.sha256(f"quiver-staged\0{upload_id}\0{path}".encode()).hexdigest()


def _files(upload: Upload) -> list[ManifestFile]:
    """The upload's files by their content hashes; Conflict while a hash is undeclared."""
    undeclared = [f["path"] for f in upload.files if f.get("staged") and not f.get("declared")]
    if undeclared:
        raise Conflict(f"upload {upload.id} has files whose sha256 was never declared",
                       details={"upload_id": upload.id, "undeclared": undeclared})
    return [ManifestFile(path=f["path"], size=f["size"],
                         sha256=f["declared"] if f.get("staged") else f["sha256"])
            for f in upload.files]


def _staged(upload: Upload) -> dict[str, str]:
    """Declared sha256 -> the key its parts were sent under."""
    return {f["declared"]: f["sha256"] for f in upload.files
            if f.get("staged") and f.get("declared")}


def _blob_sizes(upload: Upload) -> dict[str, int]:
    """Sizes by the key parts are sent under (a staging key for a file listed without hash)."""
    return {f["sha256"]: f["size"] for f in upload.files}


def _wanted_in(session: Session, upload: Upload) -> list[str]:
    """The keys whose parts the registry still needs: blobs it lacks, and staged files unless
    their declared blob is already stored."""
    known = list(dict.fromkeys(f["sha256"] for f in upload.files if not f.get("staged")))
    lacking = set(_missing_in(session, known + list(_staged(upload))))
    return [sha for sha in known if sha in lacking] + [
        f["sha256"] for f in upload.files
        if f.get("staged") and (not f["declared"] or f["declared"] in lacking)]


async def _wanted(reg: Registry, upload: Upload) -> list[str]:
    return await reg.db.run(lambda session: _wanted_in(session, upload))


def _part_count(size: int, part_size: int) -> int:
    return max(1, math.ceil(size / part_size))


def _new_upload(reg: Registry, upload_id: str, repo: str, meta: PushMetadata,
                files: list[dict[str, Any]], pushed_by: str) -> Upload:
    return Upload(id=upload_id, repo=repo, meta=meta.model_dump(mode="json"), files=files,
                  part_size=reg.settings.part_size, pushed_by=pushed_by,
                  expires_at=datetime.now(UTC) + timedelta(seconds=reg.settings.upload_ttl_s))


async def _insert_upload(reg: Registry, upload: Upload,
                         then: Callable[[Session], _T] = lambda session: None) -> _T:
    """Store ``upload``; returns what ``then`` answers in the same trip to the database."""
    def insert(session: Session) -> _T:
        session.add(upload)
        session.commit()
        return then(session)

    return await reg.db.run(insert)


def _missing_in(session: Session, shas: list[str]) -> list[str]:
    """The hashes of ``shas`` that name no stored blob."""
    have = set(session.exec(select(Blob.sha256).where(col(Blob.sha256).in_(shas))))
    return [s for s in shas if s not in have]


async def _load_upload(reg: Registry, upload_id: str) -> Upload:
    upload = await reg.db.run(lambda s: s.get(Upload, upload_id))
    if upload is None:
        raise UploadNotFound(f"no upload {upload_id!r}", details={"upload_id": upload_id})
    return upload


def _require_open(upload: Upload) -> None:
    expires = upload.expires_at.replace(tzinfo=UTC) if upload.expires_at.tzinfo is None \
        else upload.expires_at
    if upload.state != "open" or expires < datetime.now(UTC):
        state = upload.state if upload.state != "open" else "expired"
        raise Conflict(f"upload {upload.id} is {state}",
                       details={"upload_id": upload.id, "state": state})


@router.post("/api/v1/repos/{repo:path}/-/uploads", status_code=201)
async def create_upload(repo: str, body: UploadCreate, reg: RegistryDep,
                        principal: Writer) -> dict[str, Any]:
    """Start a push from its manifest; answers which blobs the registry lacks, and the key to
    send each file listed without a sha256 under (``deferred``)."""
    settings = reg.settings
    files = check_manifest(body.metadata, body.files, max_file_bytes=settings.max_file_bytes,
                           max_push_bytes=settings.max_push_bytes)
    await pipeline.prepare_push(reg, repo=repo, meta=body.metadata, principal=principal)
    sizes: dict[str, int] = {}
    for f in files:
        if f.sha256 is not None and sizes.setdefault(f.sha256, f.size) != f.size:
            raise InvalidRequest(f"sha256 {f.sha256} is listed with two sizes",
                                 details={"sha256": f.sha256})
    upload_id = uuid.uuid4().hex
    entries: list[dict[str, Any]] = []
    deferred: dict[str, str] = {}
    for f in files:
        if f.sha256 is None:
            deferred[f.path] = _staging_key(upload_id, f.path)
            entries.append({"path": f.path, "size": f.size, "sha256": deferred[f.path],
                            "staged": True, "declared": None})
        else:
            entries.append({"path": f.path, "size": f.size, "sha256": f.sha256})
    upload = _new_upload(reg, upload_id, repo, body.metadata, entries, principal.name)
    missing = await _insert_upload(reg, upload, lambda session: _wanted_in(session, upload))
    return {"upload_id": upload.id, "missing": missing, "deferred": deferred,
            "part_size": upload.part_size, "expires_at": upload.expires_at.isoformat()}


@router.post("/api/v1/uploads/{upload_id}/declare")
async def declare_hashes(upload_id: str, body: HashDeclaration, reg: RegistryDep,
                         principal: Writer) -> dict[str, Any]:
    """Record the sha256 of files listed without one; answers which of them the registry
    already holds: their parts need not be sent (any already sent are dropped on commit)."""
    def declare(session: Session) -> list[str]:
        upload = session.get(Upload, upload_id)
        if upload is None:
            raise UploadNotFound(f"no upload {upload_id!r}", details={"upload_id": upload_id})
        principal.require_write(upload.repo)
        _require_open(upload)
        staged = {f["path"]: f for f in upload.files if f.get("staged")}
        unknown = sorted(p for p in body.files if p not in staged)
        if unknown:
            raise InvalidRequest(f"upload {upload_id} lists no file awaiting a hash at "
                                 f"{', '.join(map(repr, unknown))}",
                                 details={"upload_id": upload_id, "paths": unknown})
        upload.files = [dict(f, declared=body.files[f["path"]]) if f["path"] in body.files
                        else f for f in upload.files]
        session.add(upload)
        session.commit()
        return _missing_in(session, list(set(body.files.values())))

    async with reg.commit_lock(upload_id):
        lacking = set(await reg.db.run(declare))
    return {"present": sorted(p for p, sha in body.files.items() if sha not in lacking)}


async def _counted(stream: AsyncIterator[bytes], expected: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > expected:
            raise PayloadTooLarge(f"the part holds more than the expected {expected} bytes",
                                  details={"expected": expected})
        yield chunk
    if seen != expected:
        raise InvalidRequest(f"the part holds {seen} bytes; expected {expected}",
                             details={"expected": expected, "received": seen})


@router.put("/api/v1/uploads/{upload_id}/blobs/{sha256}/parts/{part}")
async def put_part(upload_id: str, sha256: str, part: int, request: Request, reg: RegistryDep,
                   principal: Writer) -> dict[str, Any]:
    """Receive part ``part`` (0-based) of one blob; sending it again replaces it."""
    check_sha256(sha256)
    upload = await _load_upload(reg, upload_id)
    principal.require_write(upload.repo)
    _require_open(upload)
    size = _blob_sizes(upload).get(sha256)
    if size is None:
        raise InvalidRequest(f"blob {sha256} is not part of upload {upload_id}",
                             details={"sha256": sha256})
    count = _part_count(size, upload.part_size)
    if not 0 <= part < count:
        raise InvalidRequest(f"part {part} out of range: this blob has {count} part(s)",
                             details={"part": part, "part_count": count})
    expected = min(upload.part_size, size - part * upload.part_size) if size else 0
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) != expected:
        raise InvalidRequest(f"part {part} must hold {expected} bytes, not {length}",
                             details={"part": part, "expected": expected, "received": int(length)})
    weights = [f["path"] for f in upload.files
               if f["sha256"] == sha256 and f["path"].endswith(".safetensors")]
    head = _HeaderTap() if part == 0 and weights else None
    stream = _counted(request.stream(), expected)
    body = head.tap(stream) if head else stream
    if isinstance(reg.store, PartAssembler):    # in place: completing then copies nothing
        await reg.store.put_part_at(upload_id, sha256, part, body, part_size=upload.part_size,
                                    blob_size=size)
    else:
        await reg.store.put_part(upload_id, sha256, part, body)
    if head is not None and head.complete:
        try:   # refuse a bad header now, not after every part has been sent
            parse_safetensors_header(bytes(head.data), size, file_name=weights[0])
        except QuiverError:
            await reg.store.abort_parts(upload_id, sha256)
            raise
    return {"received": await reg.store.list_parts(upload_id, sha256)}


class _HeaderTap:
    """Keeps the first ``8 + N`` bytes (a safetensors header) of a stream passing through."""

    LIMIT = 16 * 1024 * 1024

    def __init__(self) -> None:
        self.data = bytearray()
        self.want: int | None = None
        self.done = False

    @property
    def complete(self) -> bool:
        return self.want is not None and len(self.data) >= self.want

    async def tap(self, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in stream:
            if not self.done:
                self.data += chunk
                if self.want is None and len(self.data) >= 8:
                    n = header_length(bytes(self.data[:8]))
                    if n > self.LIMIT:          # too big to hold here: checked at commit
                        self.data, self.done = bytearray(), True
                    else:
                        self.want = 8 + n
                if self.want is not None and len(self.data) >= self.want:
                    del self.data[self.want:]
                    self.done = True
            yield chunk


@router.get("/api/v1/uploads/{upload_id}")
async def get_upload(upload_id: str, reg: RegistryDep, principal: Writer) -> dict[str, Any]:
    """What an upload still lacks, to resume it."""
    upload = await _load_upload(reg, upload_id)
    principal.require_write(upload.repo)
    missing = await _wanted(reg, upload) if upload.state == "open" else []
    received = {sha: await reg.store.list_parts(upload_id, sha) for sha in missing}
    staged = [f for f in upload.files if f.get("staged")]
    out: dict[str, Any] = {"upload_id": upload.id, "repo": upload.repo, "state": upload.state,
                           "missing": missing, "received": received,
                           "deferred": {f["path"]: f["sha256"] for f in staged},
                           "declared": {f["path"]: f["declared"] for f in staged
                                        if f.get("declared")},
                           "part_size": upload.part_size,
                           "expires_at": upload.expires_at.isoformat()}
    if upload.version_id is not None:
        info = await pipeline.version_info(reg, upload.version_id)
        out["version"] = info.ref
    return out


@router.post("/api/v1/uploads/{upload_id}/commit", status_code=201, response_model=VersionInfo)
async def commit_upload(upload_id: str, reg: RegistryDep, principal: Writer) -> VersionInfo:
    """Assemble and verify every blob, validate the adapter, publish the next version."""
    async with reg.commit_lock(upload_id):
        return await _commit(reg, upload_id, principal)


async def _commit(reg: Registry, upload_id: str, principal: Principal) -> VersionInfo:
    def load(session: Session) -> tuple[Upload, Version | None, list[str]]:
        """The upload (raising unless the caller may commit it), a version it left pending,
        and which of its blobs are not stored yet."""
        upload = session.get(Upload, upload_id)
        if upload is None:
            raise UploadNotFound(f"no upload {upload_id!r}", details={"upload_id": upload_id})
        principal.require_write(upload.repo)
        if upload.version_id is not None:
            return upload, None, []
        pending = session.exec(select(Version).where(
            Version.upload_id == upload_id, Version.status == "pending")).first()
        if pending is not None:
            return upload, pending, []
        _require_open(upload)
        shas = list(dict.fromkeys(f.sha256 for f in _files(upload)))
        return upload, None, _missing_in(session, shas)

    upload, pending, missing = await reg.db.run(load)
    meta = PushMetadata.model_validate(upload.meta)
    if upload.version_id is not None:            # committed before, answered again
        return await pipeline.version_info(reg, upload.version_id)
    if pending is not None:                      # interrupted between number and publish
        info = await pipeline.finish(reg, version_id=pending.id, aliases=meta.aliases)
        await _mark(reg, upload_id, "committed", pending.id)
        return info
    files = _files(upload)
    sizes = {f.sha256: f.size for f in files}
    staged = _staged(upload)
    incomplete: dict[str, list[int]] = {}
    for sha in missing:
        key = staged.get(sha, sha)
        have = set(await reg.store.list_parts(upload_id, key))
        lacking = [k for k in range(_part_count(sizes[sha], upload.part_size)) if k not in have]
        if lacking:
            incomplete[key] = lacking
    if incomplete:
        raise Conflict(f"upload {upload_id} lacks parts of {len(incomplete)} blob(s)",
                       details={"missing_parts": incomplete})
    ctx = await pipeline.prepare_push(reg, repo=upload.repo, meta=meta, principal=principal)
    for sha in missing:     # a checksum mismatch drops that blob's parts: the client resends
        await reg.store.complete_parts(upload_id, sha, _part_count(sizes[sha], upload.part_size),
                                       sizes[sha], staged_as=staged.get(sha))
        await reg.db.run(lambda s, sha=sha: crud.record_blob(s, sha256=sha, size=sizes[sha]))
    sources = {f.path: _blob_source(reg, f) for f in files}
    try:
        facts = await inspect_adapter(meta, sources, ctx.base,
                                      max_json_bytes=reg.settings.max_json_bytes)
    except QuiverError as exc:
        if exc.status < 500:    # refused content: the upload is closed, its new blobs collected
            await _mark(reg, upload_id, "rejected", None)
            await pipeline.collect_blobs(reg, missing)
        raise
    info = await pipeline.publish(reg, ctx=ctx, meta=meta, files=files, facts=facts,
                                  principal=principal, upload_id=upload_id)
    await reg.store.abort_parts(upload_id)
    return info


def _blob_source(reg: Registry, f: ManifestFile) -> FileSource:
    async def read_prefix(n: int) -> bytes:
        return await reg.store.read_prefix(f.sha256, n)

    return FileSource(path=f.path, size=f.size, read_prefix=read_prefix)


async def _mark(reg: Registry, upload_id: str, state: str, version_id: int | None) -> None:
    def update(session: Session) -> None:
        row = session.get(Upload, upload_id)
        if row is not None:
            row.state = state
            row.version_id = version_id
            session.add(row)
            session.commit()

    await reg.db.run(update, write=True)
