"""Bad input gets its 4xx JSON error, nothing of it is stored, and the registry keeps serving."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct

import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests.registry._util import (AUTH, BASE, assert_error, folder_files, push_files)


async def stored_blobs(h) -> set[str]:
    return {sha async for sha, _ in h.registry.store.list_blobs()}


async def assert_nothing_stored(h, repo: str, before: set[str]) -> None:
    assert await stored_blobs(h) == before
    assert_error(await h.client.get(f"/api/v1/resolve/{repo}"), 404, "repo_not_found")
    assert (await h.client.get("/api/v1/health")).json() == {"status": "ok"}


def safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


ONE_F32 = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
MALFORMED = {
    "header_past_end": struct.pack("<Q", 10_000) + b"{}",
    "too_short": b"\x01\x02",
    "not_json": safetensors_bytes(b"{nope"),
    "leading_space": safetensors_bytes(b" " + json.dumps(ONE_F32).encode(), b"\0" * 4),
    "wrong_byte_count": safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
    "trailing_bytes": safetensors_bytes(ONE_F32, b"\0" * 8),
    "pickle_inside": pickle.dumps({"a": 1}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_safetensors_refused(reg, lora_adapter, case):
    files = folder_files(lora_adapter)
    before = await stored_blobs(reg)
    files["adapter_model.safetensors"] = MALFORMED[case]
    err = assert_error(await push_files(reg.client, "bad", files), 422, "invalid_adapter")
    assert "adapter_model.safetensors" in err["message"]
    await assert_nothing_stored(reg, "bad", before)


def reshaped(weights: bytes) -> tuple[bytes, list[str]]:
    tensors = st_load(weights)
    names = sorted(tensors)
    a = next(n for n in names if "layers.0.self_attn.q_proj.lora_A" in n)
    b = next(n for n in names if "layers.1.self_attn.v_proj.lora_B" in n)
    tensors[a] = tensors[a][:, :32].contiguous()
    tensors[b] = tensors[b].T.contiguous()
    return st_save(tensors), [a, b]


async def test_wrong_shapes_listed_in_one_error(reg, lora_adapter):
    files = folder_files(lora_adapter)
    before = await stored_blobs(reg)
    files["adapter_model.safetensors"], broken = reshaped(files["adapter_model.safetensors"])
    err = assert_error(await push_files(reg.client, "shapes", files), 422, "incompatible_adapter")
    problems = err["details"] if isinstance(err["details"], list) else err["details"]["problems"]
    named = {p.get("tensor") for p in problems}
    assert set(broken) <= named, problems
    assert all("expected" in p and "found" in p for p in problems if p.get("tensor") in broken)
    await assert_nothing_stored(reg, "shapes", before)


async def test_wrong_base_model(reg, tiny_llama, lora_adapter):
    files = folder_files(lora_adapter)
    before = await stored_blobs(reg)
    config = json.loads((tiny_llama / "config.json").read_text())
    config.update(hidden_size=128, intermediate_size=256)
    r = await reg.client.post("/api/v1/base-models", headers=AUTH,
                              json={"name": "wide-llama", "config": config})
    assert r.status_code == 201, r.text
    err = assert_error(await push_files(reg.client, "wrong-base", files, base_model="wide-llama"),
                       422, "incompatible_adapter")
    problems = err["details"] if isinstance(err["details"], list) else err["details"]["problems"]
    assert len(problems) >= 8          # every q/k/v/o tensor of both layers disagrees
    assert_error(await push_files(reg.client, "wrong-base", files, base_model="no-such-model"),
                 404, "base_model_not_found")
    await assert_nothing_stored(reg, "wrong-base", before)
    # Re-registering the same config is idempotent; another config under that name conflicts.
    r = await reg.client.post("/api/v1/base-models", headers=AUTH,
                              json={"name": "wide-llama", "config": config})
    assert r.status_code == 200
    config["hidden_size"] = 256
    assert_error(await reg.client.post("/api/v1/base-models", headers=AUTH,
                                       json={"name": "wide-llama", "config": config}),
                 409, "conflict")
    config["model_type"], config["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    assert_error(await reg.client.post("/api/v1/base-models", headers=AUTH,
                                       json={"name": "gpt", "config": config}),
                 400, "invalid_request")


@pytest.mark.parametrize("path, data, code", [
    ("adapter_model.bin", pickle.dumps({"w": [1.0]}), "unsafe_file"),
    ("README.md", pickle.dumps({"w": [1.0]}), "unsafe_file"),
    ("../escape.json", b"{}", "unsafe_file"),
    ("/etc/passwd.json", b"{}", "unsafe_file"),
    ("sub/../../escape.json", b"{}", "unsafe_file"),
    ("run.sh", b"echo hi", "unsafe_file"),
])
async def test_unsafe_files_refused(reg, lora_adapter, path, data, code):
    files = folder_files(lora_adapter)
    before = await stored_blobs(reg)
    files[path] = data
    err = assert_error(await push_files(reg.client, "unsafe", files), 422, code)
    assert err["details"]["path"] == path
    await assert_nothing_stored(reg, "unsafe", before)


async def test_unsafe_paths_refused_in_manifest(reg):
    r = await reg.client.post("/api/v1/repos/unsafe/-/uploads", headers=AUTH, json={
        "metadata": {"base_model": BASE},
        "files": [{"path": "../../adapter_model.safetensors", "size": 10, "sha256": "a" * 64},
                  {"path": "adapter_config.json", "size": 2, "sha256": "b" * 64}]})
    assert_error(r, 422, "unsafe_file")


async def test_bad_adapter_config_and_missing_files(reg, lora_adapter):
    files = folder_files(lora_adapter)
    before = await stored_blobs(reg)
    cfg = json.loads(files["adapter_config.json"])
    broken = {**files, "adapter_config.json": json.dumps({**cfg, "r": -3}).encode()}
    assert_error(await push_files(reg.client, "cfg", broken), 422, "invalid_adapter")
    broken = {**files, "adapter_config.json": b"{not json"}
    assert_error(await push_files(reg.client, "cfg", broken), 422, "invalid_adapter")
    weights_only = {"adapter_model.safetensors": files["adapter_model.safetensors"]}
    err = assert_error(await push_files(reg.client, "cfg", weights_only), 422, "invalid_adapter")
    assert err["details"]["missing"] == ["adapter_config.json"]
    assert_error(await push_files(reg.client, "cfg", files, aliases=["latest"]), 400,
                 "invalid_request")
    assert_error(await push_files(reg.client, "Bad Name!", files), 400, "invalid_reference")
    r = await reg.client.post("/api/v1/repos/cfg/-/push", headers=AUTH,
                              data={"metadata": "{}"},
                              files=[("f", ("adapter_config.json", b"{}", "application/json"))])
    assert_error(r, 400, "invalid_request")
    await assert_nothing_stored(reg, "cfg", before)


async def test_size_limits(harness_factory, tiny_llama, lora_adapter):
    from tests.registry._util import register_base

    files = folder_files(lora_adapter)
    async with harness_factory(max_single_push_bytes=1024, max_file_bytes=2048) as h:
        await register_base(h.client, tiny_llama)
        assert_error(await push_files(h.client, "big", files), 413, "payload_too_large")
        r = await h.client.post("/api/v1/repos/big/-/uploads", headers=AUTH, json={
            "metadata": {"base_model": BASE},
            "files": [{"path": "adapter_model.safetensors", "size": 4096, "sha256": "a" * 64},
                      {"path": "adapter_config.json", "size": 2, "sha256": "b" * 64}]})
        assert_error(r, 413, "payload_too_large")


async def test_tokens_and_scopes(harness_factory, tiny_llama, lora_adapter):
    from tests.registry._util import register_base

    files = folder_files(lora_adapter)
    async with harness_factory(anonymous_read=False) as h:
        c = h.client
        await register_base(c, tiny_llama)
        assert_error(await push_files(c, "tok", files, headers={}), 401, "unauthorized")
        assert_error(await push_files(c, "tok", files, headers={"Authorization": "Bearer nope"}),
                     401, "unauthorized")
        assert_error(await push_files(c, "tok", files, headers={"Authorization": "Basic eDp5"}),
                     401, "unauthorized")
        assert_error(await c.get("/api/v1/repos"), 401, "unauthorized")
        assert_error(await c.get("/api/v1/whoami"), 401, "unauthorized")

        async def token(scopes, repos=None) -> dict:
            r = await c.post("/api/v1/tokens", headers=AUTH,
                             json={"name": f"t-{'-'.join(scopes)}", "scopes": scopes,
                                   "repos": repos})
            assert r.status_code == 201, r.text
            return {"Authorization": f"Bearer {r.json()['token']}"}

        reader = await token(["read"])
        writer = await token(["write"], repos=["team/*"])
        assert_error(await push_files(c, "team/tok", files, headers=reader), 403, "forbidden")
        assert_error(await push_files(c, "other", files, headers=writer), 403, "forbidden")
        r = await push_files(c, "team/tok", files, headers=writer)
        assert r.status_code == 201 and r.json()["pushed_by"] == "t-write"
        assert (await c.get("/api/v1/resolve/team/tok", headers=reader)).status_code == 200
        assert_error(await c.delete("/api/v1/repos/team/tok", headers=writer), 403, "forbidden")
        assert_error(await c.post("/api/v1/tokens", headers=writer,
                                  json={"name": "x", "scopes": ["admin"]}), 403, "forbidden")
        who = (await c.get("/api/v1/whoami", headers=writer)).json()
        assert who == {"name": "t-write", "scopes": ["read", "write"], "repos": ["team/*"]}

        listed = (await c.get("/api/v1/tokens", headers=AUTH)).json()["items"]
        assert all("token" not in t and "token_hash" not in t for t in listed)
        rid = next(t["id"] for t in listed if t["name"] == "t-read")
        assert (await c.delete(f"/api/v1/tokens/{rid}", headers=AUTH)).status_code == 204
        assert_error(await c.get("/api/v1/resolve/team/tok", headers=reader), 401, "unauthorized")

        # Tokens are stored hashed: the plain secret appears nowhere in the database.
        from sqlmodel import select

        from quiver.registry.models import Token
        with h.registry.db.session() as s:
            hashes = [t.token_hash for t in s.exec(select(Token))]
        assert hashlib.sha256(b"qvr_test_admin_token").hexdigest() in hashes
        assert "qvr_test_admin_token" not in hashes


async def test_chunked_push_over_the_limit_is_cut_off(harness_factory, tiny_llama, lora_adapter):
    from tests.registry._util import register_base

    files = folder_files(lora_adapter)
    async with harness_factory(max_single_push_bytes=4096) as h:
        await register_base(h.client, tiny_llama)
        request = h.client.build_request(
            "POST", "/api/v1/repos/chunky/-/push", headers=AUTH,
            data={"metadata": json.dumps({"base_model": BASE})},
            files=[("f", (p, d)) for p, d in files.items()])
        body = request.read()

        async def chunks():
            for i in range(0, len(body), 1024):
                yield body[i:i + 1024]

        r = await h.client.post("/api/v1/repos/chunky/-/push", content=chunks(),
                                headers={**AUTH, "Content-Type": request.headers["content-type"]})
        assert_error(r, 413, "payload_too_large")
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert (await h.client.get("/api/v1/health")).status_code == 200


async def test_token_lookups_are_cached_only_for_known_tokens(harness_factory):
    """A token's principal is reused for token_cache_s; a token deleted behind this process's
    back (by another registry process, say) stops working once that has passed, and at once
    with the cache off."""
    from sqlmodel import select

    from quiver.registry.models import Token

    for ttl in (0.0, 30.0):
        async with harness_factory(anonymous_read=False, token_cache_s=ttl) as h:
            c = h.client
            r = await c.post("/api/v1/tokens", headers=AUTH,
                             json={"name": "t-read", "scopes": ["read"]})
            reader = {"Authorization": f"Bearer {r.json()['token']}"}
            assert (await c.get("/api/v1/whoami", headers=reader)).status_code == 200
            with h.registry.db.session() as s:        # as another process would
                s.delete(s.exec(select(Token).where(Token.name == "t-read")).one())
                s.commit()
            r = await c.get("/api/v1/whoami", headers=reader)
            if ttl:
                assert r.status_code == 200
                h.registry.principals.ttl_s = 1e-9     # its entry is now past its time
                assert (await c.get("/api/v1/whoami", headers=reader)).status_code == 401
            else:
                assert_error(r, 401, "unauthorized")
            bad = {"Authorization": "Bearer qvr_never_issued"}
            for _ in range(2):
                assert_error(await c.get("/api/v1/whoami", headers=bad), 401, "unauthorized")


def test_principal_cache_stays_bounded_and_forgets_deleted_tokens():
    from quiver.registry.auth import Principal, PrincipalCache

    cache = PrincipalCache(60.0)
    cache.MAX_ENTRIES = 3
    who = [Principal(name=f"t{i}", scopes=frozenset({"read"}), token_id=i) for i in range(5)]
    for i, p in enumerate(who):
        cache.put(f"d{i}", p, generation=cache.generation)
    assert [cache.get(f"d{i}") for i in range(5)] == [None, None, who[2], who[3], who[4]]
    began = cache.generation
    cache.forget(3)
    assert cache.get("d3") is None and cache.get("d4") == who[4]
    cache.put("d3", who[3], generation=began)      # looked up before the token was deleted
    assert cache.get("d3") is None
    assert PrincipalCache(0).get("d0") is None
