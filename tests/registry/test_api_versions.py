"""Repos, versions, aliases and lineage through the API, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from quiver.events import InProcessEventBus
from quiver.refs import is_revision
from tests.registry._util import (AUTH, BASE, assert_error, folder_files, push_files,
                                  register_base)


async def test_push_resolve_alias_archive_delete(harness_factory, database_url, tiny_llama,
                                                 lora_adapter):
    files = folder_files(lora_adapter)
    async with harness_factory(database_url=database_url) as h:
        c = h.client
        await register_base(c, tiny_llama)
        bus = h.registry.bus
        assert isinstance(bus, InProcessEventBus)
        events = bus.subscribe()
        assert await anext(events) is None

        r = await push_files(c, "acme/summarise", files, description="first",
                             task_description="summarise news", examples=["sum this up"],
                             labels={"team": "nlp"}, aliases=["staging"])
        assert r.status_code == 201, r.text
        v1 = r.json()
        assert (v1["repo"], v1["version"], v1["ref"], v1["status"]) == (
            "acme/summarise", 1, "acme/summarise/1", "ready")
        assert is_revision(v1["revision"])
        assert v1["peft"]["r"] == 8 and sorted(v1["peft"]["target_modules"]) == [
            "k_proj", "o_proj", "q_proj", "v_proj"]
        assert v1["dtype"] and v1["parameter_count"] > 0
        assert v1["aliases"] == ["staging"] and v1["pushed_by"] == "bootstrap-admin"
        assert {f["path"]: f["sha256"] for f in v1["files"]} == {
            p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
        assert v1["size_bytes"] == sum(len(d) for d in files.values())

        ev = await asyncio.wait_for(anext(events), 5)
        assert (ev.type, ev.repo, ev.version, ev.revision, ev.base_model) == (
            "version.ready", "acme/summarise", 1, v1["revision"], BASE)
        ev = await asyncio.wait_for(anext(events), 5)
        assert (ev.type, ev.alias, ev.version) == ("alias.moved", "staging", 1)

        r = await push_files(c, "acme/summarise", files, parent="acme/summarise@staging")
        v2 = r.json()
        assert r.status_code == 201 and v2["version"] == 2 and v2["parent"] == "acme/summarise/1"
        assert v2["revision"] != v1["revision"]

        for ref, number in [("acme/summarise", 2), ("acme/summarise/1", 1),
                            ("acme/summarise@staging", 1), (f"acme/summarise@{v1['revision']}", 1)]:
            r = await c.get(f"/api/v1/resolve/{ref}")
            assert r.status_code == 200 and r.json()["version"] == number, (ref, r.text)

        r = await c.put("/api/v1/repos/acme/summarise/-/aliases/prod", json={"version": 2},
                        headers=AUTH)
        assert r.status_code == 200 and "prod" in r.json()["aliases"]
        info = (await c.get("/api/v1/repos/acme/summarise/-/info")).json()
        assert info["latest_version"] == 2 and info["version_count"] == 2
        assert info["aliases"] == {"prod": 2, "staging": 1} and info["namespace"] == "acme"

        r = await c.post("/api/v1/repos/acme/summarise/-/versions/2/archive", headers=AUTH)
        assert r.status_code == 200 and r.json()["status"] == "archived"
        assert (await c.get("/api/v1/resolve/acme/summarise")).json()["version"] == 1
        assert (await c.get("/api/v1/resolve/acme/summarise/2")).json()["status"] == "archived"
        seen = [await asyncio.wait_for(anext(events), 5) for _ in range(3)]
        assert [(e.type, e.version, e.alias) for e in seen] == [
            ("version.ready", 2, None), ("alias.moved", 2, "prod"), ("version.archived", 2, None)]

        listing = (await c.get("/api/v1/repos/acme/summarise/-/versions")).json()
        assert [v["version"] for v in listing["items"]] == [2, 1]
        across = (await c.get("/api/v1/versions", params={"base_model": BASE})).json()
        assert [v["ref"] for v in across["items"]] == ["acme/summarise/1"]

        # Deleting version 2 keeps every blob version 1 still uses.
        r = await c.delete("/api/v1/repos/acme/summarise/-/versions/2", headers=AUTH)
        assert r.status_code == 204
        assert_error(await c.get("/api/v1/resolve/acme/summarise/2"), 404, "version_not_found")
        for f in v1["files"]:
            r = await c.get(f"/api/v1/blobs/{f['sha256']}")
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == f["sha256"]
        r = await c.delete("/api/v1/repos/acme/summarise", headers=AUTH)
        assert r.status_code == 204
        assert_error(await c.get("/api/v1/resolve/acme/summarise"), 404, "repo_not_found")
        for f in v1["files"]:
            assert_error(await c.get(f"/api/v1/blobs/{f['sha256']}"), 404, "blob_not_found")
            assert not await h.registry.store.exists(f["sha256"])
        await events.aclose()


async def test_concurrent_pushes_get_distinct_numbers(harness_factory, database_url, tiny_llama,
                                                      lora_adapter):
    files = folder_files(lora_adapter)
    async with harness_factory(database_url=database_url) as h:
        await register_base(h.client, tiny_llama)
        results = await asyncio.gather(*[
            push_files(h.client, "race", files, description=f"push {i}") for i in range(8)])
        assert all(r.status_code == 201 for r in results), [r.text for r in results]
        numbers = sorted(r.json()["version"] for r in results)
        assert numbers == list(range(1, 9))
        assert len({r.json()["revision"] for r in results}) == 8
        info = (await h.client.get("/api/v1/repos/race/-/info")).json()
        assert info["latest_version"] == 8 and info["version_count"] == 8


async def test_listings_paginate_with_cursors(reg, lora_adapter):
    files = folder_files(lora_adapter)
    for name in ["b-one", "a-two", "org/c-three"]:
        for _ in range(2):
            assert (await push_files(reg.client, name, files)).status_code == 201
    c = reg.client

    async def walk(url: str, key: str, limit: int) -> list[str]:
        out, cursor = [], None
        while True:
            params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
            page = (await c.get(url, params=params)).json()
            out += [item[key] for item in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                return out

    async def names(**params) -> list[str]:
        return [r["name"] for r in (await c.get("/api/v1/repos", params=params)).json()["items"]]

    assert await walk("/api/v1/repos", "name", 2) == ["a-two", "b-one", "org/c-three"]
    assert await names(namespace="org") == ["org/c-three"]
    assert await names(q="two") == ["a-two"]
    refs = await walk("/api/v1/versions", "ref", 4)
    assert refs == ["b-one/1", "b-one/2", "a-two/1", "a-two/2", "org/c-three/1", "org/c-three/2"]
    page = (await c.get("/api/v1/repos/b-one/-/versions", params={"limit": 1})).json()
    assert [v["version"] for v in page["items"]] == [2]
    page = (await c.get("/api/v1/repos/b-one/-/versions",
                        params={"limit": 1, "cursor": page["next_cursor"]})).json()
    assert [v["version"] for v in page["items"]] == [1] and page["next_cursor"] is None
    assert_error(await c.get("/api/v1/repos", params={"cursor": "!!!"}), 400, "invalid_request")


@pytest.mark.parametrize("ref, status, code", [
    ("nope", 404, "repo_not_found"),
    ("b-one/9", 404, "version_not_found"),
    ("b-one@prod", 404, "alias_not_found"),
    ("b-one@" + "0" * 40, 404, "version_not_found"),
    ("Bad Name", 400, "invalid_reference"),
])
async def test_resolve_errors(reg, lora_adapter, ref, status, code):
    assert (await push_files(reg.client, "b-one", folder_files(lora_adapter))).status_code == 201
    assert_error(await reg.client.get(f"/api/v1/resolve/{ref}"), status, code)


async def test_listings_cost_the_same_queries_whatever_the_page_size(reg, lora_adapter):
    """No N+1: a page of 1 and a page of 6 take the same number of SQL statements."""
    from sqlalchemy import event

    files = folder_files(lora_adapter)
    for i in range(3):
        for repo in ("n-one", "n-two"):
            assert (await push_files(reg.client, repo, files, aliases=[f"a{i}"])).status_code == 201
    engine = reg.registry.db.engine
    statements: list[str] = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        costs = {}
        totals = {"/api/v1/repos": 2, "/api/v1/versions": 6, "/api/v1/repos/n-one/-/versions": 3}
        for url, total in totals.items():
            for limit in (1, 6):
                statements.clear()
                r = await reg.client.get(url, params={"limit": limit})
                assert r.status_code == 200 and len(r.json()["items"]) == min(limit, total)
                costs[url, limit] = len(statements)
            assert costs[url, 1] == costs[url, 6], costs
    finally:
        event.remove(engine, "before_cursor_execute", count)
