"""Blob downloads into the cache: parallel ranged GETs, resumable, verified by sha256.

A blob below the parallel threshold is one ranged GET, hashed as its bytes arrive. A larger
blob is split into chunks; worker threads fetch the missing bytes of each chunk with a
``Range`` request and ``os.pwrite`` them at their offset, while the calling thread hashes the
written prefix as it grows, so verification overlaps the transfer. Progress per chunk is
recorded next to the partial file, so an interrupted download continues where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx

from quiver.errors import ChecksumMismatch, RegistryUnavailable, UpstreamError
from quiver.http import raise_for_status
from quiver.wire import FileEntry

from quiver.client._cache import _HASH_BLOCK, Cache, PartialState, hash_file
from quiver.client._rawhttp import RawHTTP

__all__ = ["Downloader", "blob_url", "TRANSIENT_ERRORS"]

TRANSIENT_ERRORS = (httpx.TransportError, OSError)
_ATTEMPTS = 4
_SAVE_EVERY_S = 0.5

Write = Callable[[int, "bytes | memoryview"], None]


def blob_url(sha256: str) -> str:
    return f"/api/v1/blobs/{sha256}"


class _ShortRead(Exception):
    pass


class _Frontier:
    """The sha256 of a blob's contiguous written prefix while chunks land out of order.

    A worker writing exactly at the frontier hashes its own buffer, still in the CPU cache; the
    bytes written ahead of the frontier are hashed from the page cache once it reaches them
    (``catch_up``). Either way under one lock, one piece at a time, so no byte is hashed twice
    and no worker waits longer than one piece. A worker calls ``feed`` after writing and before
    recording the write, so the catch-up never reaches bytes a worker is about to feed.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._hasher = hashlib.sha256()
        self._lock = threading.Lock()
        self._buf = bytearray(_HASH_BLOCK)
        self.at = 0

    def feed(self, pos: int, data) -> None:
        with self._lock:
            if pos == self.at:
                self._hasher.update(data)
                self.at += len(data)

    def catch_up(self, ready: int) -> None:
        """Hash the written bytes ``[at, ready)`` from the file."""
        view = memoryview(self._buf)
        while True:
            with self._lock:
                if self.at >= ready:
                    return
                n = os.preadv(self._fd, [view[:min(len(view), ready - self.at)]], self.at)
                if not n:    # shortened behind our back: fetched again from the start
                    raise ChecksumMismatch(f"the partial download ends at byte {self.at}, "
                                           f"before the {ready} bytes recorded as written")
                self._hasher.update(view[:n])
                self.at += n

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


class Downloader:
    """Fetches blobs named by :class:`FileEntry` into a :class:`Cache`.

    ``lean=True`` lets ranges bypass httpx (see ``_rawhttp``): only for a plain-http registry
    reached without a proxy (``raw_usable``) nor a transport of the caller's.
    """

    def __init__(self, http: httpx.Client, cache: Cache, *, parallel: int = 4,
                 chunk: int = 32 << 20, threshold: int = 64 << 20, lean: bool = False):
        self.http = http
        self.cache = cache
        self.parallel = max(1, parallel)
        self.chunk = max(1 << 16, chunk)
        self.threshold = threshold
        self.lean = lean
        self._local = threading.local()

    def missing(self, entries: list[FileEntry]) -> list[FileEntry]:
        """The entries whose blobs are not yet verified in the cache (one per sha256)."""
        seen: set[str] = set()
        out = []
        for e in entries:
            if e.sha256 in seen or self.cache.has_blob(e):
                continue
            seen.add(e.sha256)
            out.append(e)
        return out

    def fetch(self, entries: list[FileEntry], *, progress: bool = False,
              desc: str = "pull") -> int:
        """Download every missing blob of ``entries``; returns the number of bytes fetched."""
        todo = self.missing(entries)
        if not todo:
            return 0
        # Partial downloads are read only under each blob's lock: reading (and tidying) one
        # outside it would race with another puller that is writing it.
        total = sum(e.size for e in todo)
        bar = _progress_bar(total, desc) if progress else None
        small = [e for e in todo if self._chunk_for(e) >= e.size]
        large = [e for e in todo if self._chunk_for(e) < e.size]
        try:
            # Small blobs (a config, a tokenizer file) come one by one beside the large ones,
            # which take the pool's connections in turn.
            with ThreadPoolExecutor(self.parallel, thread_name_prefix="quiver-dl") as pool, \
                    ThreadPoolExecutor(1, thread_name_prefix="quiver-dl-small") as side:
                beside = side.submit(lambda: sum(self._fetch_locked(pool, e, bar) for e in small))
                fetched = sum(self._fetch_locked(pool, e, bar) for e in large)
                fetched += beside.result()
        finally:
            if bar is not None:
                bar.close()
        return fetched

    def _fetch_locked(self, pool, entry: FileEntry, bar) -> int:
        """Fetch one blob under its lock; returns the bytes fetched."""
        with self.cache.blob_lock(entry.sha256):
            if self.cache.has_blob(entry):  # another process fetched it meanwhile
                return 0
            state = self.cache.load_partial(entry, self._chunk_for(entry))
            if bar is not None:        # what an earlier attempt already holds
                bar.update(entry.size - state.missing_bytes())
            return self._fetch_verified(pool, entry, state, bar)

    def _chunk_for(self, entry: FileEntry) -> int:
        return self.chunk if entry.size >= self.threshold else max(1, entry.size)

    def _fetch_verified(self, pool, entry: FileEntry, state: PartialState, bar) -> int:
        fetched = 0
        for attempt in range(2):
            try:
                before = state.missing_bytes()
                digest = self._fetch_one(pool, entry, state, bar)
                fetched += before
                self.cache.finish_partial(entry, digest)
                return fetched
            except ChecksumMismatch:
                if attempt == 1:
                    raise
                # finish_partial dropped the bad bytes: fetch the whole blob once more.
                state = PartialState(entry.size, self._chunk_for(entry))
                state.have = [0] * state.chunk_count
        return fetched

    def _fetch_one(self, pool, entry: FileEntry, state: PartialState, bar) -> str:
        path = self.cache.partial_path(entry.sha256)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        stop = threading.Event()
        try:
            if state.chunk_count == 1:
                hasher = hash_file(path, 0, state.have[0]) if state.have[0] else hashlib.sha256()
                self._fetch_chunk(fd, entry, state, 0, stop, bar, hasher)
                return hasher.hexdigest()
            return self._fetch_chunks(pool, fd, entry, state, stop, bar)
        except BaseException:
            stop.set()
            raise
        finally:
            os.close(fd)
            if state.missing_bytes():
                self.cache.save_partial(entry.sha256, state)

    def _fetch_chunks(self, pool, fd: int, entry: FileEntry, state: PartialState,
                      stop: threading.Event, bar) -> str:
        errors: list[BaseException] = []
        progressed = threading.Condition()

        def notify() -> None:
            with progressed:
                progressed.notify()

        def work(i: int) -> None:
            try:
                if not stop.is_set():
                    self._fetch_chunk(fd, entry, state, i, stop, bar, None, notify, frontier)
            except BaseException as exc:  # handed to the calling thread
                errors.append(exc)
                stop.set()
            finally:
                notify()

        frontier = _Frontier(fd)
        futures = [pool.submit(work, i) for i in range(state.chunk_count)
                   if not state.chunk_done(i)]
        # Chunks land out of order, so the file's length says nothing after a hard kill: keep
        # a record of each chunk's progress, never ahead of what was written.
        self.cache.save_partial(entry.sha256, state)
        saved_at = time.monotonic()
        try:
            # Hash what the workers wrote before the frontier reached it, from the page cache.
            while frontier.at < entry.size:
                if time.monotonic() - saved_at > _SAVE_EVERY_S:
                    self.cache.save_partial(entry.sha256, state)
                    saved_at = time.monotonic()
                with progressed:
                    at, k = frontier.at, frontier.at // state.chunk
                    ready = state.chunk_range(k)[0] + state.have[k]
                    if ready <= at:
                        if errors:
                            break
                        progressed.wait(0.25)
                        continue
                frontier.catch_up(ready)
        finally:
            if errors or frontier.at < entry.size:
                stop.set()
            for f in futures:
                f.cancel()
            for f in futures:
                if not f.cancelled():
                    f.exception()
        if errors:
            raise errors[0]
        return frontier.hexdigest()

    def _raw(self) -> RawHTTP:
        raw = getattr(self._local, "raw", None)
        if raw is None:
            raw = RawHTTP(self.http.base_url, self.http.headers, self.http.timeout.read or 60.0)
            self._local.raw = raw
        return raw

    def _fetch_chunk(self, fd: int, entry: FileEntry, state: PartialState, i: int,
                     stop: threading.Event, bar, hasher=None,
                     notify: Callable[[], None] | None = None,
                     frontier: _Frontier | None = None) -> None:
        start, end = state.chunk_range(i)

        def write(pos: int, data) -> None:
            os.pwrite(fd, data, pos)
            if hasher is not None:
                hasher.update(data)
            if frontier is not None:
                frontier.feed(pos, data)
            state.have[i] = pos + len(data) - start
            if bar is not None:
                bar.update(len(data))
            if notify is not None:
                notify()

        for attempt in range(_ATTEMPTS):
            pos = start + state.have[i]
            if pos >= end or stop.is_set():
                return
            try:
                reached = None
                if self.lean:
                    reached = self._raw().fetch(blob_url(entry.sha256), pos, end, write, stop)
                if reached is None:
                    self._stream_range(entry, pos, end, stop, write)
                if start + state.have[i] < end and not stop.is_set():
                    raise _ShortRead(f"connection closed at byte {start + state.have[i]} of {end}")
            except (*TRANSIENT_ERRORS, _ShortRead) as exc:
                if attempt == _ATTEMPTS - 1:
                    raise RegistryUnavailable(
                        f"download of {entry.path} failed after {_ATTEMPTS} attempts: {exc}",
                        details={"sha256": entry.sha256}) from exc
                time.sleep(0.2 * 2 ** attempt)

    def _stream_range(self, entry: FileEntry, pos: int, end: int, stop: threading.Event,
                      write: Write) -> None:
        headers = {"Range": f"bytes={pos}-{end - 1}"}
        with self.http.stream("GET", blob_url(entry.sha256), headers=headers) as r:
            if r.status_code >= 400:
                r.read()
                raise_for_status(r)
            skip = 0
            if r.status_code == 206:
                got = r.headers.get("content-range", "")
                if not got.startswith(f"bytes {pos}-"):
                    raise UpstreamError(f"registry answered range {got!r} for bytes={pos}-",
                                        details={"sha256": entry.sha256})
            elif r.status_code == 200:
                skip = pos  # the server ignored Range: read past what we already hold
            else:
                raise UpstreamError(f"unexpected HTTP {r.status_code} for blob {entry.sha256}")
            for data in r.iter_raw():
                if skip:
                    if len(data) <= skip:
                        skip -= len(data)
                        continue
                    data, skip = data[skip:], 0
                take = min(len(data), end - pos)
                write(pos, data[:take] if take < len(data) else data)
                pos += take
                if pos >= end or stop.is_set():
                    return


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                leave=False)
