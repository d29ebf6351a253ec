"""Manifest-first resumable uploads and blob downloads, on the local store and on S3 (moto)."""

from __future__ import annotations

import hashlib
import math

from tests.registry._util import (AUTH, BASE, assert_error, folder_files, push_files,
                                  register_base)

PART = 4096


def manifest(files: dict[str, bytes]) -> list[dict]:
    return [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for p, d in files.items()]


def parts_of(data: bytes) -> list[bytes]:
    return [data[i:i + PART] for i in range(0, max(len(data), 1), PART)]


async def send_parts(c, upload_id: str, data: bytes, only: list[int] | None = None) -> dict:
    sha = hashlib.sha256(data).hexdigest()
    out = {}
    for k, chunk in enumerate(parts_of(data)):
        if only is not None and k not in only:
            continue
        r = await c.put(f"/api/v1/uploads/{upload_id}/blobs/{sha}/parts/{k}", content=chunk,
                        headers=AUTH)
        assert r.status_code == 200, r.text
        out = r.json()
    return out


async def test_manifest_upload_resumes_and_dedups(harness_factory, store_kw, tiny_llama,
                                                  lora_adapter):
    files = folder_files(lora_adapter)
    weights = files["adapter_model.safetensors"]
    w_sha = hashlib.sha256(weights).hexdigest()
    n_parts = math.ceil(len(weights) / PART)
    assert n_parts >= 3
    async with harness_factory(part_size=PART, **store_kw) as h:
        c = h.client
        await register_base(c, tiny_llama)
        r = await c.post("/api/v1/repos/big/-/uploads", headers=AUTH, json={
            "metadata": {"base_model": BASE, "aliases": ["prod"]}, "files": manifest(files)})
        assert r.status_code == 201, r.text
        up = r.json()
        assert sorted(up["missing"]) == sorted({f["sha256"] for f in manifest(files)})
        assert up["part_size"] == PART
        uid = up["upload_id"]

        # Everything but the last part of the weights arrives, then the connection "drops".
        for path, data in files.items():
            await send_parts(c, uid, data, only=None if path != "adapter_model.safetensors"
                             else list(range(n_parts - 1)))
        state = (await c.get(f"/api/v1/uploads/{uid}", headers=AUTH)).json()
        assert state["state"] == "open"
        assert state["received"][w_sha] == list(range(n_parts - 1))
        err = assert_error(await c.post(f"/api/v1/uploads/{uid}/commit", headers=AUTH), 409,
                           "conflict")
        assert err["details"]["missing_parts"] == {w_sha: [n_parts - 1]}
        assert_error(await c.get("/api/v1/resolve/big"), 404, "repo_not_found")

        # Resume: only the missing part is sent.
        await send_parts(c, uid, weights, only=[n_parts - 1])
        r = await c.post(f"/api/v1/uploads/{uid}/commit", headers=AUTH)
        assert r.status_code == 201, r.text
        v1 = r.json()
        assert v1["version"] == 1 and v1["aliases"] == ["prod"] and v1["status"] == "ready"
        again = await c.post(f"/api/v1/uploads/{uid}/commit", headers=AUTH)
        assert again.status_code == 201 and again.json()["revision"] == v1["revision"]
        state = (await c.get(f"/api/v1/uploads/{uid}", headers=AUTH)).json()
        assert state["state"] == "committed" and state["version"] == "big/1"
        assert state["missing"] == []

        # The same content pushed again is not asked for: shared blobs are stored once.
        r = await c.post("/api/v1/repos/other/-/uploads", headers=AUTH,
                         json={"metadata": {"base_model": BASE}, "files": manifest(files)})
        assert r.json()["missing"] == []
        r = await c.post(f"/api/v1/uploads/{r.json()['upload_id']}/commit", headers=AUTH)
        assert r.status_code == 201 and r.json()["ref"] == "other/1"

        # Downloads: whole, ranged, suffix, HEAD, past the end.
        url = f"/api/v1/blobs/{w_sha}"
        r = await c.get(url)
        assert r.status_code == 200 and r.content == weights
        assert r.headers["etag"] == f'"{w_sha}"' and r.headers["accept-ranges"] == "bytes"
        r = await c.get(url, headers={"Range": "bytes=100-"})
        assert r.status_code == 206 and r.content == weights[100:]
        assert r.headers["content-range"] == f"bytes 100-{len(weights) - 1}/{len(weights)}"
        r = await c.get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == weights[10:20]
        r = await c.get(url, headers={"Range": "bytes=-7"})
        assert r.status_code == 206 and r.content == weights[-7:]
        r = await c.head(url)
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(weights)
        r = await c.get(url, headers={"Range": f"bytes={len(weights)}-"})
        assert_error(r, 416, "range_not_satisfiable")
        assert r.headers["content-range"] == f"bytes */{len(weights)}"


async def test_corrupt_part_is_refused_and_can_be_resent(harness_factory, store_kw, tiny_llama,
                                                         lora_adapter):
    files = folder_files(lora_adapter)
    weights = files["adapter_model.safetensors"]
    w_sha = hashlib.sha256(weights).hexdigest()
    async with harness_factory(part_size=PART, **store_kw) as h:
        c = h.client
        await register_base(c, tiny_llama)
        uid = (await c.post("/api/v1/repos/flaky/-/uploads", headers=AUTH, json={
            "metadata": {"base_model": BASE}, "files": manifest(files)})).json()["upload_id"]
        for data in files.values():
            await send_parts(c, uid, data)
        bad = bytearray(parts_of(weights)[1])
        bad[0] ^= 0xFF
        r = await c.put(f"/api/v1/uploads/{uid}/blobs/{w_sha}/parts/1", content=bytes(bad),
                        headers=AUTH)
        assert r.status_code == 200
        assert_error(await c.post(f"/api/v1/uploads/{uid}/commit", headers=AUTH), 422,
                     "checksum_mismatch")
        assert_error(await c.get("/api/v1/resolve/flaky"), 404, "repo_not_found")
        state = (await c.get(f"/api/v1/uploads/{uid}", headers=AUTH)).json()
        assert w_sha in state["missing"] and state["received"][w_sha] == []
        await send_parts(c, uid, weights)
        r = await c.post(f"/api/v1/uploads/{uid}/commit", headers=AUTH)
        assert r.status_code == 201 and r.json()["ref"] == "flaky/1"

        # A part of the wrong length, or out of range, is refused at once.
        small = manifest({"adapter_model.safetensors": b"x" * 10, "adapter_config.json": b"{}"})
        uid2 = (await c.post("/api/v1/repos/flaky/-/uploads", headers=AUTH, json={
            "metadata": {"base_model": BASE}, "files": small})).json()["upload_id"]
        sha10 = hashlib.sha256(b"x" * 10).hexdigest()
        assert_error(await c.put(f"/api/v1/uploads/{uid2}/blobs/{sha10}/parts/0", content=b"x" * 11,
                                 headers=AUTH), 400, "invalid_request")
        assert_error(await c.put(f"/api/v1/uploads/{uid2}/blobs/{sha10}/parts/1", content=b"x",
                                 headers=AUTH), 400, "invalid_request")
        assert_error(await c.put(f"/api/v1/uploads/{uid2}/blobs/{'0' * 64}/parts/0", content=b"x",
                                 headers=AUTH), 400, "invalid_request")
        assert_error(await c.get("/api/v1/uploads/nope", headers=AUTH), 404, "upload_not_found")


async def send_parts_under(c, upload_id: str, key: str, data: bytes) -> None:
    for k, chunk in enumerate(parts_of(data)):
        r = await c.put(f"/api/v1/uploads/{upload_id}/blobs/{key}/parts/{k}", content=chunk,
                        headers=AUTH)
        assert r.status_code == 200, r.text


async def test_file_sent_before_its_hash_is_declared(harness_factory, store_kw, tiny_llama,
                                                     lora_adapter):
    files = folder_files(lora_adapter)
    weights = files["adapter_model.safetensors"]
    w_sha = hashlib.sha256(weights).hexdigest()
    entries = [{**e, "sha256": None} if e["path"] == "adapter_model.safetensors" else e
               for e in manifest(files)]
    async with harness_factory(part_size=PART, **store_kw) as h:
        c = h.client
        await register_base(c, tiny_llama)
        r = await c.post("/api/v1/repos/late/-/uploads", headers=AUTH,
                         json={"metadata": {"base_model": BASE}, "files": entries})
        assert r.status_code == 201, r.text
        up = r.json()
        uid, key = up["upload_id"], up["deferred"]["adapter_model.safetensors"]
        assert key != w_sha and key in up["missing"]
        await send_parts_under(c, uid, key, weights)
        for path, data in files.items():
            if path != "adapter_model.safetensors":
                await send_parts(c, uid, data)

        err = assert_error(await c.post(f"/api/v1/uploads/{uid}/commit", headers=AUTH), 409,
                           "conflict")
        assert err["details"]["undeclared"] == ["adapter_model.safetensors"]
        declare = f"/api/v1/uploads/{uid}/declare"
        err = assert_error(await c.post(declare, headers=AUTH, json={
            "files": {"adapter_config.json": w_sha}}), 400, "invalid_request")
        assert err["details"]["paths"] == ["adapter_config.json"]
        assert_error(await c.post(declare, headers=AUTH, json={
            "files": {"adapter_model.safetensors": "XYZ"}}), 400, "invalid_request")
        assert_error(await c.post(declare, json={
            "files": {"adapter_model.safetensors": w_sha}}), 401, "unauthorized")

        # A wrong hash: the bytes do not match it, nothing is published, the parts are dropped.
        r = await c.post(declare, headers=AUTH, json={
            "files": {"adapter_model.safetensors": "0" * 64}})
        assert r.status_code == 200 and r.json() == {"present": []}
        assert_error(await c.post(f"/api/v1/uploads/{uid}/commit", headers=AUTH), 422,
                     "checksum_mismatch")
        assert_error(await c.get("/api/v1/resolve/late"), 404, "repo_not_found")
        assert_error(await c.get(f"/api/v1/blobs/{'0' * 64}"), 404, "blob_not_found")
        state = (await c.get(f"/api/v1/uploads/{uid}", headers=AUTH)).json()
        assert state["received"][key] == [] and state["deferred"] == {
            "adapter_model.safetensors": key}

        # Sent again and declared rightly, the file is stored under its own hash.
        await send_parts_under(c, uid, key, weights)
        r = await c.post(declare, headers=AUTH, json={
            "files": {"adapter_model.safetensors": w_sha}})
        assert r.json() == {"present": []}
        r = await c.post(f"/api/v1/uploads/{uid}/commit", headers=AUTH)
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["ref"] == "late/1"
        assert {f["path"]: f["sha256"] for f in info["files"]}["adapter_model.safetensors"] == w_sha
        assert (await c.get(f"/api/v1/blobs/{w_sha}")).content == weights
        assert_error(await c.get(f"/api/v1/blobs/{key}"), 404, "blob_not_found")

        # Declaring a hash the registry holds answers "present": nothing more needs sending.
        up = (await c.post("/api/v1/repos/late2/-/uploads", headers=AUTH, json={
            "metadata": {"base_model": BASE}, "files": entries})).json()
        key2 = up["deferred"]["adapter_model.safetensors"]
        await send_parts_under(c, up["upload_id"], key2, weights[:PART])
        r = await c.post(f"/api/v1/uploads/{up['upload_id']}/declare", headers=AUTH,
                         json={"files": {"adapter_model.safetensors": w_sha}})
        assert r.json() == {"present": ["adapter_model.safetensors"]}
        state = (await c.get(f"/api/v1/uploads/{up['upload_id']}", headers=AUTH)).json()
        assert state["missing"] == [] and state["declared"] == {
            "adapter_model.safetensors": w_sha}
        r = await c.post(f"/api/v1/uploads/{up['upload_id']}/commit", headers=AUTH)
        assert r.status_code == 201 and r.json()["revision"] != info["revision"]
        assert await h.registry.store.list_parts(up["upload_id"], key2) == []


async def test_single_request_push_on_both_stores(harness_factory, store_kw, tiny_llama,
                                                  lora_adapter):
    files = folder_files(lora_adapter)
    async with harness_factory(**store_kw) as h:
        await register_base(h.client, tiny_llama)
        r = await push_files(h.client, "small", files)
        assert r.status_code == 201, r.text
        for f in r.json()["files"]:
            got = await h.client.get(f"/api/v1/blobs/{f['sha256']}")
            assert got.content == files[f["path"]]


async def test_bad_header_refused_on_its_first_part(harness_factory, tiny_llama, lora_adapter):
    files = folder_files(lora_adapter)
    weights = bytearray(files["adapter_model.safetensors"])
    weights[8] = ord(" ")                    # the JSON header must start with '{'
    files["adapter_model.safetensors"] = bytes(weights)
    w_sha = hashlib.sha256(weights).hexdigest()
    async with harness_factory(part_size=PART) as h:
        c = h.client
        await register_base(c, tiny_llama)
        uid = (await c.post("/api/v1/repos/early/-/uploads", headers=AUTH, json={
            "metadata": {"base_model": BASE}, "files": manifest(files)})).json()["upload_id"]
        r = await c.put(f"/api/v1/uploads/{uid}/blobs/{w_sha}/parts/0",
                        content=bytes(weights[:PART]), headers=AUTH)
        err = assert_error(r, 422, "invalid_adapter")
        assert err["details"]["file"] == "adapter_model.safetensors"
        assert await h.registry.store.list_parts(uid, w_sha) == []
        assert [s async for s, _ in h.registry.store.list_blobs()] == []


async def test_concurrent_commits_publish_one_version(reg, lora_adapter):
    import asyncio

    files = folder_files(lora_adapter)
    c = reg.client
    uid = (await c.post("/api/v1/repos/twice/-/uploads", headers=AUTH, json={
        "metadata": {"base_model": BASE}, "files": manifest(files)})).json()["upload_id"]
    for data in files.values():
        sha = hashlib.sha256(data).hexdigest()
        r = await c.put(f"/api/v1/uploads/{uid}/blobs/{sha}/parts/0", content=data, headers=AUTH)
        assert r.status_code == 200
    results = await asyncio.gather(*[c.post(f"/api/v1/uploads/{uid}/commit", headers=AUTH)
                                     for _ in range(3)])
    assert {r.status_code for r in results} == {201}
    assert {r.json()["revision"] for r in results} == {results[0].json()["revision"]}
    listing = (await c.get("/api/v1/repos/twice/-/versions", params={"status": "all"})).json()
    assert [v["version"] for v in listing["items"]] == [1]
