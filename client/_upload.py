"""Pushing adapter folders: one multipart request when small, manifest first when large.

Manifest first: the client sends every file's path, size and sha256; the registry answers with
an upload id, the blobs it lacks and its part size; the client PUTs the missing parts
(``parallel`` at a time; over plain http each with ``sendfile``, see ``_rawhttp``) and commits.
A large file whose hash the cache does not remember is listed without one and sent under a key
the registry assigns while a thread hashes it; the hash is then declared, and if the registry
already holds that blob the rest of the file is not sent. The upload id is kept in the cache
under a key derived from the repository, metadata and manifest (a file sent before its hash by
its size, mtime and inode), so an interrupted push asks the registry what already arrived and
sends only the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx

from quiver.errors import (
    ChecksumMismatch, Conflict, InvalidRequest, RegistryUnavailable, UploadNotFound,
)
from quiver.http import raise_for_status
from quiver.wire import VersionInfo

from quiver.client._cache import Cache
from quiver.client._rawhttp import RawHTTP

__all__ = ["LocalFile", "collect_files", "push_multipart", "push_manifest", "upload_key"]

_ATTEMPTS = 4


@dataclass(frozen=True)
class LocalFile:
    path: str          # posix path inside the adapter folder
    local: Path
    size: int


def collect_files(folder: Path) -> list[LocalFile]:
    """Every regular file of an adapter folder, skipping hidden files and folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidRequest(f"{folder} is not a folder", details={"path": str(folder)})
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out.append(LocalFile(rel.as_posix(), p, p.stat().st_size))
    if not out:
        raise InvalidRequest(f"{folder} holds no files", details={"path": str(folder)})
    return out


def push_multipart(http: httpx.Client, repo: str, metadata: dict[str, Any],
                   files: list[LocalFile], bar=None) -> VersionInfo:
    """``POST /repos/{repo}/-/push`` with the metadata and every file in one request."""
    handles = [open(f.local, "rb") for f in files]
    try:
        parts = [("files", (f.path, fh, "application/octet-stream"))
                 for f, fh in zip(files, handles)]
        r = http.post(f"/api/v1/repos/{repo}/-/push",
                      data={"metadata": json.dumps(metadata)}, files=parts)
    finally:
        for fh in handles:
            fh.close()
    raise_for_status(r)
    if bar is not None:
        bar.update(sum(f.size for f in files))
    return VersionInfo.model_validate(r.json())


def upload_key(repo: str, metadata: dict[str, Any], manifest: list[dict[str, Any]]) -> str:
    blob = json.dumps({"repo": repo, "metadata": metadata, "files": manifest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def push_manifest(http: httpx.Client, cache: Cache, repo: str, metadata: dict[str, Any],
                  files: list[LocalFile], *, parallel: int = 4, bar=None,
                  hash_while_sending: int = 16 << 20, lean: bool = False) -> VersionInfo:
    """Manifest-first push, resuming an earlier interrupted push of the same manifest.

    ``lean`` sends parts with ``sendfile`` instead of through ``http`` (only for a plain-http
    registry reached without a proxy or a transport of the caller's: ``raw_usable``)."""
    known = {f.path: cache.known_sha256(f.local) for f in files}
    later = [f for f in files if known[f.path] is None and f.size >= hash_while_sending]
    with ThreadPoolExecutor(1, thread_name_prefix="quiver-hash") as hasher:
        hashing = {f.path: hasher.submit(cache.local_sha256, f.local) for f in later}
        for f in files:
            if known[f.path] is None and f.path not in hashing:
                known[f.path] = cache.local_sha256(f.local)
        manifest = [{"path": f.path, "size": f.size, "sha256": known[f.path]} for f in files]
        # Large files by size, inode and mtime: a resumed push finds its upload whether or not
        # the hash was remembered by then.
        keyed = [{**m, "sha256": None, "stat": _stat_key(f.local)}
                 if f.size >= hash_while_sending else m for f, m in zip(files, manifest)]
        state_path = cache.upload_state_path(upload_key(repo, metadata, keyed))
        upload = _resume(http, state_path)
        if upload is None:
            r = http.post(f"/api/v1/repos/{repo}/-/uploads",
                          json={"metadata": metadata, "files": manifest})
            raise_for_status(r)
            body = r.json()
            upload = {"upload_id": body["upload_id"], "missing": list(body.get("missing", [])),
                      "part_size": int(body["part_size"]), "received": {},
                      "deferred": dict(body.get("deferred") or {})}
            _write_json(state_path, {"upload_id": upload["upload_id"],
                                     "part_size": upload["part_size"]})
        upload_id, part_size = upload["upload_id"], max(1, int(upload["part_size"]))
        deferred: dict[str, str] = upload["deferred"]
        by_path = {f.path: f for f in files}

        def digest(path: str) -> str:
            """A file's sha256, waiting for the thread hashing it if need be."""
            if known[path] is None:
                known[path] = (hashing[path].result() if path in hashing
                               else cache.local_sha256(by_path[path].local))
            return known[path]

        # A resumed upload may hold with its hash a file this push began to send without one.
        local_by_key = {deferred.get(f.path) or digest(f.path): (f, f.size) for f in files}
        skip: set[str] = set()

        def declare() -> None:
            """Wait for the hashes of the files sent before them and declare them."""
            if not deferred:
                return
            digests = {p: digest(p) for p in deferred}
            r = http.post(f"/api/v1/uploads/{upload_id}/declare", json={"files": digests})
            raise_for_status(r)
            for p in r.json().get("present", []):
                skip.add(deferred[p])

        jobs = _jobs(upload, local_by_key, part_size)
        if bar is not None:
            bar.update(max(0, sum(f.size for f in files) - sum(
                min(part_size, f.size - k * part_size) for f, _s, k in jobs)))
        for attempt in range(2):
            _send_parts(http, upload_id, part_size, jobs, parallel, bar, skip=skip,
                        meanwhile=declare if attempt == 0 else None,
                        lean=lean)
            r = http.post(f"/api/v1/uploads/{upload_id}/commit")
            try:
                raise_for_status(r)
                break
            except (Conflict, ChecksumMismatch):
                # The registry lacks parts, or dropped a blob whose bytes did not match: ask
                # what it still needs and send that once more.
                again = _resume(http, state_path) if attempt == 0 else None
                if again is None:
                    raise
                jobs = _jobs(again, local_by_key, part_size)
    state_path.unlink(missing_ok=True)
    return VersionInfo.model_validate(r.json())


def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_ino, st.st_mtime_ns]


def _jobs(upload: dict[str, Any], local_by_sha: dict[str, tuple[LocalFile, int]],
          part_size: int) -> list[tuple[LocalFile, str, int]]:
    """(file, sha256, part) for every part the registry has not received."""
    jobs = []
    for sha in dict.fromkeys(upload["missing"]):
        if sha not in local_by_sha:
            continue
        f, size = local_by_sha[sha]
        have = set(upload["received"].get(sha, []))
        jobs.extend((f, sha, k) for k in range(max(1, -(-size // part_size))) if k not in have)
    return jobs


def _resume(http: httpx.Client, state_path: Path) -> dict[str, Any] | None:
    try:
        saved = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return None
    r = http.get(f"/api/v1/uploads/{saved.get('upload_id')}")
    try:
        raise_for_status(r)
    except UploadNotFound:
        state_path.unlink(missing_ok=True)
        return None
    body = r.json()
    if body.get("state", "open") not in ("open", "pending", "uploading"):
        state_path.unlink(missing_ok=True)
        return None
    return {"upload_id": body["upload_id"], "missing": list(body.get("missing", [])),
            "part_size": int(body.get("part_size") or saved["part_size"]),
            "received": {k: list(v) for k, v in (body.get("received") or {}).items()},
            "deferred": dict(body.get("deferred") or {})}


def _send_parts(http: httpx.Client, upload_id: str, part_size: int,
                jobs: list[tuple[LocalFile, str, int]], parallel: int, bar, *,
                skip: set[str] | None = None, meanwhile=None, lean: bool = False) -> None:
    """PUT every job's part, ``parallel`` at a time, leaving out the keys in ``skip`` (which
    may grow meanwhile); ``meanwhile`` runs in this thread while the parts go out. ``lean``
    sends each part from the file with ``sendfile`` instead of through ``http``."""
    skip = skip if skip is not None else set()
    local = threading.local()

    def put(f: LocalFile, url: str, offset: int, length: int) -> httpx.Response:
        if not lean:
            return http.put(url, content=_read_range(f.local, offset, length),
                            headers={"Content-Type": "application/octet-stream",
                                     "Content-Length": str(length)})
        raw = getattr(local, "raw", None)
        if raw is None:
            raw = local.raw = RawHTTP(http.base_url, http.headers, http.timeout.write or 60.0)
        with open(f.local, "rb") as fh:
            try:
                return raw.put_file(url, fh, offset, length)
            except EOFError:
                raise InvalidRequest(f"{f.local} shrank while it was being pushed") from None

    if not jobs:
        if meanwhile is not None:
            meanwhile()
        return
    failed = threading.Event()

    def send(job: tuple[LocalFile, str, int]) -> None:
        f, sha, k = job
        offset = k * part_size
        length = max(0, min(part_size, f.size - offset))
        if failed.is_set():
            return
        if sha in skip:            # the registry holds this blob already
            if bar is not None:
                bar.update(length)
            return
        url = f"/api/v1/uploads/{upload_id}/blobs/{sha}/parts/{k}"
        for attempt in range(_ATTEMPTS):
            try:
                r = put(f, url, offset, length)
                break
            except httpx.TransportError as exc:
                if attempt == _ATTEMPTS - 1:
                    failed.set()
                    raise RegistryUnavailable(f"upload of {f.path} part {k} failed: {exc}") from exc
                time.sleep(0.2 * 2 ** attempt)
        try:
            raise_for_status(r)
        except BaseException:
            failed.set()
            raise
        if bar is not None:
            bar.update(length)

    with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="quiver-up") as pool:
        futures = [pool.submit(send, j) for j in jobs]
        try:
            if meanwhile is not None:
                meanwhile()
            for fut in futures:
                fut.result()
        except BaseException:
            failed.set()
            for fut in futures:
                fut.cancel()
            raise


def _read_range(path: Path, offset: int, length: int, block: int = 1 << 20) -> Iterator[bytes]:
    """Bytes ``[offset, offset + length)`` of a file in 1 MiB pieces (httpx sends a large
    ``bytes`` body far more slowly than an iterator of moderate pieces)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end = offset + length
        while offset < end:
            data = os.pread(fd, min(block, end - offset), offset)
            if not data:
                raise InvalidRequest(f"{path} shrank while it was being pushed")
            offset += len(data)
            yield data
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
