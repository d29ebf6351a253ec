"""The local store's in-place part assembly: parts written at their offsets, hashed once at
completion and renamed into place; torn, short, long and re-sent parts."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os

import pytest

from quiver.errors import ChecksumMismatch, InvalidRequest, Unavailable
from quiver.registry.storage import LocalBlobStore, local
from quiver.registry.storage.base import PartAssembler, part_length

PART = 100_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def chunks_of(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def torn(data: bytes, after: int):
    """A request body that stops after ``after`` bytes, as when the client or server dies."""
    yield data[:after]
    raise ConnectionResetError("peer went away")


async def cancel_mid_part(store: LocalBlobStore, key: str, digest: str, part: int, head: bytes,
                          *, part_size: int, blob_size: int, after: float) -> None:
    """Send ``head`` as the start of part ``part``, stall, and cancel the request ``after``
    seconds in, as when the client goes away."""
    stall = asyncio.Event()

    async def stalled():
        for i in range(0, len(head), 65536):
            yield head[i:i + 65536]
        await stall.wait()

    task = asyncio.create_task(store.put_part_at(key, digest, part, stalled(),
                                                 part_size=part_size, blob_size=blob_size))
    await asyncio.sleep(after)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def pieces_of(data: bytes) -> list[bytes]:
    return [data[i:i + PART] for i in range(0, len(data), PART)]


@pytest.fixture
def store(tmp_path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "store")


def staged(store: LocalBlobStore, key: str, digest: str) -> set[str]:
    folder = store.root / "uploads" / key / digest
    return set(os.listdir(folder)) if folder.exists() else set()


def test_part_length():
    assert [part_length(k, 10, 25) for k in range(3)] == [10, 10, 5]
    assert part_length(0, 10, 0) == 0
    with pytest.raises(InvalidRequest):
        part_length(3, 10, 25)
    with pytest.raises(InvalidRequest):
        part_length(0, 0, 25)


async def test_out_of_order_and_concurrent_parts_assemble_in_place(store):
    assert isinstance(store, PartAssembler)
    data = os.urandom(4 * PART + 1234)
    digest = sha(data)
    pieces = pieces_of(data)
    put = [store.put_part_at("up", digest, k, chunks_of(p, 7000), part_size=PART,
                             blob_size=len(data)) for k, p in enumerate(pieces)]
    assert await put[4] == 1234
    assert await store.list_parts("up", digest) == [4]
    assert await asyncio.gather(put[2], put[0], put[3]) == [PART] * 3
    assert await store.list_parts("up", digest) == [0, 2, 3, 4]
    with pytest.raises(InvalidRequest) as info:
        await store.complete_parts("up", digest, 5, len(data))
    assert info.value.details["missing_parts"] == [1]
    await put[1]
    assert staged(store, "up", digest) >= {"assembly", "layout"}
    assert await store.complete_parts("up", digest, 5, len(data)) == (digest, len(data))
    assert await store.open_range(digest).read_all() == data
    assert await store.list_parts("up", digest) == []
    assert not (store.root / "uploads" / "up").exists()
    assert os.listdir(store.root / "tmp") == []


async def test_a_resent_part_replaces_the_first(store):
    data = os.urandom(3 * PART)
    digest = sha(data)
    pieces = pieces_of(data)
    await store.put_part_at("re", digest, 1, chunks_of(os.urandom(PART)), part_size=PART,
                            blob_size=len(data))
    for k in (0, 2):
        await store.put_part_at("re", digest, k, chunks_of(pieces[k]), part_size=PART,
                                blob_size=len(data))
    await store.put_part_at("re", digest, 1, chunks_of(pieces[1], 4096), part_size=PART,
                            blob_size=len(data))
    assert await store.list_parts("re", digest) == [0, 1, 2]
    assert await store.complete_parts("re", digest, 3, len(data)) == (digest, len(data))
    assert await store.open_range(digest).read_all() == data


async def test_a_torn_part_is_not_counted_after_a_restart(store, tmp_path):
    data = os.urandom(3 * PART)
    digest = sha(data)
    pieces = pieces_of(data)
    for k in (0, 1):
        await store.put_part_at("crash", digest, k, chunks_of(pieces[k]), part_size=PART,
                                blob_size=len(data))
    with pytest.raises(ConnectionResetError):
        await store.put_part_at("crash", digest, 2, torn(pieces[2], PART // 2), part_size=PART,
                                blob_size=len(data))
    # A re-send of a received part that tears un-counts it: its bytes may be half new.
    with pytest.raises(ConnectionResetError):
        await store.put_part_at("crash", digest, 0, torn(os.urandom(PART), 10), part_size=PART,
                                blob_size=len(data))
    restarted = LocalBlobStore(tmp_path / "store")
    assert await restarted.list_parts("crash", digest) == [1]
    with pytest.raises(InvalidRequest) as info:
        await restarted.complete_parts("crash", digest, 3, len(data))
    assert info.value.details["missing_parts"] == [0, 2]
    assert not await restarted.exists(digest)
    for k in (0, 2):
        await restarted.put_part_at("crash", digest, k, chunks_of(pieces[k]), part_size=PART,
                                    blob_size=len(data))
    assert await restarted.complete_parts("crash", digest, 3, len(data)) == (digest, len(data))
    assert await restarted.open_range(digest).read_all() == data


async def test_parts_of_the_wrong_length_are_refused_and_not_counted(store):
    data = os.urandom(2 * PART + 10)
    digest = sha(data)
    with pytest.raises(InvalidRequest):
        await store.put_part_at("len", digest, 0, chunks_of(data[:PART + 1]), part_size=PART,
                                blob_size=len(data))
    with pytest.raises(InvalidRequest):
        await store.put_part_at("len", digest, 2, chunks_of(data[:9]), part_size=PART,
                                blob_size=len(data))
    with pytest.raises(InvalidRequest):
        await store.put_part_at("len", digest, 3, chunks_of(b""), part_size=PART,
                                blob_size=len(data))
    assert await store.list_parts("len", digest) == []
    await store.put_part_at("len", digest, 0, chunks_of(data[:PART]), part_size=PART,
                            blob_size=len(data))
    with pytest.raises(InvalidRequest):    # another layout for the same staged blob
        await store.put_part_at("len", digest, 1, chunks_of(data[PART:2 * PART]),
                                part_size=PART // 2, blob_size=len(data))
    assert await store.list_parts("len", digest) == [0]


async def test_a_wrong_digest_publishes_nothing_and_drops_the_parts(store):
    data = os.urandom(2 * PART)
    digest = sha(data)
    await store.put_part_at("bad", digest, 0, chunks_of(data[:PART]), part_size=PART,
                            blob_size=len(data))
    await store.put_part_at("bad", digest, 1, chunks_of(os.urandom(PART)), part_size=PART,
                            blob_size=len(data))
    with pytest.raises(ChecksumMismatch):
        await store.complete_parts("bad", digest, 2, len(data))
    assert not await store.exists(digest)
    assert await store.list_parts("bad", digest) == []
    assert [b async for b in store.list_blobs()] == []


async def test_completing_with_another_size_is_refused(store):
    data = os.urandom(PART)
    digest = sha(data)
    await store.put_part_at("size", digest, 0, chunks_of(data), part_size=PART,
                            blob_size=len(data))
    with pytest.raises(InvalidRequest):
        await store.complete_parts("size", digest, 1, len(data) - 1)
    assert not await store.exists(digest)


async def test_an_empty_blob(store):
    digest = sha(b"")
    assert await store.put_part_at("empty", digest, 0, chunks_of(b""), part_size=PART,
                                   blob_size=0) == 0
    assert await store.list_parts("empty", digest) == [0]
    assert await store.complete_parts("empty", digest, 1, 0) == (digest, 0)
    assert await store.open_range(digest).read_all() == b""


def running_end(store: LocalBlobStore, key: str, digest: str) -> int | None:
    prefix = store._prefixes.get(store.root / "uploads" / key / digest)
    return None if prefix is None else prefix.end


async def test_parts_in_order_or_caught_up_are_hashed_before_completion(store):
    data = os.urandom(3 * PART + 7)
    digest = sha(data)
    pieces = pieces_of(data)
    for k in (1, 3):
        await store.put_part_at("run", digest, k, chunks_of(pieces[k]), part_size=PART,
                                blob_size=len(data))
    assert running_end(store, "run", digest) is None
    await store.put_part_at("run", digest, 0, chunks_of(pieces[0]), part_size=PART,
                            blob_size=len(data))
    assert running_end(store, "run", digest) == 2 * PART       # 0 as it passed, 1 caught up
    await store.put_part_at("run", digest, 2, chunks_of(pieces[2]), part_size=PART,
                            blob_size=len(data))
    assert running_end(store, "run", digest) == len(data)
    assert await store.complete_parts("run", digest, 4, len(data)) == (digest, len(data))
    assert await store.open_range(digest).read_all() == data
    assert running_end(store, "run", digest) is None


async def test_a_hashed_part_rewritten_elsewhere_is_hashed_again(store, tmp_path):
    """Another process rewrites a part the running hash covers: completing must not trust it."""
    data = os.urandom(3 * PART)
    digest = sha(data)
    for k, piece in enumerate(pieces_of(data)):
        await store.put_part_at("other", digest, k, chunks_of(piece), part_size=PART,
                                blob_size=len(data))
    assert running_end(store, "other", digest) == len(data)
    elsewhere = LocalBlobStore(tmp_path / "store")
    await elsewhere.put_part_at("other", digest, 1, chunks_of(os.urandom(PART)), part_size=PART,
                                blob_size=len(data))
    with pytest.raises(ChecksumMismatch):
        await store.complete_parts("other", digest, 3, len(data))
    assert not await store.exists(digest)
    assert [b async for b in store.list_blobs()] == []


async def test_rewriting_a_hashed_part_here_restarts_the_running_hash(store):
    data = os.urandom(2 * PART)
    digest = sha(data)
    pieces = pieces_of(data)
    await store.put_part_at("again", digest, 0, chunks_of(os.urandom(PART)), part_size=PART,
                            blob_size=len(data))
    await store.put_part_at("again", digest, 1, chunks_of(pieces[1]), part_size=PART,
                            blob_size=len(data))
    assert running_end(store, "again", digest) == len(data)
    await store.put_part_at("again", digest, 0, chunks_of(pieces[0]), part_size=PART,
                            blob_size=len(data))
    assert running_end(store, "again", digest) == len(data)    # restarted from part 0
    assert await store.complete_parts("again", digest, 2, len(data)) == (digest, len(data))
    assert await store.open_range(digest).read_all() == data


async def test_a_second_upload_of_the_same_part_waits_for_the_first(store):
    data = os.urandom(PART)
    digest = sha(data)
    gate = asyncio.Event()

    async def slow():
        yield data[:10]
        await gate.wait()
        yield data[10:]

    first = asyncio.create_task(store.put_part_at("dup", digest, 0, slow(), part_size=PART,
                                                  blob_size=len(data)))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(store.put_part_at("dup", digest, 0, chunks_of(data),
                                                   part_size=PART, blob_size=len(data)))
    await asyncio.sleep(0.3)
    assert not second.done()
    gate.set()
    assert await first == await second == PART
    assert await store.complete_parts("dup", digest, 1, len(data)) == (digest, len(data))


async def test_a_cancelled_part_releases_its_locks(store):
    """A request cancelled mid-part (the client went away) leaves nothing locked."""
    data = os.urandom(2 * PART)
    digest = sha(data)
    pieces = pieces_of(data)
    await cancel_mid_part(store, "gone", digest, 1, pieces[1][:10], part_size=PART,
                          blob_size=len(data), after=0.2)
    assert await store.list_parts("gone", digest) == []
    for k in (0, 1):
        await asyncio.wait_for(store.put_part_at("gone", digest, k, chunks_of(pieces[k]),
                                                 part_size=PART, blob_size=len(data)), 5)
    assert await store.complete_parts("gone", digest, 2, len(data)) == (digest, len(data))
    assert await store.open_range(digest).read_all() == data


async def test_parts_of_many_batches_survive_tearing_and_cancelling(store):
    """Parts large enough that several batches wait for the writer thread: a torn one and a
    cancelled one leave no count, no lock and no open file, and the re-sent parts complete."""
    big = 5 * (1 << 20) + 321                # five 1 MiB write batches and a bit
    data = os.urandom(2 * big)
    digest = sha(data)
    first, second = data[:big], data[big:]
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConnectionResetError):
        await store.put_part_at("many", digest, 0, torn(first, 4 * (1 << 20) + 17),
                                part_size=big, blob_size=len(data))
    await cancel_mid_part(store, "many", digest, 1, second[:3 << 20], part_size=big,
                          blob_size=len(data), after=0.3)
    assert await store.list_parts("many", digest) == []
    for _ in range(50):                       # the writer threads close their files as they end
        if len(os.listdir("/proc/self/fd")) <= fds:
            break
        await asyncio.sleep(0.02)
    assert len(os.listdir("/proc/self/fd")) <= fds
    for k, piece in enumerate((first, second)):
        await asyncio.wait_for(store.put_part_at("many", digest, k, chunks_of(piece),
                                                 part_size=big, blob_size=len(data)), 10)
    assert await store.complete_parts("many", digest, 2, len(data)) == (digest, len(data))
    assert await store.open_range(digest).read_all() == data


async def put_all(store: LocalBlobStore, key: str, data: bytes) -> str:
    digest = sha(data)
    for k, piece in enumerate(pieces_of(data)):
        await store.put_part_at(key, digest, k, chunks_of(piece), part_size=PART,
                                blob_size=len(data))
    return digest


@pytest.mark.parametrize("fsync", [True, False])
async def test_parts_are_flushed_to_disk_while_they_arrive(tmp_path, monkeypatch, fsync):
    store = LocalBlobStore(tmp_path / "store", fsync=fsync)
    monkeypatch.setattr(local, "_FLUSH_EVERY", PART // 2)
    flushed: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        flushed.append(os.fstat(fd).st_ino)
        real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    data = os.urandom(3 * PART)
    digest = await put_all(store, "flush", data)
    assembly = os.stat(store.root / "uploads" / "flush" / digest / "assembly").st_ino
    assert await store.complete_parts("flush", digest, 3, len(data)) == (digest, len(data))
    if fsync:
        assert flushed and set(flushed) == {assembly}
    else:
        assert flushed == []
    assert await store.open_range(digest).read_all() == data
    assert store._flushes == {}


async def test_a_failed_background_flush_publishes_nothing(store, monkeypatch):
    monkeypatch.setattr(local, "_FLUSH_EVERY", PART // 2)
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", failing)
    data = os.urandom(3 * PART)
    digest = await put_all(store, "eio", data)
    with pytest.raises(Unavailable) as info:
        await store.complete_parts("eio", digest, 3, len(data))
    assert info.value.code == "unavailable"
    assert "could not be written to disk" in info.value.message
    assert not await store.exists(digest)
    assert await store.list_parts("eio", digest) == []
    # The parts sent again, to a disk that works again, publish.
    monkeypatch.setattr(os, "fdatasync", real)
    await put_all(store, "eio", data)
    assert await store.complete_parts("eio", digest, 3, len(data)) == (digest, len(data))
    assert await store.open_range(digest).read_all() == data
