"""Blobs in a local directory.

Layout under ``root``::

    blobs/ab/cdef...       one file per blob, named by its sha256 (first two hex digits as folder)
    tmp/<random>.tmp       writes in progress; renamed into blobs/ once verified
    uploads/<key>/<sha256>/000000   staged parts of resumable uploads

File I/O runs in worker threads so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from quiver.errors import BlobNotFound, ChecksumMismatch, InvalidRequest

from .base import (
    CHUNK_SIZE, BlobListing, BlobStream, check_part_number, check_range, check_sha256,
    check_upload_key, rechunk,
)

__all__ = ["LocalBlobStore"]

_LIST_PAGE = 1000


def _verify(digest: str, size: int, expected_sha256: str | None,
            expected_size: int | None) -> None:
    if expected_size is not None and size != expected_size:
        raise InvalidRequest(f"expected {expected_size} bytes, received {size}",
                             details={"expected_size": expected_size, "size": size})
    if expected_sha256 is not None and digest != expected_sha256:
        raise ChecksumMismatch(f"content hashes to {digest}, expected {expected_sha256}",
                               details={"expected": expected_sha256, "found": digest})


class _FileRange(BlobStream):
    def __init__(self, path: Path, sha256: str, start: int, end: int | None) -> None:
        super().__init__()
        self._path, self._sha256, self._start, self._end = path, sha256, start, end
        self._file: BinaryIO | None = None
        self._left = 0

    def _open_sync(self) -> tuple[BinaryIO, int]:
        try:
            f = open(self._path, "rb")  # noqa: SIM115 - closed in _release
        except FileNotFoundError:
            raise BlobNotFound(f"blob {self._sha256} not found",
                               details={"sha256": self._sha256}) from None
        try:
            start, stop = check_range(self._start, self._end, os.fstat(f.fileno()).st_size)
            f.seek(start)
        except BaseException:
            f.close()
            raise
        return f, stop - start

    async def _open(self) -> None:
        self._file, self._left = await asyncio.to_thread(self._open_sync)
        self.length = self._left

    async def _read(self) -> bytes:
        if self._left <= 0 or self._file is None:
            return b""
        data = await asyncio.to_thread(self._file.read, min(CHUNK_SIZE, self._left))
        self._left -= len(data)
        return data

    async def _release(self) -> None:
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
            self._file = None


class LocalBlobStore:
    """A :class:`~quiver.registry.storage.BlobStore` on the local filesystem.

    ``fsync`` (default on) flushes each blob to disk before it is published, so a power loss
    cannot leave a published name pointing at missing data.
    """

    kind = "local"

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._uploads = self.root / "uploads"
        for d in (self._blobs, self._tmp, self._uploads):
            d.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    # --- paths ---------------------------------------------------------------------------

    def _blob_path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self._blobs / sha256[:2] / sha256[2:]

    def _parts_dir(self, upload_key: str, sha256: str) -> Path:
        return self._uploads / check_upload_key(upload_key) / check_sha256(sha256)

    def _new_tmp(self) -> Path:
        return self._tmp / f"{uuid.uuid4().hex}.tmp"

    def local_path(self, sha256: str) -> Path | None:
        path = self._blob_path(sha256)
        return path if path.is_file() else None

    # --- synchronous helpers run in threads ----------------------------------------------------

    def _finish(self, f: BinaryIO) -> None:
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        f.close()

    def _publish(self, tmp: Path, sha256: str) -> None:
        final = self._blob_path(sha256)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)
        if self.fsync:
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @staticmethod
    def _discard(f: BinaryIO | None, tmp: Path) -> None:
        if f is not None and not f.closed:
            f.close()
        tmp.unlink(missing_ok=True)

    @staticmethod
    def _write_hashed(f: BinaryIO, h: hashlib._Hash | None, data: bytes) -> None:
        if h is not None:
            h.update(data)
        f.write(data)

    async def _stream_to_tmp(self, chunks: AsyncIterator[bytes], *, hashed: bool,
                             limit: int | None) -> tuple[Path, str | None, int]:
        """Write ``chunks`` to a fresh temporary file; returns (tmp path, sha256, size)."""
        tmp = self._new_tmp()
        f: BinaryIO = await asyncio.to_thread(open, tmp, "wb")
        h = hashlib.sha256() if hashed else None
        size = 0
        try:
            async for data in rechunk(chunks):
                size += len(data)
                if limit is not None and size > limit:
                    raise InvalidRequest(f"expected {limit} bytes, received more",
                                         details={"expected_size": limit, "size": size})
                await asyncio.to_thread(self._write_hashed, f, h, data)
            await asyncio.to_thread(self._finish, f)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._discard, f, tmp))
            raise
        return tmp, (h.hexdigest() if h is not None else None), size

    # --- BlobStore ---------------------------------------------------------------------------

    async def exists(self, sha256: str) -> bool:
        return await asyncio.to_thread(self._blob_path(sha256).is_file)

    async def size(self, sha256: str) -> int | None:
        path = self._blob_path(sha256)

        def stat() -> int | None:
            try:
                return path.stat().st_size
            except FileNotFoundError:
                return None
        return await asyncio.to_thread(stat)

    async def put_stream(self, chunks: AsyncIterator[bytes], *, expected_sha256: str | None = None,
                         expected_size: int | None = None) -> tuple[str, int]:
        if expected_sha256 is not None:
            check_sha256(expected_sha256)
        tmp, digest, size = await self._stream_to_tmp(chunks, hashed=True, limit=expected_size)
        assert digest is not None
        try:
            _verify(digest, size, expected_sha256, expected_size)
            await asyncio.to_thread(self._publish, tmp, digest)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._discard, None, tmp))
            raise
        return digest, size

    async def put_part(self, upload_key: str, sha256: str, part_number: int,
                       chunks: AsyncIterator[bytes]) -> int:
        parts = self._parts_dir(upload_key, sha256)
        final = parts / f"{check_part_number(part_number):06d}"
        tmp, _, size = await self._stream_to_tmp(chunks, hashed=False, limit=None)

        def place() -> None:
            parts.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        try:
            await asyncio.to_thread(place)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._discard, None, tmp))
            raise
        return size

    async def list_parts(self, upload_key: str, sha256: str) -> list[int]:
        parts = self._parts_dir(upload_key, sha256)

        def listing() -> list[int]:
            try:
                names = os.listdir(parts)
            except FileNotFoundError:
                return []
            return sorted(int(n) for n in names if n.isdigit())
        return await asyncio.to_thread(listing)

    async def complete_parts(self, upload_key: str, sha256: str, part_count: int,
                             expected_size: int) -> tuple[str, int]:
        parts = self._parts_dir(upload_key, sha256)
        if part_count < 1:
            raise InvalidRequest("an upload has at least one part", details={"part_count": 0})
        have = set(await self.list_parts(upload_key, sha256))
        missing = [k for k in range(part_count) if k not in have]
        if missing:
            raise InvalidRequest(f"blob {sha256} is missing {len(missing)} part(s)",
                                 details={"sha256": sha256, "missing_parts": missing})

        def assemble() -> str:
            tmp = self._new_tmp()
            h = hashlib.sha256()
            size = 0
            try:
                with open(tmp, "wb") as out:
                    for k in range(part_count):
                        with open(parts / f"{k:06d}", "rb") as part:
                            while data := part.read(CHUNK_SIZE):
                                size += len(data)
                                if size > expected_size:
                                    raise InvalidRequest(
                                        f"parts hold more than the expected {expected_size} bytes",
                                        details={"expected_size": expected_size})
                                h.update(data)
                                out.write(data)
                    out.flush()
                    if self.fsync:
                        os.fsync(out.fileno())
                _verify(h.hexdigest(), size, sha256, expected_size)
                self._publish(tmp, sha256)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return sha256

        try:
            await asyncio.to_thread(assemble)
        except (ChecksumMismatch, InvalidRequest):
            await self.abort_parts(upload_key, sha256)
            raise
        await self.abort_parts(upload_key, sha256)
        return sha256, expected_size

    async def abort_parts(self, upload_key: str, sha256: str | None = None) -> None:
        target = (self._parts_dir(upload_key, sha256) if sha256 is not None
                  else self._uploads / check_upload_key(upload_key))

        def remove() -> None:
            shutil.rmtree(target, ignore_errors=True)
            if sha256 is not None:
                with contextlib.suppress(OSError):
                    target.parent.rmdir()
        await asyncio.to_thread(remove)

    def open_range(self, sha256: str, start: int = 0, end: int | None = None) -> BlobStream:
        return _FileRange(self._blob_path(sha256), sha256, start, end)

    async def read_prefix(self, sha256: str, n: int) -> bytes:
        path = self._blob_path(sha256)

        def read() -> bytes:
            try:
                with open(path, "rb") as f:
                    return f.read(max(n, 0))
            except FileNotFoundError:
                raise BlobNotFound(f"blob {sha256} not found",
                                   details={"sha256": sha256}) from None
        return await asyncio.to_thread(read)

    async def delete(self, sha256: str) -> None:
        await asyncio.to_thread(self._blob_path(sha256).unlink, missing_ok=True)

    async def presigned_get_url(self, sha256: str, expires_s: int = 600) -> str | None:
        check_sha256(sha256)
        return None

    def list_blobs(self) -> BlobListing:
        return BlobListing(self._pages())

    async def _pages(self) -> AsyncIterator[list[tuple[str, int]]]:
        def scan(prefix: str) -> list[tuple[str, int]]:
            out = []
            try:
                with os.scandir(self._blobs / prefix) as it:
                    for entry in it:
                        sha = prefix + entry.name
                        if len(sha) == 64 and entry.is_file():
                            try:
                                out.append((sha, entry.stat().st_size))
                            except FileNotFoundError:
                                continue
            except FileNotFoundError:
                pass
            return out

        prefixes = await asyncio.to_thread(
            lambda: sorted(p.name for p in self._blobs.iterdir() if len(p.name) == 2))
        page: list[tuple[str, int]] = []
        for prefix in prefixes:
            page.extend(sorted(await asyncio.to_thread(scan, prefix)))
            if len(page) >= _LIST_PAGE:
                yield page
                page = []
        if page:
            yield page

    async def aclose(self) -> None:
        return None

    async def cleanup_stale(self, older_than_s: float = 24 * 3600) -> int:
        cutoff = time.time() - older_than_s

        def sweep() -> int:
            removed = 0
            for entry in os.scandir(self._tmp):
                try:
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
            for upload in os.scandir(self._uploads):
                newest = max((p.stat().st_mtime for p in Path(upload.path).rglob("*")),
                             default=upload.stat().st_mtime)
                if newest < cutoff:
                    shutil.rmtree(upload.path, ignore_errors=True)
                    removed += 1
            return removed
        return await asyncio.to_thread(sweep)
