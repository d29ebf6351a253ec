"""Blobs in an S3-compatible bucket, through the ``minio`` client.

Key layout in the bucket::

    blobs/ab/cdef...                       one object per blob, named by its sha256
    tmp/<random>                           writes whose digest was not known in advance
    uploads/<key>/<sha256>/000000          staged parts of resumable uploads

An object becomes visible only when its upload completes, so the store streams straight to the
final key when the caller names the digest up front: the data is hashed as it is sent and the
last part is withheld (the multipart upload aborted) if the digest or size turns out wrong.
Without an expected digest the bytes go to a temporary key and are published with a server-side
copy. Staged parts are assembled by streaming them, in order and hashed, into a multipart
upload of the final key. The minio client is synchronous; every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import urllib3
from minio import Minio
from minio.commonconfig import ComposeSource
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error
from minio.helpers import check_bucket_name

from quiver.errors import (
    BlobNotFound, ChecksumMismatch, InvalidRequest, Unavailable, UpstreamError,
)

from .base import (
    CHUNK_SIZE, BlobListing, BlobStream, check_part_number, check_range, check_sha256,
    check_parts_complete, check_upload_key,
)

__all__ = ["S3BlobStore"]

DEFAULT_PART_SIZE = 8 << 20
_WAIT_S = 600.0


def _blob_key(sha256: str) -> str:
    check_sha256(sha256)
    return f"blobs/{sha256[:2]}/{sha256[2:]}"


def _parts_prefix(upload_key: str, sha256: str | None = None) -> str:
    base = f"uploads/{check_upload_key(upload_key)}/"
    return base if sha256 is None else f"{base}{check_sha256(sha256)}/"


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """``host:port`` and whether to use TLS (an ``http://`` or ``https://`` prefix decides)."""
    if endpoint.startswith(("http://", "https://")):
        secure = endpoint.startswith("https://")
        endpoint = endpoint.split("://", 1)[1]
    return endpoint.rstrip("/"), secure


def _is_missing(exc: S3Error) -> bool:
    return exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound") or (
        exc.response is not None and exc.response.status == 404)


class _Check:
    """Counts and hashes bytes as they pass; verifies the total at the end."""

    def __init__(self, expected_sha256: str | None, expected_size: int | None,
                 hashed: bool = True) -> None:
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        self.hash = hashlib.sha256() if hashed else None
        self.size = 0

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            raise InvalidRequest(f"expected {self.expected_size} bytes, received more",
                                 details={"expected_size": self.expected_size, "size": self.size})
        if self.hash is not None:
            self.hash.update(data)

    @property
    def digest(self) -> str | None:
        return self.hash.hexdigest() if self.hash is not None else None

    def verify(self) -> None:
        if self.expected_size is not None and self.size != self.expected_size:
            raise InvalidRequest(f"expected {self.expected_size} bytes, received {self.size}",
                                 details={"expected_size": self.expected_size, "size": self.size})
        if self.expected_sha256 is not None and self.digest != self.expected_sha256:
            raise ChecksumMismatch(f"content hashes to {self.digest}, "
                                   f"expected {self.expected_sha256}",
                                   details={"expected": self.expected_sha256,
                                            "found": self.digest})


class _Reader:
    """A blocking ``read(n)`` over chunks from ``source``, checked by ``check``.

    minio pulls the data of an upload through ``read``; raising from it before the last part is
    sent makes minio abort the upload, so a stream that fails verification never becomes an
    object.
    """

    def __init__(self, source: Iterator[bytes], check: _Check) -> None:
        self._source = source
        self._check = check
        self._buf = b""
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        want = n if n is not None and n >= 0 else 1 << 62
        pieces: list[bytes] = []
        held = 0
        if self._buf:
            pieces.append(self._buf)
            held = len(self._buf)
            self._buf = b""
        while held < want and not self._eof:
            chunk = next(self._source, None)
            if chunk is None:
                self._eof = True
                self._check.verify()
                break
            if chunk:
                self._check.feed(chunk)
                pieces.append(chunk)
                held += len(chunk)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if len(data) > want:
            data, self._buf = data[:want], data[want:]
        return data


class _FromAsync:
    """Iterate an async iterator from a worker thread while the event loop keeps running.

    :meth:`cancel` (called on the loop) makes the waiting thread fail at once with an ordinary
    exception, so the upload that pulls from it aborts instead of completing.
    """

    def __init__(self, chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._chunks = chunks
        self._loop = loop
        self._cancelled = threading.Event()
        self._pending: concurrent.futures.Future[bytes | None] | None = None

    async def _step(self) -> bytes | None:
        try:
            return bytes(await self._chunks.__anext__())
        except StopAsyncIteration:
            return None

    def cancel(self) -> None:
        self._cancelled.set()
        if self._pending is not None:
            self._pending.cancel()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            if self._cancelled.is_set():
                raise ConnectionAbortedError("upload cancelled")
            self._pending = asyncio.run_coroutine_threadsafe(self._step(), self._loop)
            try:
                chunk = self._pending.result(timeout=_WAIT_S)
            except concurrent.futures.CancelledError:
                raise ConnectionAbortedError("upload cancelled") from None
            if chunk is None:
                return
            yield chunk


class _ObjectRange(BlobStream):
    def __init__(self, store: S3BlobStore, sha256: str, start: int, end: int | None) -> None:
        super().__init__()
        self._store, self._sha256, self._start, self._end = store, sha256, start, end
        self._resp: Any = None
        self._left = 0

    def _open_sync(self) -> tuple[Any, int]:
        key = _blob_key(self._sha256)
        size = self._store._size_sync(key)
        if size is None:
            raise BlobNotFound(f"blob {self._sha256} not found", details={"sha256": self._sha256})
        start, stop = check_range(self._start, self._end, size)
        if stop == start:
            return None, 0
        try:
            resp = self._store.client.get_object(self._store.bucket, key, offset=start,
                                                 length=stop - start)
        except S3Error as exc:
            if _is_missing(exc):
                raise BlobNotFound(f"blob {self._sha256} not found",
                                   details={"sha256": self._sha256}) from None
            raise
        return resp, stop - start

    async def _open(self) -> None:
        self._resp, self._left = await self._store._run(self._open_sync)
        self.length = self._left

    async def _read(self) -> bytes:
        if self._left <= 0 or self._resp is None:
            return b""
        data = await self._store._run(self._resp.read, min(CHUNK_SIZE, self._left))
        if not data:
            raise Unavailable(f"object store ended blob {self._sha256} {self._left} bytes early")
        self._left -= len(data)
        return data

    async def _release(self) -> None:
        resp, self._resp = self._resp, None
        if resp is not None:
            def close() -> None:
                resp.close()
                resp.release_conn()
            await self._store._run(close)


class S3BlobStore:
    """A :class:`~quiver.registry.storage.BlobStore` in one bucket of an S3-compatible service.

    ``endpoint`` is ``host:port`` (an ``http://`` or ``https://`` prefix also sets ``secure``).
    ``public_endpoint``, when given, is where clients outside the registry's network reach the
    same service; presigned URLs name it. The bucket is created on first use if it does not
    exist. ``part_size`` (at least 5 MiB, the S3 minimum) is the multipart chunk for uploads
    that do not fit in one part; an upload in flight holds about four parts in memory. The
    synchronous client runs on the store's own pool of ``max_workers`` threads, so long
    transfers never starve the event loop's default pool.
    """

    kind = "s3"

    def __init__(self, *, endpoint: str, bucket: str, access_key: str | None = None,
                 secret_key: str | None = None, secure: bool = False, region: str | None = None,
                 part_size: int = DEFAULT_PART_SIZE, max_workers: int = 32,
                 public_endpoint: str | None = None, client: Minio | None = None) -> None:
        endpoint, secure = _split_endpoint(endpoint, secure)
        if part_size < 5 << 20:
            raise ValueError("S3 parts are at least 5 MiB")
        try:
            check_bucket_name(bucket)
        except ValueError:
            raise InvalidRequest(f"invalid S3 bucket name {bucket!r}",
                                 details={"bucket": bucket}) from None
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.part_size = part_size
        self.client = client or Minio(endpoint, access_key=access_key, secret_key=secret_key,
                                      secure=secure, region=region)
        self._presigner = self.client
        if public_endpoint:
            public, public_secure = _split_endpoint(public_endpoint, secure)
            self._presigner = Minio(public, access_key=access_key, secret_key=secret_key,
                                    secure=public_secure, region=region or "us-east-1")
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="quiver-s3")

    def __repr__(self) -> str:
        return f"S3BlobStore(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    # --- plumbing ------------------------------------------------------------------------------

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._bucket_lock:
            if self._bucket_ready:
                return
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket, location=self.region)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        def call() -> Any:
            try:
                self._ensure_bucket()
                return fn(*args, **kwargs)
            except urllib3.exceptions.HTTPError as exc:
                raise Unavailable(f"object store {self.endpoint} unreachable: {exc}") from exc
            except MinioException as exc:
                code = getattr(exc, "code", None)
                raise UpstreamError(f"object store {self.endpoint} refused the request: {exc}",
                                    details={"s3_code": code}) from exc
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _size_sync(self, key: str) -> int | None:
        try:
            return self.client.stat_object(self.bucket, key).size
        except S3Error as exc:
            if _is_missing(exc):
                return None
            raise

    def _upload(self, key: str, reader: _Reader) -> None:
        self.client.put_object(self.bucket, key, reader, length=-1, part_size=self.part_size,
                               num_parallel_uploads=1)

    def _remove_prefix(self, prefix: str) -> int:
        names = [o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix,
                                                                  recursive=True)]
        if names:
            errors = list(self.client.remove_objects(
                self.bucket, (DeleteObject(n) for n in names)))
            if errors:
                raise Unavailable(f"could not remove {len(errors)} object(s) under {prefix}")
        return len(names)

    async def _put_checked(self, key: str, chunks: AsyncIterator[bytes], check: _Check) -> None:
        source = _FromAsync(chunks, asyncio.get_running_loop())
        reader = _Reader(iter(source), check)
        try:
            await self._run(self._upload, key, reader)
        except asyncio.CancelledError:
            source.cancel()
            raise

    # --- BlobStore ---------------------------------------------------------------------------

    def local_path(self, sha256: str) -> None:
        check_sha256(sha256)
        return None

    async def exists(self, sha256: str) -> bool:
        return await self.size(sha256) is not None

    async def size(self, sha256: str) -> int | None:
        return await self._run(self._size_sync, _blob_key(sha256))

    async def put_stream(self, chunks: AsyncIterator[bytes], *, expected_sha256: str | None = None,
                         expected_size: int | None = None) -> tuple[str, int]:
        if expected_sha256 is not None:
            check_sha256(expected_sha256)
        check = _Check(expected_sha256, expected_size)
        if expected_sha256 is not None:
            await self._put_checked(_blob_key(expected_sha256), chunks, check)
            return expected_sha256, check.size
        tmp = f"tmp/{uuid.uuid4().hex}"
        try:
            await self._put_checked(tmp, chunks, check)
            digest = check.digest
            assert digest is not None
            await self._run(self.client.compose_object, self.bucket, _blob_key(digest),
                            [ComposeSource(self.bucket, tmp)])
        finally:
            await asyncio.shield(self._run(self.client.remove_object, self.bucket, tmp))
        return digest, check.size

    async def put_part(self, upload_key: str, sha256: str, part_number: int,
                       chunks: AsyncIterator[bytes]) -> int:
        key = f"{_parts_prefix(upload_key, sha256)}{check_part_number(part_number):06d}"
        check = _Check(None, None, hashed=False)
        await self._put_checked(key, chunks, check)
        return check.size

    async def list_parts(self, upload_key: str, sha256: str) -> list[int]:
        prefix = _parts_prefix(upload_key, sha256)

        def listing() -> list[int]:
            names = (o.object_name[len(prefix):] for o in
                     self.client.list_objects(self.bucket, prefix=prefix, recursive=True))
            return sorted(int(n) for n in names if n.isdigit())
        return await self._run(listing)

    async def complete_parts(self, upload_key: str, sha256: str, part_count: int,
                             expected_size: int, *, staged_as: str | None = None
                             ) -> tuple[str, int]:
        key = staged_as or sha256       # checked as a name by the parts' path
        prefix = _parts_prefix(upload_key, key)
        check_parts_complete(sha256, set(await self.list_parts(upload_key, key)), part_count)

        def part_bytes() -> Iterator[bytes]:
            for k in range(part_count):
                resp = self.client.get_object(self.bucket, f"{prefix}{k:06d}")
                try:
                    yield from resp.stream(CHUNK_SIZE)
                finally:
                    resp.close()
                    resp.release_conn()

        def assemble() -> None:
            check = _Check(sha256, expected_size)
            reader = _Reader(part_bytes(), check)
            if self._size_sync(_blob_key(sha256)) == expected_size:
                while reader.read(CHUNK_SIZE):
                    pass
            else:
                self._upload(_blob_key(sha256), reader)

        try:
            await self._run(assemble)
        except (ChecksumMismatch, InvalidRequest):
            await self.abort_parts(upload_key, key)
            raise
        await self.abort_parts(upload_key, key)
        return sha256, expected_size

    async def abort_parts(self, upload_key: str, sha256: str | None = None) -> None:
        await self._run(self._remove_prefix, _parts_prefix(upload_key, sha256))

    def open_range(self, sha256: str, start: int = 0, end: int | None = None) -> BlobStream:
        check_sha256(sha256)
        return _ObjectRange(self, sha256, start, end)

    async def read_prefix(self, sha256: str, n: int) -> bytes:
        if n <= 0:
            if not await self.exists(sha256):
                raise BlobNotFound(f"blob {sha256} not found", details={"sha256": sha256})
            return b""
        return await self.open_range(sha256, 0, n - 1).read_all()

    async def delete(self, sha256: str) -> None:
        await self._run(self.client.remove_object, self.bucket, _blob_key(sha256))

    async def presigned_get_url(self, sha256: str, expires_s: int = 600) -> str | None:
        return await self._run(self._presigner.presigned_get_object, self.bucket,
                               _blob_key(sha256), expires=timedelta(seconds=expires_s))

    def list_blobs(self) -> BlobListing:
        return BlobListing(self._pages())

    async def _pages(self) -> AsyncIterator[list[tuple[str, int]]]:
        listing = await self._run(
            lambda: iter(self.client.list_objects(self.bucket, prefix="blobs/", recursive=True)))

        def page() -> list[tuple[str, int]]:
            out = []
            for obj in listing:
                sha = obj.object_name[len("blobs/"):].replace("/", "")
                if len(sha) == 64:
                    out.append((sha, obj.size))
                if len(out) >= 1000:
                    break
            return out

        while batch := await self._run(page):
            yield batch

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def cleanup_stale(self, older_than_s: float = 24 * 3600) -> int:
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)

        def sweep() -> int:
            stale: list[str] = [o.object_name for o in
                                self.client.list_objects(self.bucket, prefix="tmp/",
                                                         recursive=True)
                                if o.last_modified is not None and o.last_modified < cutoff]
            newest: dict[str, datetime] = {}
            names: dict[str, list[str]] = {}
            for o in self.client.list_objects(self.bucket, prefix="uploads/", recursive=True):
                upload = o.object_name.split("/")[1]
                names.setdefault(upload, []).append(o.object_name)
                if o.last_modified is not None:
                    newest[upload] = max(newest.get(upload, o.last_modified), o.last_modified)
            for upload, objs in names.items():
                if newest.get(upload, cutoff) < cutoff:
                    stale.extend(objs)
            if stale:
                list(self.client.remove_objects(self.bucket, (DeleteObject(n) for n in stale)))
            return len(stale)
        return await self._run(sweep)

