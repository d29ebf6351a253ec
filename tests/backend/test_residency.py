"""Residency tiers against the real engine and a real registry process."""

from __future__ import annotations

import asyncio

import pytest

from quiver.backend.residency import Residency
from quiver.backend.runtime import EngineSlots
from quiver.errors import (Conflict, IncompatibleAdapter, ModelNotFound, RegistryUnavailable,
                           RepoNotFound, UnservableAdapter)
from tests.backend.conftest import BASE

pytestmark = pytest.mark.slow


class Counting:
    """The real registry client, counting the downloads it is asked for."""

    def __init__(self, client) -> None:
        self.client = client
        self.downloads: list[str] = []
        self.resolves = 0

    async def resolve(self, ref):
        self.resolves += 1
        return await self.client.resolve(ref)

    async def download_version(self, info, dest_dir):
        self.downloads.append(info.ref)
        return await self.client.download_version(info, dest_dir)


@pytest.fixture
async def parts(engine, registry, tmp_path):
    from quiver.backend.engine import AsyncEngine
    from quiver.client import AsyncClient

    reg, infos = registry
    aengine = AsyncEngine(engine)
    await aengine.start()
    for key in list(engine.slot_info()["loaded"]):
        await aengine.unload_adapter(key)
    client = AsyncClient(reg.url, cache_dir=tmp_path / "blobs")
    counting = Counting(client)

    def make(**kw) -> Residency:
        args = dict(registry=counting, engine=EngineSlots(engine, aengine), base_model=BASE,
                    max_slots=4, host_cache_bytes=1 << 30, disk_cache_bytes=1 << 30,
                    disk_cache_dir=tmp_path / "disk", slot_wait_timeout=10.0)
        args.update(kw)
        return Residency(**args)

    yield make, counting, infos
    await aengine.stop(0)
    await client.aclose()


async def test_concurrent_first_requests_share_one_pull(parts):
    make, counting, infos = parts
    r = make()
    leases = await asyncio.gather(*(r.acquire("team/a0/1") for _ in range(12)))
    assert counting.downloads == ["team/a0/1"]
    assert {lease.key for lease in leases} == {infos["a0"].revision}
    assert r.entries()[0].in_use == 12
    for lease in leases:
        lease.release()
    assert r.entries()[0].in_use == 0
    assert r.by_tier()["gpu"] == ["team/a0/1"]


async def test_in_use_slots_are_never_evicted(parts):
    make, counting, _ = parts
    r = make()
    held = [await r.acquire(f"team/a{i}/1") for i in range(4)]
    waiting = asyncio.create_task(r.acquire("team/a4/1"))
    await asyncio.sleep(0.5)
    assert not waiting.done()                     # every slot is in use: it waits
    assert r.waiting == 1
    assert sorted(r.by_tier()["gpu"]) == [f"team/a{i}/1" for i in range(4)]
    # The waiting request holds up nobody whose adapter is resident.
    (await asyncio.wait_for(r.acquire("team/a0/1"), 2)).release()
    assert not waiting.done()
    held[1].release()                             # a1 is no longer used: it makes room
    lease = await asyncio.wait_for(waiting, 10)
    assert "team/a1/1" not in r.by_tier()["gpu"] and "team/a4/1" in r.by_tier()["gpu"]
    assert "team/a1/1" in r.by_tier()["host"]     # evicted from its slot, still cached
    # Back from the host cache without another download.
    lease.release()
    again = await r.acquire("team/a1/1")
    assert counting.downloads.count("team/a1/1") == 1
    again.release()
    for h in held:
        h.release()


async def test_lru_and_pins(parts):
    make, _, _ = parts
    r = make()
    await r.load("team/a0/1", pin=True)
    for i in (1, 2, 3):
        await r.load(f"team/a{i}/1")
    (await r.acquire("team/a1/1")).release()     # a1 becomes the most recently used
    await r.load("team/a4/1")                     # evicts the LRU unpinned one: a2
    assert sorted(r.by_tier()["gpu"]) == ["team/a0/1", "team/a1/1", "team/a3/1", "team/a4/1"]
    await r.load("team/a5/1")                     # then a3; a0 is pinned
    assert "team/a0/1" in r.by_tier()["gpu"] and "team/a3/1" not in r.by_tier()["gpu"]
    with pytest.raises(Conflict):
        lease = await r.acquire("team/a5/1")
        try:
            await r.unload("team/a5/1")
        finally:
            lease.release()
    await r.unload("team/a5/1")
    assert "team/a5/1" not in r.by_tier()["gpu"]


async def test_host_and_disk_budgets(parts, registry):
    make, counting, infos = parts
    one = infos["a0"].size_bytes
    r = make(host_cache_bytes=0, disk_cache_bytes=2 * one + one // 2)
    for i in range(4):
        (await r.acquire(f"team/a{i}/1")).release()
    tiers = r.by_tier()
    assert tiers["host"] == []                     # no host budget: nothing kept there
    assert tiers["disk"] == ["team/a2/1", "team/a3/1"]   # the two most recent fit
    assert r.disk_used <= 2 * one + one // 2
    assert not (r.disk_cache_dir / "adapters" / infos["a0"].revision).exists()


async def test_disk_cache_survives_a_restart(parts):
    make, counting, infos = parts
    first = make()
    (await first.acquire("team/a6/1")).release()
    second = make()
    assert second.scan_disk_cache() == 1
    assert second.by_tier()["disk"] == ["team/a6/1"]
    (await second.acquire("team/a6/1")).release()
    assert counting.downloads == ["team/a6/1"]     # served from disk, re-verified, not pulled


async def test_refusals_are_typed_and_remembered(parts):
    make, counting, _ = parts
    r = make()
    with pytest.raises(RepoNotFound):
        await r.acquire("team/nothing-here")
    with pytest.raises(ModelNotFound):
        await r.acquire("Not A Ref!")
    with pytest.raises(IncompatibleAdapter) as exc:
        await r.acquire("team/other/1")
    assert exc.value.details[0]["expected"] == BASE
    assert counting.downloads == []                # refused before any download
    with pytest.raises(UnservableAdapter):
        await r.acquire("team/big/1")
    with pytest.raises(UnservableAdapter):
        await r.acquire("team/big/1")
    assert counting.downloads == ["team/big/1"]    # the verdict is remembered per revision
    assert r.by_tier() == {"gpu": [], "host": [], "disk": [], "loading": []}


async def test_registry_down_keeps_resident_adapters(engine, fresh_registry, tmp_path):
    from quiver.backend.engine import AsyncEngine
    from quiver.client import AsyncClient

    reg, _ = fresh_registry
    aengine = AsyncEngine(engine)
    await aengine.start()
    for key in list(engine.slot_info()["loaded"]):
        await aengine.unload_adapter(key)
    client = AsyncClient(reg.url, cache_dir=tmp_path / "blobs")
    try:
        r = Residency(registry=client, engine=EngineSlots(engine, aengine), base_model=BASE,
                      max_slots=4, host_cache_bytes=1 << 30, disk_cache_bytes=1 << 30,
                      disk_cache_dir=tmp_path / "disk", registry_retry_after=7.0)
        (await r.acquire("team/moving@prod")).release()
        (await r.acquire("team/a0/1")).release()
        reg.stop()
        (await r.acquire("team/a0/1")).release()           # pinned ref: no registry needed
        lease = await r.acquire("team/moving@prod")        # alias: last known, resident
        assert lease.ref == "team/moving/1"
        lease.release()
        with pytest.raises(RegistryUnavailable) as exc:
            await r.acquire("team/a5/1")
        assert exc.value.retry_after == 7.0
    finally:
        await aengine.stop(0)
        await client.aclose()
