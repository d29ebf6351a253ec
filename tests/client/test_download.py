"""Downloads into the cache: parallel ranges, resume, verification, retries (sync and async)."""

from __future__ import annotations

import os

import pytest

from quiver.client import AsyncClient, Client, ClientSettings
from quiver.errors import BlobNotFound, ChecksumMismatch, UnsafeFile

MiB = 1 << 20


def _client(url: str, **kw) -> Client:
    settings = ClientSettings(registry_url=url, **kw)
    return Client(settings=settings)


def _payload(n: int, seed: int = 0) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[seed:seed + n]


def test_parallel_ranged_download_is_byte_exact(blob_server, tmp_path):
    big = os.urandom(3 * MiB + 12345)
    info = blob_server.version({"adapter_model.safetensors": big, "adapter_config.json": b"{}"})
    with _client(blob_server.url, part_size=256 * 1024, parallel_threshold=0,
                 parallel_downloads=4) as c:
        path = c.download_version(info)
    assert (path / "adapter_model.safetensors").read_bytes() == big
    assert (path / "adapter_config.json").read_bytes() == b"{}"
    big_sha = info.files[0].sha256
    ranges = [s.range for s in blob_server.log if s.sha256 == big_sha]
    assert len(ranges) == 13 and all(r.startswith("bytes=") for r in ranges)
    assert blob_server.bytes_sent(big_sha) == len(big)


def test_second_pull_fetches_nothing(blob_server):
    info = blob_server.version({"w.bin": os.urandom(200_000)})
    with _client(blob_server.url) as c:
        first = c.download_version(info)
        n = len(blob_server.log)
        second = c.download_version(info)
    assert first == second and len(blob_server.log) == n


def test_resume_fetches_only_the_rest_of_a_truncated_partial(blob_server):
    data = os.urandom(1 * MiB)
    info = blob_server.version({"w.bin": data})
    entry = info.files[0]
    with _client(blob_server.url) as c:
        c.cache.partial_path(entry.sha256).write_bytes(data[:400_000])
        path = c.download_version(info)
    assert (path / "w.bin").read_bytes() == data
    assert blob_server.bytes_sent() == len(data) - 400_000
    assert blob_server.log[0].range == f"bytes=400000-{len(data) - 1}"


def test_resume_with_parallel_chunks_uses_the_progress_record(blob_server):
    data = os.urandom(2 * MiB)
    info = blob_server.version({"w.bin": data})
    sha = info.files[0].sha256
    blob_server.cut_after[sha] = 100_000   # the first range request dies early, every retry too
    with _client(blob_server.url, part_size=512 * 1024, parallel_threshold=0,
                 parallel_downloads=1) as c:
        path = c.download_version(info)
    assert (path / "w.bin").read_bytes() == data
    # One cut connection: the retry asked only for the bytes after the cut.
    assert blob_server.bytes_sent(sha) == len(data)
    assert any(s.range == "bytes=100000-524287" for s in blob_server.log)


def test_tampered_cache_file_is_fetched_again(blob_server):
    data = os.urandom(300_000)
    info = blob_server.version({"w.bin": data})
    with _client(blob_server.url) as c:
        path = c.download_version(info)
        pulled = path / "w.bin"       # a hard link to the cached blob
        os.chmod(pulled, 0o644)
        with open(pulled, "r+b") as fh:
            fh.write(b"evil")
        again = c.download_version(info)
    assert (again / "w.bin").read_bytes() == data
    assert blob_server.bytes_sent() == 2 * len(data)


def test_corrupt_transfer_is_retried_once(blob_server):
    data = os.urandom(100_000)
    info = blob_server.version({"w.bin": data})
    blob_server.corrupt.add(info.files[0].sha256)
    with _client(blob_server.url) as c:
        path = c.download_version(info)
    assert (path / "w.bin").read_bytes() == data
    assert len(blob_server.log) == 2


def test_wrong_manifest_hash_raises_checksum_mismatch(blob_server):
    info = blob_server.version({"w.bin": b"x" * 1000})
    info.files[0].sha256 = "0" * 64
    blob_server.blobs["0" * 64] = b"y" * 1000
    with _client(blob_server.url) as c, pytest.raises(ChecksumMismatch):
        c.download_version(info)
    assert not c.cache.blob_path("0" * 64).exists()


def test_missing_blob_is_a_typed_error(blob_server):
    info = blob_server.version({"w.bin": b"abc"})
    blob_server.blobs.clear()
    with _client(blob_server.url) as c, pytest.raises(BlobNotFound):
        c.download_version(info)


def test_unsafe_paths_in_a_manifest_are_refused(blob_server, tmp_path):
    info = blob_server.version({"../escape": b"abc"})
    with _client(blob_server.url) as c, pytest.raises(UnsafeFile):
        c.download_version(info, tmp_path / "out")
    assert not (tmp_path / "escape").exists() and not blob_server.log


def test_out_dir_gets_writable_copies(blob_server, tmp_path):
    info = blob_server.version({"a/b.txt": b"hello", "c.bin": b"\x00" * 10})
    with _client(blob_server.url) as c:
        out = c.download_version(info, tmp_path / "out")
        (out / "a" / "b.txt").write_bytes(b"changed")
        assert c.cache.has_blob(info.files[0])
    assert out == tmp_path / "out" and (out / "c.bin").read_bytes() == b"\x00" * 10


def test_empty_file_needs_no_request(blob_server):
    info = blob_server.version({"empty": b"", "x": b"1"})
    with _client(blob_server.url) as c:
        path = c.download_version(info)
    assert (path / "empty").read_bytes() == b""
    assert [s.sha256 for s in blob_server.log] == [info.files[1].sha256]


async def test_async_download_verifies_resumes_and_retries(blob_server, tmp_path):
    data = os.urandom(700_000)
    other = os.urandom(5000)
    info = blob_server.version({"w.bin": data, "cfg.json": other})
    sha = info.files[0].sha256
    blob_server.cut_after[sha] = 50_000
    blob_server.corrupt.add(info.files[1].sha256)
    async with AsyncClient(blob_server.url) as c:
        dest = await c.download_version(info, tmp_path / "slot")
        assert (dest / "w.bin").read_bytes() == data
        assert (dest / "cfg.json").read_bytes() == other
        assert any(s.range == f"bytes=50000-{len(data) - 1}" for s in blob_server.log)
        n = len(blob_server.log)
        again = await c.download_version(info, tmp_path / "slot2")
        assert len(blob_server.log) == n and (again / "w.bin").read_bytes() == data


async def test_async_resume_from_partial_left_by_another_process(blob_server, tmp_path):
    data = os.urandom(400_000)
    info = blob_server.version({"w.bin": data})
    async with AsyncClient(blob_server.url) as c:
        c.cache.partial_path(info.files[0].sha256).write_bytes(data[:123_456])
        dest = await c.download_version(info, tmp_path / "d")
    assert (dest / "w.bin").read_bytes() == data
    assert blob_server.bytes_sent() == len(data) - 123_456


def test_server_ignoring_range_still_resumes_correctly(blob_server):
    data = os.urandom(600_000)
    info = blob_server.version({"w.bin": data})
    blob_server.ignore_range = True
    with _client(blob_server.url) as c:
        c.cache.partial_path(info.files[0].sha256).write_bytes(data[:250_000])
        path = c.download_version(info)
    assert (path / "w.bin").read_bytes() == data
    # The lean path declines a 200 to a range request; httpx reads on past the held bytes.
    assert blob_server.log and all(s.status == 200 for s in blob_server.log)


def test_concurrent_pulls_share_one_download(blob_server):
    import threading

    data = os.urandom(2 * MiB)
    info = blob_server.version({"w.bin": data})
    paths, errors = [], []

    def pull() -> None:
        try:
            with _client(blob_server.url) as c:
                paths.append(c.download_version(info))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(paths) == 3
    assert all((p / "w.bin").read_bytes() == data for p in paths)
    assert blob_server.bytes_sent() == len(data)


def test_hard_killed_parallel_pull_resumes_from_its_record(blob_server, client_env):
    import subprocess
    import sys
    import time

    data = os.urandom(4 * MiB)
    info = blob_server.version({"w.bin": data})
    sha = info.files[0].sha256
    blob_server.delay = 0.1           # 4 workers x 640 KiB/s: over 1.5 s for the whole blob
    script = (
        "import sys; from quiver.client import Client, ClientSettings; "
        "from quiver.wire import VersionInfo; "
        "info = VersionInfo.model_validate_json(sys.stdin.read()); "
        f"s = ClientSettings(registry_url={blob_server.url!r}, part_size=512 * 1024, "
        "parallel_threshold=0, parallel_downloads=4); "
        "Client(settings=s).download_version(info)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, text=True)
    proc.stdin.write(info.model_dump_json())
    proc.stdin.close()
    partial = client_env / "cache" / "partial" / sha
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not partial.exists():
        time.sleep(0.02)
    time.sleep(0.8)                   # past at least one periodic progress record
    proc.kill()                       # SIGKILL: no handler runs
    proc.wait()
    first = blob_server.bytes_sent(sha)
    assert 0 < first < len(data)

    blob_server.delay = 0.0
    with _client(blob_server.url, part_size=512 * 1024, parallel_threshold=0) as c:
        path = c.download_version(info)
    assert (path / "w.bin").read_bytes() == data
    # The resumed pull fetched less than the whole blob: the record told it what was on disk.
    assert blob_server.bytes_sent(sha) - first < len(data)


def test_the_hashed_frontier_takes_writes_in_any_order(tmp_path):
    """Writes at the frontier are hashed from their buffer, writes ahead of it from the file
    once it gets there; the digest is the file's either way."""
    import hashlib

    from quiver.client._download import _Frontier

    data = os.urandom(5 * 100_000 + 7)
    path = tmp_path / "blob"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        frontier = _Frontier(fd)
        pieces = [(p, data[p:p + 100_000]) for p in range(0, len(data), 100_000)]
        for pos, piece in [pieces[2], pieces[0], pieces[3], pieces[1], pieces[5], pieces[4]]:
            os.pwrite(fd, piece, pos)
            frontier.feed(pos, piece)
            if pos == 0:
                assert frontier.at == 100_000            # hashed from the buffer
            if pos == 100_000:
                assert frontier.at == 200_000            # piece 2 waits for the catch-up
                frontier.catch_up(400_000)
                assert frontier.at == 400_000
        assert frontier.at == 500_000        # 4 from its buffer; 5, written first, waits
        frontier.catch_up(len(data))
        assert frontier.at == len(data)
        assert frontier.hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)
