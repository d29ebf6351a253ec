"""Events over Redis, blob collection, upload expiry and S3 presigned redirects."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import httpx

from quiver.events import RedisEventBus
from quiver.registry import crud
from tests.registry._util import (AUTH, BASE, RegistryProcess, folder_files, push_files,
                                  register_base)


async def test_events_go_out_through_redis(harness_factory, redis_url, tiny_llama, lora_adapter):
    async with harness_factory(redis_url=redis_url) as h:
        await register_base(h.client, tiny_llama)
        listener = RedisEventBus(redis_url)
        events = listener.subscribe()
        assert await asyncio.wait_for(anext(events), 10) is None      # subscribed
        r = await push_files(h.client, "evented", folder_files(lora_adapter), aliases=["prod"])
        assert r.status_code == 201
        got = [await asyncio.wait_for(anext(events), 10) for _ in range(2)]
        assert [(e.type, e.repo, e.version, e.alias) for e in got] == [
            ("version.ready", "evented", 1, None), ("alias.moved", "evented", 1, "prod")]
        assert got[0].revision == r.json()["revision"] and got[0].base_model == BASE
        await events.aclose()
        await listener.close()


async def test_shared_blobs_survive_until_the_last_user_goes(reg, lora_adapter):
    files = folder_files(lora_adapter)
    c = reg.client
    a = (await push_files(c, "first", files)).json()
    assert (await push_files(c, "second", files)).status_code == 201
    shas = [f["sha256"] for f in a["files"]]
    assert (await c.delete("/api/v1/repos/first", headers=AUTH)).status_code == 204
    for sha in shas:
        assert await reg.registry.store.exists(sha)
        assert (await c.get(f"/api/v1/blobs/{sha}")).status_code == 200
    assert (await c.post("/api/v1/gc", headers=AUTH)).json()["deleted_blobs"] == 0
    assert (await c.post("/api/v1/repos/second/-/versions/1/archive", headers=AUTH)).is_success
    assert (await c.post("/api/v1/gc", headers=AUTH)).json()["deleted_blobs"] == 0
    assert (await c.delete("/api/v1/repos/second", headers=AUTH)).status_code == 204
    for sha in shas:
        assert not await reg.registry.store.exists(sha)


async def test_expired_uploads_and_orphan_blobs_are_collected(harness_factory, tiny_llama,
                                                              lora_adapter):
    files = folder_files(lora_adapter)
    data = files["adapter_config.json"]
    sha = hashlib.sha256(data).hexdigest()
    async with harness_factory(upload_ttl_s=1) as h:
        c = h.client
        await register_base(c, tiny_llama)
        up = (await c.post("/api/v1/repos/slow/-/uploads", headers=AUTH, json={
            "metadata": {"base_model": BASE},
            "files": [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                      for p, d in files.items()]})).json()
        r = await c.put(f"/api/v1/uploads/{up['upload_id']}/blobs/{sha}/parts/0", content=data,
                        headers=AUTH)
        assert r.json() == {"received": [0]}
        # An orphan blob: stored, recorded, used by nothing.
        orphan = b"nobody uses me"
        o_sha, _ = await h.registry.store.put_stream(_once(orphan))
        await h.registry.db.run(lambda s: crud.record_blob(s, sha256=o_sha, size=len(orphan)))
        await asyncio.sleep(1.2)
        out = (await c.post("/api/v1/gc", headers=AUTH)).json()
        assert out == {"deleted_blobs": 1, "freed_bytes": len(orphan), "expired_uploads": 1}
        assert not await h.registry.store.exists(o_sha)
        assert await h.registry.store.list_parts(up["upload_id"], sha) == []
        state = (await c.get(f"/api/v1/uploads/{up['upload_id']}", headers=AUTH)).json()
        assert state["state"] == "expired"
        r = await c.post(f"/api/v1/uploads/{up['upload_id']}/commit", headers=AUTH)
        assert r.status_code == 409


async def _once(data: bytes):
    yield data


def test_s3_redirects_to_presigned_urls(tmp_path, s3_bucket, tiny_llama, lora_adapter,
                                        monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import snapshot_download

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    files = folder_files(lora_adapter)
    env = {"QUIVER_BLOB_STORE": "s3", "QUIVER_S3_ENDPOINT": s3_bucket["endpoint"],
           "QUIVER_S3_ACCESS_KEY": s3_bucket["access_key"],
           "QUIVER_S3_SECRET_KEY": s3_bucket["secret_key"], "QUIVER_S3_BUCKET": s3_bucket["bucket"],
           "QUIVER_S3_REDIRECT": "true"}
    with RegistryProcess(tmp_path / "data", **env) as proc, \
            httpx.Client(base_url=proc.url, headers=AUTH, timeout=30) as c:
        config = json.loads((tiny_llama / "config.json").read_text())
        assert c.post("/api/v1/base-models", json={"name": BASE, "config": config}).is_success
        r = c.post("/api/v1/repos/s3-repo/-/push",
                   data={"metadata": json.dumps({"base_model": BASE})},
                   files=[("f", (p, d)) for p, d in files.items()])
        assert r.status_code == 201, r.text
        weights = files["adapter_model.safetensors"]
        sha = hashlib.sha256(weights).hexdigest()
        r = c.get(f"/api/v1/blobs/{sha}")
        assert r.status_code == 302 and s3_bucket["endpoint"] in r.headers["location"]
        assert r.headers["etag"] == f'"{sha}"'
        direct = httpx.get(r.headers["location"], headers={"Range": "bytes=8-"})
        assert direct.status_code == 206 and direct.content == weights[8:]
        folder = snapshot_download("s3-repo", revision="1", endpoint=proc.url,
                                   token=AUTH["Authorization"].split()[1],
                                   cache_dir=tmp_path / "cache")
        assert {p: Path(folder, p).read_bytes() for p in files} == files


async def test_collection_also_runs_on_its_own(harness_factory):
    async with harness_factory(gc_interval_s=0.2) as h:
        orphan = b"collected without being asked"
        sha, _ = await h.registry.store.put_stream(_once(orphan))
        await h.registry.db.run(lambda s: crud.record_blob(s, sha256=sha, size=len(orphan)))
        for _ in range(50):
            if not await h.registry.store.exists(sha):
                break
            await asyncio.sleep(0.1)
        assert not await h.registry.store.exists(sha)
        assert (await h.client.get(f"/api/v1/blobs/{sha}")).status_code == 404
