"""Blobs in a local directory.

Layout under ``root``::

    blobs/ab/cdef...       one file per blob, named by its sha256 (first two hex digits as folder)
    tmp/<random>.tmp       writes in progress; renamed into blobs/ once verified
    uploads/<key>/<sha256>/000000   staged parts of resumable uploads, one file each
    uploads/<key>/<sha256>/assembly the blob being assembled, when parts come with their layout
    uploads/<key>/<sha256>/layout   "<part size> <blob size>" of that assembly
    uploads/<key>/<sha256>/done.000000  marker: that part's bytes are complete in the assembly
    uploads/<key>/<sha256>/lock.000000  locked while that part is being written

A blob's parts are staged one way or the other: as separate files (``put_part``), concatenated
when completed, or written in place into one preallocated assembly file (``put_part_at``), which
completing hashes once and renames into ``blobs/`` without copying. A part's marker is removed
before its bytes are (re)written and created only once they are all written, so a part torn by
a crashed process is never counted. While parts arrive, the assembly is flushed to disk in the
background every ``_FLUSH_EVERY`` bytes, and each part's rest once it is sealed (without holding
up the answer), so the fsync before publishing finds little left to wait for; a failed
background flush fails the completion and drops the parts. Should a power loss leave a marker
whose bytes never reached the disk, completing finds the hash wrong and drops the parts to be
sent again. Part writers hold a shared ``flock`` on the assembly and completing holds an
exclusive one, so no byte changes between hashing and publishing.

Parts that arrive in order are hashed as they pass (a running sha256 of the received prefix,
kept in memory), so completing hashes only what the prefix lacks. Each marker holds a random
token; the running hash remembers the tokens of the parts it covers and is used only if every
one is unchanged when completing, so a part rewritten since (by any process) is hashed again.

File I/O runs in worker threads so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import mmap
import os
import queue
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from quiver.errors import BlobNotFound, ChecksumMismatch, Conflict, InvalidRequest, Unavailable

from .base import (
    CHUNK_SIZE, BlobListing, BlobStream, check_part_number, check_range, check_sha256,
    check_parts_complete, check_upload_key, part_length, rechunk,
)

__all__ = ["LocalBlobStore"]

_LIST_PAGE = 1000
_ASSEMBLY = "assembly"
_LAYOUT = "layout"
_DONE = "done."
_WRITE_BATCH = 1 << 20
"""Bytes gathered from the request before one vectored write into the assembly."""
_WRITE_BUFFERS = 512
_WRITE_DEPTH = 4
"""Batches that may wait for the writer thread while the event loop receives the next."""
_HASH_BLOCK = 1 << 20     # pieces that stay in the CPU cache between read and hash
_SEND_WINDOW = 8 << 20
"""Bytes of a blob mapped and faulted in per trip to a worker thread when it is sent."""
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)    # Linux 5.14, not named in 3.11
_FLUSH_EVERY = 16 << 20
"""Bytes written into an assembly, by all its parts, between background flushes to disk when
blobs are fsynced. On a VM whose host caches the guest's writes, the fsync before publishing a
200 MB blob waited 0.25-0.35 s for what had piled up; flushed as it arrives, 13-38 ms."""
_PART_LOCK = "lock."
_PART_WAIT_S = 30.0
"""How long a part waits for an earlier upload of the same part to end."""


def _marker(part_number: int) -> str:
    return f"{_DONE}{part_number:06d}"


@dataclass(eq=False)
class _Flushes:
    """Background flushes of one assembly: one at a time, each started once ``_FLUSH_EVERY``
    more bytes were written."""

    unflushed: int = 0
    started: list[Future[None]] = field(default_factory=list)


def _flush_and_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


@dataclass(eq=False)
class _Prefix:
    """A running sha256 over bytes ``[0, end)`` of one assembly: the parts in ``tokens``."""

    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    end: int = 0
    tokens: dict[int, str] = field(default_factory=dict)
    busy: bool = False
    """True while one thread is feeding the hasher."""


def _pwrite_all(fd: int, buffers: list[bytes], offset: int,
                hasher: hashlib._Hash | None = None) -> None:
    """Write ``buffers`` back to back at ``offset``, however the kernel splits the write."""
    if hasher is not None:
        for b in buffers:
            hasher.update(b)
    total = sum(len(b) for b in buffers)
    written = os.pwritev(fd, buffers, offset)
    if written < total:
        rest = memoryview(b"".join(buffers))[written:]
        while rest:
            n = os.pwrite(fd, rest, offset + written)
            rest, written = rest[n:], written + n


class _OrderedWriter:
    """Writes one part's batches at their offsets, feeding the running hash, in arrival order on
    a thread of its own. Up to ``depth`` batches wait for it, so the event loop goes on
    receiving while the disk and the hash catch up (handing over one batch at a time kept the
    loop waiting 29-47 ms per 64 MiB part). ``wrote(fd, n)`` is called after each write."""

    def __init__(self, fd: int, hasher: hashlib._Hash | None, depth: int, *,
                 wrote: Callable[[int, int], None] | None = None) -> None:
        self._fd, self._hasher, self._wrote = fd, hasher, wrote
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(depth)
        self._queue: queue.SimpleQueue[tuple[list[bytes], int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._drained: asyncio.Future[None] = self._loop.create_future()   # the thread is done
        threading.Thread(target=self._run, name="quiver-part-writer", daemon=True).start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    _pwrite_all(self._fd, item[0], item[1], self._hasher)
                    if self._wrote is not None:
                        self._wrote(self._fd, sum(map(len, item[0])))
                except BaseException as exc:  # noqa: BLE001 - raised in the event loop
                    self._error = exc
            self._call_in_loop(self._slots.release)
        self._call_in_loop(self._settle)

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:     # the loop has closed: nobody is waiting any more
            pass

    def _settle(self) -> None:
        if not self._drained.done():
            self._drained.set_result(None)

    async def write(self, batch: list[bytes], offset: int) -> None:
        if self._error is not None:
            raise self._error
        await self._slots.acquire()
        self._queue.put((batch, offset))

    async def drain(self) -> None:
        """Wait until every batch is written; raises the first write's error."""
        self._queue.put(None)
        await asyncio.shield(self._drained)
        if self._error is not None:
            raise self._error

    def abandon(self, then: Callable[[], None]) -> None:
        """Stop after the batches already handed over, then call ``then`` in the event loop."""
        self._queue.put(None)
        self._drained.add_done_callback(lambda _done: then())


def _read_token(parts: Path, part_number: int) -> str | None:
    try:
        return (parts / _marker(part_number)).read_text()
    except FileNotFoundError:
        return None


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _close_after(done: asyncio.Future[None], *fds: int) -> None:
    if not done.cancelled():
        done.exception()        # retrieved: the request that started it has failed already
    _close_all(*fds)


def _flock_within(fd: int, operation: int, wait_s: float) -> bool:
    """``flock`` that gives up after ``wait_s`` seconds; True once the lock is held."""
    deadline = time.monotonic() + wait_s
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _verify(digest: str, size: int, expected_sha256: str | None,
            expected_size: int | None) -> None:
    if expected_size is not None and size != expected_size:
        raise InvalidRequest(f"expected {expected_size} bytes, received {size}",
                             details={"expected_size": expected_size, "size": size})
    if expected_sha256 is not None and digest != expected_sha256:
        raise ChecksumMismatch(f"content hashes to {digest}, expected {expected_sha256}",
                               details={"expected": expected_sha256, "found": digest})


class _FileRange(BlobStream):
    """A range of a blob file, sent from the page cache without copying it through Python.

    A worker thread maps the next ``_SEND_WINDOW`` bytes and faults them in (from the disk if
    need be); the event loop then hands out memoryviews of the mapping, which the server writes
    to the socket straight from the page cache. Each window is unmapped once the last view of it
    is released, so memory stays bounded however large the blob. Blobs are immutable and
    replaced only by rename, so a mapped file never shrinks under the reader.
    """

    def __init__(self, path: Path, sha256: str, start: int, end: int | None) -> None:
        super().__init__()
        self._path, self._sha256, self._start, self._end = path, sha256, start, end
        self._fd = -1
        self._pos = self._stop = 0
        self._window: memoryview | None = None
        self._taken = 0

    def _open_sync(self) -> tuple[int, int, int]:
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {self._sha256} not found",
                               details={"sha256": self._sha256}) from None
        try:
            start, stop = check_range(self._start, self._end, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        return fd, start, stop

    async def _open(self) -> None:
        self._fd, self._pos, self._stop = await asyncio.to_thread(self._open_sync)
        self.length = self._stop - self._pos

    def _map_next(self) -> memoryview:
        """Map and fault in the window that starts at ``_pos``."""
        base = self._pos - self._pos % mmap.ALLOCATIONGRANULARITY
        length = min(self._stop, self._pos + _SEND_WINDOW) - base
        mapped = mmap.mmap(self._fd, length, access=mmap.ACCESS_READ, offset=base)
        try:
            mapped.madvise(_MADV_POPULATE_READ)
        except OSError:       # older kernels: touch every page instead
            for i in range(0, length, mmap.PAGESIZE):
                mapped[i]
        return memoryview(mapped)[self._pos - base:]

    async def _read(self) -> memoryview | bytes:
        if self._pos >= self._stop or self._fd < 0:
            return b""
        if self._window is None or self._taken >= len(self._window):
            self._window = await asyncio.to_thread(self._map_next)
            self._taken = 0
        chunk = self._window[self._taken:self._taken + CHUNK_SIZE]
        self._taken += len(chunk)
        self._pos += len(chunk)
        return chunk

    async def _release(self) -> None:
        self._window = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
        self._prefixes: dict[Path, _Prefix] = {}
        self._prefix_lock = threading.Lock()
        self._flushes: dict[Path, _Flushes] = {}
        self._flush_lock = threading.Lock()
        self._flusher: ThreadPoolExecutor | None = None

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

    async def put_part_at(self, upload_key: str, sha256: str, part_number: int,
                          chunks: AsyncIterator[bytes], *, part_size: int,
                          blob_size: int) -> int:
        parts = self._parts_dir(upload_key, sha256)
        length = part_length(part_number, part_size, blob_size)
        offset = part_number * part_size
        opening = asyncio.ensure_future(asyncio.to_thread(
            self._open_slot, parts, part_number, part_size, blob_size))
        try:
            fd, lock, prefix = await asyncio.shield(opening)
        except asyncio.CancelledError:     # the thread goes on: release what it opens
            opening.add_done_callback(lambda f: self._release_opened(f, parts))
            raise
        wrote = (lambda fd, n: self._flush_soon(parts, fd, n)) if self.fsync else None
        writer = _OrderedWriter(fd, prefix.hasher if prefix is not None else None, _WRITE_DEPTH,
                                wrote=wrote)
        size = 0
        sealing: asyncio.Future[None] | None = None     # the thread sealing, once all is written
        try:
            batch: list[bytes] = []
            held = 0
            async for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if size > length:
                    raise InvalidRequest(f"part {part_number} holds more than its {length} bytes",
                                         details={"part": part_number, "expected": length})
                batch.append(chunk if isinstance(chunk, bytes) else bytes(chunk))
                held += len(chunk)
                if held >= _WRITE_BATCH or len(batch) >= _WRITE_BUFFERS:
                    await writer.write(batch, offset + size - held)
                    batch, held = [], 0
            if size != length:
                raise InvalidRequest(f"part {part_number} holds {size} bytes; expected {length}",
                                     details={"part": part_number, "expected": length,
                                              "received": size})
            if batch:
                await writer.write(batch, offset + size - held)
            await writer.drain()
            sealing = asyncio.ensure_future(asyncio.to_thread(
                self._seal_slot, fd, parts, part_number, prefix, part_size, blob_size))
            await asyncio.shield(sealing)
            if self.fsync:    # not awaited: the fsync before publishing waits for it all
                self._flush_soon(parts, fd, 0, rest=True)
        except BaseException:
            if prefix is not None:
                self._drop_prefix(parts, prefix)
            raise
        finally:
            if sealing is None:          # close once the writer has let go of ``fd``
                writer.abandon(lambda: _close_all(fd, lock))
            elif not sealing.done():     # the writer has ended; close once the seal has
                sealing.add_done_callback(lambda f: _close_after(f, fd, lock))
            else:
                _close_all(fd, lock)
        return size

    def _release_opened(self, opening: asyncio.Future[tuple[int, int, _Prefix | None]],
                        parts: Path) -> None:
        if not opening.cancelled() and opening.exception() is None:
            fd, lock, prefix = opening.result()
            if prefix is not None:
                self._drop_prefix(parts, prefix)
            _close_all(fd, lock)

    def _open_slot(self, parts: Path, part_number: int, part_size: int,
                   blob_size: int) -> tuple[int, int, _Prefix | None]:
        """Open the assembly under a shared lock, holding this part's own lock (one writer per
        part at a time) with its marker removed; also the running hash when this part extends
        it (claimed for this writer). Returns (assembly fd, part lock fd, running hash)."""
        parts.mkdir(parents=True, exist_ok=True)
        layout = f"{part_size} {blob_size}"
        try:
            known = (parts / _LAYOUT).read_text()
        except FileNotFoundError:
            tmp = parts / f".{_LAYOUT}.{uuid.uuid4().hex}"
            tmp.write_text(layout)
            os.replace(tmp, parts / _LAYOUT)
            known = layout
        if known != layout:
            raise InvalidRequest(f"the parts of {parts.name} were staged as {known}-byte "
                                 f"layout, not {layout}",
                                 details={"layout": known, "requested": layout})
        path = parts / _ASSEMBLY
        for _ in range(8):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            lock = -1
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if not _same_file(fd, path):     # completed or dropped meanwhile: reopen
                    os.close(fd)
                    continue
                lock = os.open(parts / f"{_PART_LOCK}{part_number:06d}", os.O_RDWR | os.O_CREAT,
                               0o644)
                if not _flock_within(lock, fcntl.LOCK_EX, _PART_WAIT_S):
                    raise Conflict(f"part {part_number} of blob {parts.name} is still arriving "
                                   "in another request", details={"sha256": parts.name,
                                                                  "part": part_number})
                if os.fstat(fd).st_size != blob_size:
                    os.ftruncate(fd, blob_size)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(parts / _marker(part_number))
            except BaseException:
                _close_all(fd, *([lock] if lock >= 0 else []))
                raise
            return fd, lock, self._claim_prefix(parts, part_number * part_size)
        raise Conflict(f"the assembly of blob {parts.name} keeps being replaced",
                       details={"sha256": parts.name})

    def _seal_slot(self, fd: int, parts: Path, part_number: int, prefix: _Prefix | None,
                   part_size: int, blob_size: int) -> None:
        """Mark the part received; extend the running hash over this part and the received
        parts after it."""
        if not _same_file(fd, parts / _ASSEMBLY):
            raise Conflict(f"the staged parts of blob {parts.name} were dropped while part "
                           f"{part_number} arrived; send it again",
                           details={"sha256": parts.name, "part": part_number})
        token = secrets.token_hex(8)
        (parts / _marker(part_number)).write_text(token)
        if prefix is not None:
            self._extend_prefix(parts, prefix, part_number, token,
                                part_length(part_number, part_size, blob_size))
        self._catch_up(parts, part_size, blob_size)

    # --- background flushes of assemblies (threads; under _flush_lock) ---------------------

    def _flush_soon(self, parts: Path, fd: int, written: int, *, rest: bool = False) -> None:
        """Count ``written`` more bytes in the assembly open as ``fd``; flush it to disk in a
        thread once enough have piled up (with ``rest``, any), unless a flush of it is
        running."""
        with self._flush_lock:
            state = self._flushes.setdefault(parts, _Flushes())
            state.unflushed += written
            if state.unflushed < (1 if rest else _FLUSH_EVERY) or (
                    state.started and not state.started[-1].done()):
                return
            if self._flusher is None:
                self._flusher = ThreadPoolExecutor(2, thread_name_prefix="quiver-flush")
            state.unflushed = 0
            state.started.append(self._flusher.submit(_flush_and_close, os.dup(fd)))

    def _flushed(self, parts: Path) -> None:
        """Wait for the background flushes of an assembly; raise if one failed, since the
        fsync that follows need not report an error another call has seen already."""
        with self._flush_lock:
            state = self._flushes.pop(parts, None)
        if state is None:
            return
        wait_futures(state.started)
        for done in state.started:
            if (error := done.exception()) is not None:
                raise Unavailable(f"the staged parts of blob {parts.name} could not be written "
                                  f"to disk: {error}", details={"sha256": parts.name})

    # --- the running hash of the received prefix (threads; under _prefix_lock) -------------

    def _claim_prefix(self, parts: Path, offset: int) -> _Prefix | None:
        with self._prefix_lock:
            prefix = self._prefixes.get(parts)
            if prefix is not None and offset < prefix.end:   # a hashed part is being rewritten
                del self._prefixes[parts]
                prefix = None
            if prefix is None and offset == 0:
                prefix = self._prefixes[parts] = _Prefix()
            elif prefix is None or prefix.busy or offset != prefix.end:
                return None
            prefix.busy = True
            return prefix

    def _drop_prefix(self, parts: Path, prefix: _Prefix) -> None:
        with self._prefix_lock:
            if self._prefixes.get(parts) is prefix:
                del self._prefixes[parts]

    def _extend_prefix(self, parts: Path, prefix: _Prefix, part_number: int, token: str,
                       length: int) -> None:
        with self._prefix_lock:
            prefix.end += length
            prefix.tokens[part_number] = token
            prefix.busy = False

    def _catch_up(self, parts: Path, part_size: int, blob_size: int) -> None:
        """Hash the received parts that directly follow the prefix, from the page cache."""
        with self._prefix_lock:
            prefix = self._prefixes.get(parts)
        if prefix is None:
            return
        fd = -1
        try:
            while prefix.end < blob_size:
                k = prefix.end // part_size
                token = _read_token(parts, k)
                with self._prefix_lock:
                    if (token is None or prefix.busy or self._prefixes.get(parts) is not prefix
                            or prefix.end != k * part_size):
                        return
                    prefix.busy = True
                if fd < 0:
                    fd = os.open(parts / _ASSEMBLY, os.O_RDONLY)
                hasher = prefix.hasher.copy()
                length = part_length(k, part_size, blob_size)
                pos, stop = k * part_size, k * part_size + length
                while pos < stop:
                    data = os.pread(fd, min(_HASH_BLOCK, stop - pos), pos)
                    if not data:
                        break
                    hasher.update(data)
                    pos += len(data)
                with self._prefix_lock:
                    prefix.busy = False
                    if (pos != stop or _read_token(parts, k) != token
                            or self._prefixes.get(parts) is not prefix):
                        return     # rewritten or dropped meanwhile: completing hashes it
                    prefix.hasher, prefix.end = hasher, stop
                    prefix.tokens[k] = token
        except OSError:
            return
        finally:
            if fd >= 0:
                os.close(fd)

    async def list_parts(self, upload_key: str, sha256: str) -> list[int]:
        parts = self._parts_dir(upload_key, sha256)

        return await asyncio.to_thread(self._listing, parts)

    @staticmethod
    def _listing(parts: Path) -> list[int]:
        try:
            names = os.listdir(parts)
        except FileNotFoundError:
            return []
        if _LAYOUT in names:
            return sorted(int(n[len(_DONE):]) for n in names
                          if n.startswith(_DONE) and n[len(_DONE):].isdigit())
        return sorted(int(n) for n in names if n.isdigit())

    async def complete_parts(self, upload_key: str, sha256: str, part_count: int,
                             expected_size: int, *, staged_as: str | None = None
                             ) -> tuple[str, int]:
        key = staged_as or sha256       # checked as a name by the parts' path
        parts = self._parts_dir(upload_key, key)
        check_parts_complete(sha256, set(await self.list_parts(upload_key, key)), part_count)
        if await asyncio.to_thread((parts / _LAYOUT).is_file):
            try:
                await asyncio.to_thread(self._publish_assembly, parts, sha256, part_count,
                                        expected_size)
            except (ChecksumMismatch, InvalidRequest, Unavailable):
                await self.abort_parts(upload_key, key)
                raise
            await self.abort_parts(upload_key, key)
            return sha256, expected_size

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
            await self.abort_parts(upload_key, key)
            raise
        await self.abort_parts(upload_key, key)
        return sha256, expected_size

    def _publish_assembly(self, parts: Path, sha256: str, part_count: int,
                          expected_size: int) -> None:
        """Hash the assembly under an exclusive lock (no part writer in between) and rename it
        into place."""
        part_size, blob_size = (int(x) for x in (parts / _LAYOUT).read_text().split())
        if blob_size != expected_size or max(1, -(-blob_size // part_size)) != part_count:
            raise InvalidRequest(
                f"the parts of {sha256} were staged for {blob_size} bytes in {part_size}-byte "
                f"parts, not {expected_size} bytes in {part_count} part(s)",
                details={"sha256": sha256, "blob_size": blob_size, "part_size": part_size,
                         "expected_size": expected_size, "part_count": part_count})
        path = parts / _ASSEMBLY
        fd = os.open(path, os.O_RDONLY)
        try:
            if not _flock_within(fd, fcntl.LOCK_EX, 2.0):
                raise Conflict(f"parts of blob {sha256} are still arriving",
                               details={"sha256": sha256})
            have = set(self._listing(parts)) if _same_file(fd, path) else set()
            missing = [k for k in range(part_count) if k not in have]
            if missing:       # a part was being re-sent, or the parts were dropped, meanwhile
                raise Conflict(f"blob {sha256} is missing {len(missing)} part(s)",
                               details={"sha256": sha256, "missing_parts": missing})
            h, size = self._hashed_prefix(parts)
            left = os.fstat(fd).st_size - size
            if left > 0:    # what the running hash did not cover
                buf = bytearray(min(_HASH_BLOCK, left))
                view = memoryview(buf)
                while n := os.preadv(fd, [buf], size):
                    h.update(view[:n])
                    size += n
            _verify(h.hexdigest(), size, sha256, expected_size)
            if self.fsync:
                self._flushed(parts)
                os.fsync(fd)
            self._publish(path, sha256)
        finally:
            os.close(fd)

    def _hashed_prefix(self, parts: Path) -> tuple[hashlib._Hash, int]:
        """The running hash, if every part it covers is still the one it hashed (markers
        unchanged); else a fresh hash from byte 0. Call under the exclusive lock."""
        with self._prefix_lock:
            prefix = self._prefixes.pop(parts, None)
        if (prefix is not None and not prefix.busy
                and all(_read_token(parts, k) == t for k, t in prefix.tokens.items())):
            return prefix.hasher, prefix.end
        return hashlib.sha256(), 0

    async def abort_parts(self, upload_key: str, sha256: str | None = None) -> None:
        target = (self._parts_dir(upload_key, sha256) if sha256 is not None
                  else self._uploads / check_upload_key(upload_key))

        def remove() -> None:
            for lock, states in ((self._prefix_lock, self._prefixes),
                                 (self._flush_lock, self._flushes)):
                with lock:        # the in-memory state of every assembly under ``target``
                    for key in [k for k in states if k == target or target in k.parents]:
                        del states[key]
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
