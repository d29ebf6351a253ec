"""The client against a real registry: push, pull, cache, resume, manage."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from quiver.client import AsyncClient, Client, ClientSettings
from quiver.client.up import write_demo_adapter
from quiver.errors import (
    AliasNotFound, Forbidden, IncompatibleAdapter, InvalidAdapter, InvalidReference,
    RepoNotFound, Unauthorized, VersionNotFound,
)


class Recorder(httpx.HTTPTransport):
    """A real HTTP transport that remembers every request and can fail chosen ones."""

    def __init__(self, crash_after_parts: int | None = None, part_delay: float = 0.0):
        super().__init__()
        self.requests: list[tuple[str, str, str | None]] = []
        self.parts_ok: list[str] = []
        self.crash_after_parts = crash_after_parts
        self.part_delay = part_delay

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if "/parts/" in path and self.crash_after_parts is not None \
                and len(self.parts_ok) >= self.crash_after_parts:
            raise RuntimeError("simulated crash")
        if "/parts/" in path:
            time.sleep(self.part_delay)
        self.requests.append((request.method, path, request.headers.get("range")))
        response = super().handle_request(request)
        if "/parts/" in path and response.status_code == 200:
            self.parts_ok.append(path)
        return response

    def blob_gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and "/api/v1/blobs/" in r[1]]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _client(registry, token=True, **kw) -> Client:
    transport = kw.pop("transport", None)
    settings = ClientSettings(registry_url=registry["url"],
                              token=registry["token"] if token else None, **kw)
    return Client(settings=settings, transport=transport)


def test_push_pull_round_trip_and_cache_hit(registry, tiny_base, lora_adapter, tmp_path):
    with _client(registry) as c:
        info = c.push(lora_adapter, "team/rt", base_model=tiny_base, description="round trip",
                      examples=["hello there", "general kenobi"], labels={"lang": "en"},
                      aliases=["prod"])
    assert info.ref == "team/rt/1" and info.status == "ready" and len(info.revision) == 40
    assert info.peft is not None and info.peft.r == 8
    assert info.examples == ["hello there", "general kenobi"] and info.labels == {"lang": "en"}

    rec = Recorder()
    with _client(registry, token=False, transport=rec) as c:
        path = c.pull("team/rt@prod")
        assert _files(path) == _files(lora_adapter)
        assert len(rec.blob_gets()) == len(info.files)
        again = c.pull("team/rt/1")
        out = c.pull("team/rt", tmp_path / "copy")
    assert again == path
    assert len(rec.blob_gets()) == len(info.files)          # the cache answered both
    assert _files(out) == _files(lora_adapter)


def test_interrupted_pull_resumes_from_the_partial_file(registry, tiny_base, tmp_path):
    adapter = write_demo_adapter(tmp_path / "a", _tiny_config(), r=32,
                                 modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    with _client(registry) as c:
        info = c.push(adapter, "team/resume-pull", base_model=tiny_base)
    entry = next(f for f in info.files if f.path == "adapter_model.safetensors")
    half = entry.size // 2
    rec = Recorder()
    with _client(registry, token=False, transport=rec) as c:
        c.cache.partial_path(entry.sha256).write_bytes(weights[:half])
        path = c.pull("team/resume-pull/1")
    assert (path / "adapter_model.safetensors").read_bytes() == weights
    ranges = [r[2] for r in rec.blob_gets() if entry.sha256 in r[1]]
    assert ranges == [f"bytes={half}-{entry.size - 1}"]


def test_interrupted_push_resumes_without_resending_parts(registry, tiny_base, tmp_path):
    adapter = _several_parts(tmp_path / "big", seed=7)
    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert size > 5 * 64 * 1024      # several 64 KiB parts
    crash = Recorder(crash_after_parts=3)
    with _client(registry, transport=crash, multipart_push_limit=0, parallel_uploads=1) as c:
        with pytest.raises(RuntimeError, match="simulated crash"):
            c.push(adapter, "team/resume-push", base_model=tiny_base)
    sent_first = set(crash.parts_ok)
    assert len(sent_first) == 3
    with pytest.raises(RepoNotFound):
        _client(registry).list_versions("team/resume-push")

    again = Recorder()
    with _client(registry, transport=again, multipart_push_limit=0, parallel_uploads=4) as c:
        info = c.push(adapter, "team/resume-push", base_model=tiny_base)
        assert info.ref == "team/resume-push/1"
        path = c.pull(info.ref)
    assert not sent_first & set(again.parts_ok)
    assert len(sent_first) + len(again.parts_ok) == -(-size // (64 * 1024)) + 1  # + config
    assert _files(path) == _files(adapter)
    assert not any(p.name.endswith(".json") for p in (c.cache.root / "uploads").iterdir())


def test_push_sends_files_while_hashing_them_and_resumes(registry, tiny_base, tmp_path):
    adapter = _several_parts(tmp_path / "big", seed=11)
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    w_sha = hashlib.sha256(weights).hexdigest()
    opts = dict(multipart_push_limit=0, parallel_uploads=1, hash_while_sending=0,
                cache_dir=tmp_path / "cache")
    crash = Recorder(crash_after_parts=3)
    with _client(registry, transport=crash, **opts) as c:
        with pytest.raises(RuntimeError, match="simulated crash"):
            c.push(adapter, "team/hash-later", base_model=tiny_base)
    assert len(crash.parts_ok) == 3
    assert not any(w_sha in p for p in crash.parts_ok)     # sent under the registry's key

    again = Recorder()
    with _client(registry, transport=again, **opts) as c:
        info = c.push(adapter, "team/hash-later", base_model=tiny_base)
        path = c.pull(info.ref)
    assert any(r[1].endswith("/declare") for r in again.requests)
    assert not set(crash.parts_ok) & set(again.parts_ok)
    by_key = Counter(p.split("/blobs/")[1].split("/")[0] for p in crash.parts_ok + again.parts_ok)
    assert max(by_key.values()) == -(-len(weights) // (64 * 1024))   # each part sent once
    assert {f.path: f.sha256 for f in info.files} == {
        name: hashlib.sha256(data).hexdigest() for name, data in _files(adapter).items()}
    assert _files(path) == _files(adapter)


def test_declared_hash_of_a_stored_blob_stops_the_upload(registry, tiny_base, tmp_path):
    adapter = _several_parts(tmp_path / "big", seed=12)
    size = (adapter / "adapter_model.safetensors").stat().st_size
    with _client(registry, multipart_push_limit=0, cache_dir=tmp_path / "c1") as c:
        first = c.push(adapter, "team/dedup-a", base_model=tiny_base)
    # A fresh cache does not remember the hashes; each part waits long enough for the
    # declaration to come back first.
    slow = Recorder(part_delay=0.3)
    with _client(registry, transport=slow, multipart_push_limit=0, parallel_uploads=1,
                 hash_while_sending=0, cache_dir=tmp_path / "c2") as c:
        second = c.push(adapter, "team/dedup-b", base_model=tiny_base)
    assert second.ref == "team/dedup-b/1"
    assert [f.sha256 for f in second.files] == [f.sha256 for f in first.files]
    assert -(-size // (64 * 1024)) >= 5
    assert len(slow.parts_ok) <= 1       # at most the part already on its way


def test_parts_sent_with_sendfile_land_and_refusals_come_back_typed(registry, tiny_base,
                                                                    tmp_path, monkeypatch):
    from quiver.client import _rawhttp

    sent: list[tuple[str, int, int]] = []
    put_file = _rawhttp.RawHTTP.put_file

    def spy(self, path, file, offset, length, **kw):
        sent.append((path, offset, length))
        return put_file(self, path, file, offset, length, **kw)

    monkeypatch.setattr(_rawhttp.RawHTTP, "put_file", spy)
    adapter = _several_parts(tmp_path / "lean", seed=21)
    weights = adapter / "adapter_model.safetensors"
    with _client(registry, multipart_push_limit=0, parallel_uploads=2,
                 cache_dir=tmp_path / "c1") as c:
        info = c.push(adapter, "team/lean", base_model=tiny_base)
        assert _files(c.pull(info.ref)) == _files(adapter)
    by_key: dict[str, list[tuple[int, int]]] = {}
    for path, offset, length in sent:            # .../blobs/{key}/parts/{k}
        by_key.setdefault(path.split("/")[-3], []).append((offset, length))
    size = weights.stat().st_size
    assert size > 3 * 64 * 1024
    assert any(sorted(v) == [(k * 64 * 1024, min(64 * 1024, size - k * 64 * 1024))
                             for k in range(len(v))] and sum(n for _, n in v) == size
               for v in by_key.values())             # every byte of the weights, once
    # A header the registry refuses once part 0 is in: the typed error, and no version.
    raw = bytearray(weights.read_bytes())
    raw[8:9] = b"["
    weights.write_bytes(bytes(raw))
    with _client(registry, multipart_push_limit=0, cache_dir=tmp_path / "c2") as c:
        with pytest.raises(InvalidAdapter):
            c.push(adapter, "team/lean-bad", base_model=tiny_base)
        with pytest.raises(RepoNotFound):
            c.resolve("team/lean-bad")


def test_listing_aliases_archive_delete(registry, tiny_base, tmp_path):
    with _client(registry) as c:
        for seed in range(3):
            write_demo_adapter(tmp_path / f"v{seed}", _tiny_config(), seed=seed)
            c.push(tmp_path / f"v{seed}", "team/life", base_model=tiny_base,
                   task_description="greetings")
        assert sorted(v.version for v in c.list_versions("team/life")) == [1, 2, 3]
        assert c.resolve("team/life").version == 3
        assert c.set_alias("team/life", "stable", 2).version == 2
        assert c.resolve("team/life@stable").version == 2
        assert c.repo_info("team/life").aliases == {"stable": 2}
        assert any(r.name == "team/life" for r in c.list_repos(namespace="team"))
        refs = {v.ref for v in c.list_all_versions(base_model=tiny_base)}
        assert {"team/life/1", "team/life/2", "team/life/3"} <= refs
        assert c.archive("team/life/3").status == "archived"
        assert c.resolve("team/life").version == 2
        c.delete_alias("team/life", "stable")
        with pytest.raises(AliasNotFound):
            c.resolve("team/life@stable")
        c.delete("team/life/1")
        with pytest.raises(VersionNotFound):
            c.resolve("team/life/1")
        c.delete("team/life")
        with pytest.raises(RepoNotFound):
            c.resolve("team/life")


def test_typed_errors(registry, tiny_base, lora_adapter, tiny_qwen2):
    with _client(registry, token=False) as anon, pytest.raises(Unauthorized):
        anon.push(lora_adapter, "team/anon", base_model=tiny_base)
    with _client(registry) as c:
        reader = c.create_token("reader", ["read"])
        assert c.whoami()["scopes"]
        with pytest.raises(InvalidReference):
            c.resolve("Not A Ref!")
    with Client(registry["url"], reader["token"]) as r, pytest.raises(Forbidden):
        r.push(lora_adapter, "team/ro", base_model=tiny_base)
    with _client(registry) as c:
        c.add_base_model({**_tiny_config(), "hidden_size": 128}, "wide-llama")
        with pytest.raises(IncompatibleAdapter):
            c.push(lora_adapter, "team/wrong-base", base_model="wide-llama")


async def test_async_client_reads_and_downloads(registry, tiny_base, lora_adapter, tmp_path):
    with _client(registry) as c:
        c.push(lora_adapter, "team/async", base_model=tiny_base)
    async with AsyncClient(registry["url"]) as ac:
        info = await ac.resolve("team/async")
        assert [v.ref for v in await ac.list_versions("team/async")] == ["team/async/1"]
        assert "team/async/1" in {v.ref for v in await ac.list_all_versions(base_model=tiny_base)}
        assert any(r.name == "team/async" for r in await ac.list_repos())
        assert (await ac.get_base_model(tiny_base)).hidden_size == 64
        assert tiny_base in {b.name for b in await ac.list_base_models()}
        dest = await ac.download_version(info, tmp_path / "slot")
    assert _files(dest) == _files(lora_adapter)
    for f in info.files:
        assert hashlib.sha256((dest / f.path).read_bytes()).hexdigest() == f.sha256


def _several_parts(folder: Path, seed: int) -> Path:
    """A tiny-Llama adapter whose weights span several of the registry's 64 KiB parts."""
    return write_demo_adapter(folder, _tiny_config(), r=128,
                              modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=seed)


def _tiny_config() -> dict:
    from tests._models import TINY_CONFIGS

    return dict(TINY_CONFIGS["llama"])
