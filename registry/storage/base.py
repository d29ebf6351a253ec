"""The blob-store contract and the pieces both stores share.

A blob is an immutable byte string named by its lower-case hex sha256. A store holds each blob
once, however many files, versions or repositories refer to it. Every write goes to a private
temporary name first, is hashed on the way, checked against what the caller expected, and only
then published under its final name in one atomic step, so a reader never sees half a blob.

Large files arrive as numbered parts (0-based) staged under an upload key; ``complete_parts``
assembles them in order, verifies the result and publishes it the same way. A store that also
implements :class:`PartAssembler` can take each part at its final offset instead, when the
caller knows the blob's part size and total size, so that completing costs one hash and no copy.
"""

from __future__ import annotations

import abc

import re
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Protocol, runtime_checkable

from quiver.errors import InvalidRequest

__all__ = [
    "BlobStore", "BlobStream", "BlobListing", "PartAssembler", "CHUNK_SIZE", "check_sha256",
    "check_upload_key", "check_part_number", "check_range", "check_parts_complete", "part_length",
    "rechunk", "MAX_PARTS",
]

CHUNK_SIZE = 1 << 20
"""Bytes per chunk when streaming a blob out, and the write batch size when streaming one in."""

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_UPLOAD_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_PARTS = 10_000


def check_sha256(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lower-case hex digits; InvalidRequest otherwise."""
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        raise InvalidRequest(f"not a sha256 digest: {sha256!r} (64 lower-case hex digits)",
                             details={"sha256": sha256 if isinstance(sha256, str) else None})
    return sha256


def check_upload_key(upload_key: str) -> str:
    if (not isinstance(upload_key, str) or not _UPLOAD_KEY_RE.match(upload_key)
            or ".." in upload_key):
        raise InvalidRequest(f"invalid upload key {upload_key!r}",
                             details={"upload_key": upload_key if isinstance(upload_key, str)
                                      else None})
    return upload_key


def check_part_number(part_number: int) -> int:
    if (isinstance(part_number, bool) or not isinstance(part_number, int)
            or not 0 <= part_number < MAX_PARTS):
        raise InvalidRequest(f"part numbers run from 0 to {MAX_PARTS - 1}, got {part_number!r}",
                             details={"part_number": part_number})
    return part_number


def check_parts_complete(sha256: str, have: set[int], part_count: int) -> None:
    """InvalidRequest unless parts ``0 .. part_count - 1`` of ``sha256`` are all in ``have``."""
    if part_count < 1:
        raise InvalidRequest("an upload has at least one part", details={"part_count": 0})
    missing = [k for k in range(part_count) if k not in have]
    if missing:
        raise InvalidRequest(f"blob {sha256} is missing {len(missing)} part(s)",
                             details={"sha256": sha256, "missing_parts": missing})


def part_length(part_number: int, part_size: int, blob_size: int) -> int:
    """Bytes part ``part_number`` holds when a ``blob_size``-byte blob is cut every
    ``part_size`` bytes; InvalidRequest for a part past the end (a 0-byte blob has one part)."""
    check_part_number(part_number)
    if part_size < 1 or blob_size < 0:
        raise InvalidRequest(f"invalid part layout: {part_size}-byte parts of {blob_size} bytes",
                             details={"part_size": part_size, "blob_size": blob_size})
    count = max(1, -(-blob_size // part_size))
    if part_number >= count:
        raise InvalidRequest(f"part {part_number} out of range: this blob has {count} part(s)",
                             details={"part": part_number, "part_count": count})
    return min(part_size, blob_size - part_number * part_size)


def check_range(start: int, end: int | None, size: int) -> tuple[int, int]:
    """Clamp an inclusive HTTP-style range to ``size``; returns (start, stop), stop exclusive."""
    if start < 0 or (end is not None and end < start):
        raise InvalidRequest(f"invalid byte range {start}-{'' if end is None else end}",
                             details={"start": start, "end": end, "size": size})
    if start > size or (start == size and size > 0):
        raise InvalidRequest(f"range start {start} is past the end of a {size}-byte blob",
                             details={"start": start, "end": end, "size": size})
    stop = size if end is None else min(end + 1, size)
    return start, stop


async def rechunk(chunks: AsyncIterator[bytes], size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """Regroup a stream of small chunks into chunks of about ``size`` bytes (the last shorter)."""
    pending: list[bytes] = []
    held = 0
    async for chunk in chunks:
        if not chunk:
            continue
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob chunks must be bytes, got {type(chunk).__name__}")
        pending.append(bytes(chunk))
        held += len(chunk)
        if held >= size:
            yield pending[0] if len(pending) == 1 else b"".join(pending)
            pending, held = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else b"".join(pending)


class BlobStream(abc.ABC):
    """The bytes of one blob range, opened lazily.

    ``await stream`` opens it eagerly (so a missing blob raises BlobNotFound before any response
    starts) and returns the stream itself; ``async for chunk in stream`` opens it on the first
    chunk if that has not happened yet. Chunks are at most :data:`CHUNK_SIZE` bytes. The stream
    closes itself when exhausted; call :meth:`aclose` when abandoning it early. Chunks are
    ``bytes`` or read-only memoryviews (the local store's, of the mapped file).
    """

    def __init__(self) -> None:
        self._opened = False
        self._closed = False
        self.length: int | None = None
        """Bytes the range holds, known once opened."""

    @abc.abstractmethod
    async def _open(self) -> None: ...

    @abc.abstractmethod
    async def _read(self) -> bytes | memoryview: ...

    @abc.abstractmethod
    async def _release(self) -> None: ...

    async def open(self) -> BlobStream:
        if not self._opened:
            await self._open()
            self._opened = True
        return self

    def __await__(self) -> Generator[object, None, BlobStream]:
        return self.open().__await__()

    def __aiter__(self) -> BlobStream:
        return self

    async def __anext__(self) -> bytes | memoryview:
        if self._closed:
            raise StopAsyncIteration
        try:
            await self.open()
            chunk = await self._read()
        except BaseException:
            await self.aclose()
            raise
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._opened:
                await self._release()

    async def read_all(self) -> bytes:
        """Every byte of the range; meant for small ranges."""
        return b"".join([chunk async for chunk in self])


class BlobListing:
    """``async for sha256, size in store.list_blobs()``; also awaitable, returning itself."""

    def __init__(self, pages: AsyncIterator[list[tuple[str, int]]]) -> None:
        self._pages = pages
        self._page: list[tuple[str, int]] = []

    def __await__(self) -> Generator[object, None, BlobListing]:
        async def itself() -> BlobListing:
            return self
        return itself().__await__()

    def __aiter__(self) -> BlobListing:
        return self

    async def __anext__(self) -> tuple[str, int]:
        while not self._page:
            self._page = list(await self._pages.__anext__())
            self._page.reverse()
        return self._page.pop()


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed blob storage: a local directory or an S3-compatible bucket."""

    kind: str

    async def exists(self, sha256: str) -> bool: ...

    async def size(self, sha256: str) -> int | None: ...

    async def put_stream(self, chunks: AsyncIterator[bytes], *, expected_sha256: str | None = None,
                         expected_size: int | None = None) -> tuple[str, int]:
        """Store a stream; returns (sha256, size). ChecksumMismatch / InvalidRequest on a
        digest or size other than the expected one, leaving nothing stored."""
        ...

    async def put_part(self, upload_key: str, sha256: str, part_number: int,
                       chunks: AsyncIterator[bytes]) -> int:
        """Stage part ``part_number`` (0-based) of blob ``sha256``; re-sending replaces it."""
        ...

    async def list_parts(self, upload_key: str, sha256: str) -> list[int]: ...

    async def complete_parts(self, upload_key: str, sha256: str, part_count: int,
                             expected_size: int, *, staged_as: str | None = None
                             ) -> tuple[str, int]:
        """Assemble parts 0..part_count-1, verify them against ``sha256``, publish, and drop
        the parts. ``staged_as`` names the parts when they were sent under another key than
        the blob's sha256 (a file whose hash was declared after its bytes)."""
        ...

    async def abort_parts(self, upload_key: str, sha256: str | None = None) -> None:
        """Drop the staged parts of one blob, or of the whole upload when ``sha256`` is None."""
        ...

    def open_range(self, sha256: str, start: int = 0, end: int | None = None) -> BlobStream:
        """Bytes ``start..end`` (inclusive, like HTTP Range); BlobNotFound when missing."""
        ...

    async def read_prefix(self, sha256: str, n: int) -> bytes: ...

    async def delete(self, sha256: str) -> None: ...

    async def presigned_get_url(self, sha256: str, expires_s: int = 600) -> str | None: ...

    def list_blobs(self) -> BlobListing: ...

    def local_path(self, sha256: str) -> Path | None:
        """A filesystem path to serve the blob from without copying, or None."""
        ...

    async def cleanup_stale(self, older_than_s: float = 24 * 3600) -> int:
        """Remove temporaries and staged parts left by interrupted writes; returns the count."""
        ...

    async def aclose(self) -> None:
        """Release the store's threads and connections (at process shutdown)."""
        ...


@runtime_checkable
class PartAssembler(Protocol):
    """A store that writes each part straight to its place in the blob being assembled."""

    async def put_part_at(self, upload_key: str, sha256: str, part_number: int,
                          chunks: AsyncIterator[bytes], *, part_size: int,
                          blob_size: int) -> int:
        """Stage part ``part_number`` of a ``blob_size``-byte blob cut every ``part_size``
        bytes; the part must hold exactly its share (InvalidRequest otherwise, and it is then
        not counted as received). Re-sending replaces it. ``complete_parts`` then verifies and
        publishes the assembled blob."""
        ...
