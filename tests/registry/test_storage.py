"""Both blob stores, against a real directory and a real S3 server (moto) on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os

import httpx
import pytest

from quiver.errors import (
    BlobNotFound, ChecksumMismatch, InvalidRequest, QuiverError, Unavailable,
)
from quiver.registry.storage import (
    BlobStore, LocalBlobStore, S3BlobStore, make_blob_store,
)

pytestmark = pytest.mark.services


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> BlobStore:
    if request.param == "local":
        return make_blob_store("local", root=tmp_path / "store")
    s3 = request.getfixturevalue("s3_bucket")
    return make_blob_store("s3", endpoint=s3["endpoint"], access_key=s3["access_key"],
                           secret_key=s3["secret_key"], bucket=s3["bucket"], region=s3["region"])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def chunks_of(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def failing_after(data: bytes, error: Exception):
    yield data
    raise error


async def all_blobs(store: BlobStore) -> list[tuple[str, int]]:
    return [item async for item in store.list_blobs()]


async def test_put_then_read_back(store):
    data = os.urandom(300_000)
    digest, size = await store.put_stream(chunks_of(data))
    assert (digest, size) == (sha(data), len(data))
    assert await store.exists(digest)
    assert await store.size(digest) == len(data)
    assert await store.open_range(digest).read_all() == data
    assert await store.read_prefix(digest, 8) == data[:8]
    assert await store.read_prefix(digest, 10**9) == data
    assert await all_blobs(store) == [(digest, len(data))]


async def test_same_content_is_stored_once(store):
    data = b"shared weights" * 1000
    first = await store.put_stream(chunks_of(data, 1000))
    second = await store.put_stream(chunks_of(data, 333), expected_sha256=sha(data),
                                    expected_size=len(data))
    assert first == second
    assert await all_blobs(store) == [first]


async def test_ranges_are_inclusive_and_clamped(store):
    data = bytes(range(256)) * 20_000  # 5 MB: several 1 MiB chunks
    digest, _ = await store.put_stream(chunks_of(data, 1 << 20))
    assert await store.open_range(digest, 10, 19).read_all() == data[10:20]
    assert await store.open_range(digest, len(data) - 5).read_all() == data[-5:]
    assert await store.open_range(digest, 100, 10**12).read_all() == data[100:]
    stream = await store.open_range(digest, 1, 3_000_000)
    assert stream.length == 3_000_000
    sizes = [len(c) async for c in stream]
    assert max(sizes) <= 1 << 20 and sum(sizes) == 3_000_000
    with pytest.raises(InvalidRequest):
        await store.open_range(digest, len(data))
    with pytest.raises(InvalidRequest):
        await store.open_range(digest, 20, 10)


@pytest.mark.parametrize("populate", ["madvise", "touch"])
async def test_local_ranges_are_sent_across_mapped_windows(tmp_path, monkeypatch, populate):
    from quiver.registry.storage import local

    grain = mmap.ALLOCATIONGRANULARITY
    monkeypatch.setattr(local, "_SEND_WINDOW", 3 * grain + 123)
    if populate == "touch":      # a kernel without MADV_POPULATE_READ: pages touched instead
        monkeypatch.setattr(local, "_MADV_POPULATE_READ", -1)
    store = LocalBlobStore(tmp_path / "store")
    data = os.urandom(5 * (1 << 20) + 777)
    digest, _ = await store.put_stream(chunks_of(data, 1 << 20))
    for start, end in [(0, None), (1, 12345), (grain - 1, 4 << 20), (len(data) - 10, None),
                       (3 * grain - 1, 3 * grain + 1), (5 * grain + 7, 5 * grain + 7)]:
        stream = await store.open_range(digest, start, end)
        chunks = [bytes(c) async for c in stream]
        assert b"".join(chunks) == data[start:None if end is None else end + 1]
        assert max(map(len, chunks)) <= 1 << 20
    # A blob deleted while it is being sent is still sent whole.
    stream = await store.open_range(digest)
    first = bytes(await stream.__anext__())
    await store.delete(digest)
    assert first + b"".join([bytes(c) async for c in stream]) == data


async def test_empty_blob(store):
    digest, size = await store.put_stream(chunks_of(b""))
    assert (digest, size) == (sha(b""), 0)
    assert await store.open_range(digest).read_all() == b""
    assert await store.read_prefix(digest, 8) == b""


async def test_missing_blob(store):
    missing = sha(b"never stored")
    assert not await store.exists(missing)
    assert await store.size(missing) is None
    with pytest.raises(BlobNotFound):
        await store.open_range(missing)
    with pytest.raises(BlobNotFound):
        async for _ in store.open_range(missing):
            pass
    with pytest.raises(BlobNotFound):
        await store.read_prefix(missing, 8)
    await store.delete(missing)  # idempotent


async def test_checksum_mismatch_leaves_nothing(store):
    data = os.urandom(50_000)
    wrong = sha(b"something else")
    with pytest.raises(ChecksumMismatch) as info:
        await store.put_stream(chunks_of(data), expected_sha256=wrong)
    assert info.value.details == {"expected": wrong, "found": sha(data)}
    assert not await store.exists(wrong)
    assert not await store.exists(sha(data))
    assert await all_blobs(store) == []


async def test_size_mismatch_leaves_nothing(store):
    data = os.urandom(40_000)
    for expected_size in (len(data) - 1, len(data) + 1):
        with pytest.raises(InvalidRequest):
            await store.put_stream(chunks_of(data), expected_sha256=sha(data),
                                   expected_size=expected_size)
        with pytest.raises(InvalidRequest):
            await store.put_stream(chunks_of(data), expected_size=expected_size)
    assert await all_blobs(store) == []


async def test_failed_stream_leaves_no_visible_blob(store):
    data = os.urandom(20_000)
    with pytest.raises(ConnectionResetError):
        await store.put_stream(failing_after(data, ConnectionResetError("client went away")),
                               expected_sha256=sha(data + data))
    with pytest.raises(ConnectionResetError):
        await store.put_stream(failing_after(data, ConnectionResetError("client went away")))
    assert await all_blobs(store) == []


async def test_multipart_upload_on_the_final_key_is_atomic(store):
    """Bigger than one S3 part: the failed digest aborts the multipart upload."""
    data = os.urandom(9 << 20)
    with pytest.raises(ChecksumMismatch):
        await store.put_stream(chunks_of(data, 1 << 20), expected_sha256=sha(b"x"))
    assert await all_blobs(store) == []
    digest, size = await store.put_stream(chunks_of(data, 1 << 20), expected_sha256=sha(data))
    assert size == len(data)
    assert hashlib.sha256(await store.open_range(digest).read_all()).hexdigest() == digest


async def test_parts_resume_and_complete(store):
    data = os.urandom(250_000)
    digest = sha(data)
    pieces = [data[i:i + 100_000] for i in range(0, len(data), 100_000)]
    assert await store.list_parts("up1", digest) == []
    assert await store.put_part("up1", digest, 2, chunks_of(pieces[2])) == len(pieces[2])
    assert await store.put_part("up1", digest, 0, chunks_of(b"garbage")) == 7
    assert await store.list_parts("up1", digest) == [0, 2]
    with pytest.raises(InvalidRequest) as info:
        await store.complete_parts("up1", digest, 3, len(data))
    assert info.value.details["missing_parts"] == [1]
    await store.put_part("up1", digest, 0, chunks_of(pieces[0], 4096))  # replaces part 0
    await store.put_part("up1", digest, 1, chunks_of(pieces[1]))
    assert await store.list_parts("up1", digest) == [0, 1, 2]
    assert await store.complete_parts("up1", digest, 3, len(data)) == (digest, len(data))
    assert await store.open_range(digest).read_all() == data
    assert await store.list_parts("up1", digest) == []


async def test_parts_bigger_than_an_s3_part(store):
    data = os.urandom(11 << 20)
    digest = sha(data)
    half = len(data) // 2
    await asyncio.gather(store.put_part("big", digest, 0, chunks_of(data[:half], 1 << 20)),
                         store.put_part("big", digest, 1, chunks_of(data[half:], 1 << 20)))
    assert await store.complete_parts("big", digest, 2, len(data)) == (digest, len(data))
    assert await store.size(digest) == len(data)
    assert await store.read_prefix(digest, 100) == data[:100]


async def test_parts_with_a_bad_digest_leave_nothing(store):
    data = os.urandom(30_000)
    claimed = sha(b"claimed")
    await store.put_part("up2", claimed, 0, chunks_of(data))
    with pytest.raises(ChecksumMismatch):
        await store.complete_parts("up2", claimed, 1, len(data))
    assert not await store.exists(claimed)
    assert await store.list_parts("up2", claimed) == []
    assert await all_blobs(store) == []


async def test_parts_with_a_wrong_size_are_refused(store):
    data = os.urandom(30_000)
    await store.put_part("up3", sha(data), 0, chunks_of(data))
    with pytest.raises(InvalidRequest):
        await store.complete_parts("up3", sha(data), 1, len(data) - 1)
    assert await all_blobs(store) == []


async def test_abort_parts(store):
    a, b = sha(b"a"), sha(b"b")
    await store.put_part("up4", a, 0, chunks_of(b"a"))
    await store.put_part("up4", b, 0, chunks_of(b"b"))
    await store.abort_parts("up4", a)
    assert await store.list_parts("up4", a) == []
    assert await store.list_parts("up4", b) == [0]
    await store.abort_parts("up4")
    assert await store.list_parts("up4", b) == []
    await store.abort_parts("up4", a)  # idempotent


async def test_delete_and_listing(store):
    blobs = [await store.put_stream(chunks_of(os.urandom(n))) for n in (1, 10, 100)]
    assert sorted(await all_blobs(store)) == sorted(blobs)
    await store.delete(blobs[0][0])
    await store.delete(blobs[0][0])
    assert sorted(await all_blobs(store)) == sorted(blobs[1:])


@pytest.mark.parametrize("bad", ["", "abc", "G" * 64, "A" * 64, "../" + "a" * 61])
async def test_bad_digests_are_refused(store, bad):
    with pytest.raises(InvalidRequest):
        await store.exists(bad)
    with pytest.raises(InvalidRequest):
        await store.put_part("up", bad, 0, chunks_of(b"x"))


@pytest.mark.parametrize("key", ["", "..", "../etc", "a/b", "a\x00", "-x"])
async def test_bad_upload_keys_are_refused(store, key):
    with pytest.raises(InvalidRequest):
        await store.put_part(key, sha(b"x"), 0, chunks_of(b"x"))


async def test_bad_part_numbers_are_refused(store):
    for part in (-1, 10_000, True):
        with pytest.raises(InvalidRequest):
            await store.put_part("up", sha(b"x"), part, chunks_of(b"x"))


async def test_presigned_url_and_local_path(store):
    data = b"presigned" * 100
    digest, _ = await store.put_stream(chunks_of(data))
    url = await store.presigned_get_url(digest, expires_s=60)
    if isinstance(store, S3BlobStore):
        assert store.local_path(digest) is None
        async with httpx.AsyncClient() as client:
            whole = await client.get(url)
            part = await client.get(url, headers={"Range": "bytes=9-17"})
        assert whole.status_code == 200 and whole.content == data
        assert part.status_code == 206 and part.content == data[9:18]
    else:
        assert url is None
        assert store.local_path(digest).read_bytes() == data
        assert store.local_path(sha(b"missing")) is None


async def test_abandoned_range_stream_can_be_closed(store):
    digest, _ = await store.put_stream(chunks_of(os.urandom(3 << 20)))
    stream = await store.open_range(digest)
    first = await stream.__anext__()
    assert len(first) == 1 << 20
    await stream.aclose()
    assert [c async for c in stream] == []


async def test_cleanup_stale_removes_leftovers_only(store):
    digest, _ = await store.put_stream(chunks_of(b"keep me"))
    await store.put_part("old", sha(b"p"), 0, chunks_of(b"p"))
    assert await store.cleanup_stale(older_than_s=3600) == 0
    assert await store.list_parts("old", sha(b"p")) == [0]
    await asyncio.sleep(1.1)
    assert await store.cleanup_stale(older_than_s=0.5) >= 1
    assert await store.list_parts("old", sha(b"p")) == []
    assert await store.exists(digest)


def test_local_store_never_shows_temporaries(tmp_path):
    store = LocalBlobStore(tmp_path, fsync=False)

    async def scenario():
        data = os.urandom(3 << 20)
        with pytest.raises(ChecksumMismatch):
            await store.put_stream(chunks_of(data), expected_sha256=sha(b"no"))
        with pytest.raises(RuntimeError):
            await store.put_stream(failing_after(data, RuntimeError("disk full")))
        return data

    asyncio.run(scenario())
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "blobs").rglob("*")) == []


async def test_cancelled_put_leaves_nothing(store):
    gate = asyncio.Event()

    async def slow():
        yield os.urandom(1000)
        gate.set()
        await asyncio.sleep(30)
        yield b"never"

    task = asyncio.create_task(store.put_stream(slow()))
    await gate.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await all_blobs(store) == []


def test_make_blob_store_validates_its_settings(tmp_path):
    assert isinstance(make_blob_store("local", root=tmp_path), LocalBlobStore)
    store = make_blob_store("s3", endpoint="http://127.0.0.1:9", bucket="quiver-blobs")
    assert isinstance(store, S3BlobStore) and store.endpoint == "127.0.0.1:9"
    for kind, kwargs in [("nfs", {"root": tmp_path}), ("local", {}), ("s3", {"bucket": "b1"}),
                         ("s3", {"endpoint": "127.0.0.1:9", "bucket": "Bad_Bucket!"})]:
        with pytest.raises(InvalidRequest):
            make_blob_store(kind, **kwargs)


async def test_unreachable_s3_is_unavailable():
    import urllib3
    from minio import Minio

    client = Minio("127.0.0.1:9", secure=False, access_key="a", secret_key="b",
                   http_client=urllib3.PoolManager(retries=urllib3.Retry(total=0),
                                                   timeout=urllib3.Timeout(connect=1, read=1)))
    store = S3BlobStore(endpoint="127.0.0.1:9", bucket="quiver-blobs", client=client)
    with pytest.raises(Unavailable) as info:
        await store.exists(sha(b"x"))
    assert isinstance(info.value, QuiverError) and info.value.code == "unavailable"


async def test_memory_stays_bounded_while_streaming(store):
    """A 48 MiB blob in and out, while Python holds far less than that at any moment."""
    import tracemalloc

    block = os.urandom(1 << 20)
    total = 48

    async def body():
        for _ in range(total):
            yield block

    expected = hashlib.sha256()
    for _ in range(total):
        expected.update(block)
    tracemalloc.start()
    try:
        digest, size = await store.put_stream(body(), expected_sha256=expected.hexdigest())
        _, peak_in = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        seen = 0
        async for chunk in store.open_range(digest):
            seen += len(chunk)
        _, peak_out = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (digest, size, seen) == (expected.hexdigest(), total << 20, total << 20)
    assert peak_in < 40 << 20, peak_in
    assert peak_out < 8 << 20, peak_out


async def test_cancelled_s3_upload_frees_its_thread(s3_bucket):
    """With one worker thread, a cancelled upload must not keep it waiting on the client."""
    store = S3BlobStore(endpoint=s3_bucket["endpoint"], bucket=s3_bucket["bucket"],
                        access_key=s3_bucket["access_key"], secret_key=s3_bucket["secret_key"],
                        region=s3_bucket["region"], max_workers=1)
    gate = asyncio.Event()

    async def stalled():
        yield b"x" * 1000
        gate.set()
        await asyncio.Event().wait()
        yield b"never"

    task = asyncio.create_task(store.put_stream(stalled(), expected_sha256=sha(b"y")))
    await gate.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await asyncio.wait_for(store.exists(sha(b"y")), timeout=10)
    assert await all_blobs(store) == []
    await store.aclose()


async def test_s3_refusals_are_upstream_errors(s3_bucket):
    from quiver.errors import UpstreamError

    store = S3BlobStore(endpoint=s3_bucket["endpoint"], bucket=s3_bucket["bucket"],
                        access_key=s3_bucket["access_key"], secret_key=s3_bucket["secret_key"],
                        region=s3_bucket["region"])
    await store.put_stream(chunks_of(b"data"))
    other = S3BlobStore(endpoint=s3_bucket["endpoint"], bucket=s3_bucket["bucket"] + "-gone",
                        client=store.client)
    other._bucket_ready = True  # pretend it exists: the server answers NoSuchBucket
    with pytest.raises(UpstreamError) as info:
        await other.put_stream(chunks_of(b"data"))
    assert info.value.details["s3_code"] == "NoSuchBucket"


_CRASHING_WRITER = r"""
import asyncio, os, sys, json
from quiver.registry.storage import make_blob_store

async def main():
    store = make_blob_store(**json.loads(sys.argv[1]))
    block = os.urandom(1 << 20)

    async def body():
        for i in range(64):
            yield block
            if i == 12:
                print("halfway", flush=True)
            await asyncio.sleep(0.02)

    await store.put_stream(body())

asyncio.run(main())
"""


async def test_a_killed_writer_leaves_no_visible_blob(store, tmp_path):
    """SIGKILL mid-write: nothing is published; only stale temporaries remain to sweep."""
    import json
    import signal
    import subprocess
    import sys

    if isinstance(store, LocalBlobStore):
        settings = {"kind": "local", "root": str(store.root)}
    else:
        settings = {"kind": "s3", "endpoint": store.endpoint, "bucket": store.bucket,
                    "access_key": "testing", "secret_key": "testing", "region": "us-east-1"}
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_WRITER, json.dumps(settings)],
                            stdout=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=60)
        assert line.strip() == b"halfway"
        await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert await all_blobs(store) == []
    await asyncio.sleep(1.1)
    assert await store.cleanup_stale(older_than_s=1) >= (1 if store.kind == "local" else 0)
    assert await all_blobs(store) == []


async def test_stores_follow_the_protocol_and_take_any_bytes_like_chunks(store):
    assert isinstance(store, BlobStore)

    async def mixed():
        yield bytearray(b"ab")
        yield memoryview(b"cd")
        yield b""
        yield b"ef"

    assert await store.put_stream(mixed()) == (sha(b"abcdef"), 6)
    assert await store.read_prefix(sha(b"abcdef"), 3) == b"abc"


async def test_presigned_urls_for_a_public_endpoint(s3_bucket):
    port = s3_bucket["endpoint"].rsplit(":", 1)[1]
    store = make_blob_store("s3", endpoint=s3_bucket["endpoint"], bucket=s3_bucket["bucket"],
                            access_key=s3_bucket["access_key"],
                            secret_key=s3_bucket["secret_key"], region=s3_bucket["region"],
                            public_endpoint=f"http://localhost:{port}")
    digest, _ = await store.put_stream(chunks_of(b"public bytes"))
    url = await store.presigned_get_url(digest)
    assert url.startswith(f"http://localhost:{port}/")
    async with httpx.AsyncClient() as client:
        resp = await client.get(url)
    assert resp.status_code == 200 and resp.content == b"public bytes"
