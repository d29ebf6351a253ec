"""KeyStore and RateLimiter on their own, in process and on the real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from quiver.errors import RateLimited
from quiver.gateway.keys import ApiKey, KeyStore, hash_key
from quiver.gateway.metrics import GatewayMetrics
from quiver.gateway.ratelimit import RateLimiter


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    if request.param == "memory":
        yield None
        return
    url = request.getfixturevalue("redis_url")
    client = aioredis.from_url(url, decode_responses=True)
    yield client
    await client.aclose()


async def test_keys_are_stored_as_hashes_and_can_be_revoked(store):
    keys = KeyStore(store, "t:gw:")
    key, plain = await keys.create(name="team", adapters=["acme/*"], rpm=5)
    if store is not None:
        raw = await store.hgetall("t:gw:keys")
        assert list(raw) == [hash_key(plain)] and plain not in str(raw)
    found = await keys.lookup(plain)
    assert found is not None and found.name == "team" and found.rpm == 5
    assert await keys.lookup(plain + "x") is None
    assert [k.id for k in await keys.list()] == [key.id]
    await keys.delete(key.id)
    assert await keys.lookup(plain) is None


def test_permissions_match_namespaces_repos_and_versions():
    key = ApiKey(id="k", name="k", adapters=["acme/*", "solo", "pinned/3"], base_models=False)
    assert key.allows("acme/bot/2") and key.allows("acme/other/1")
    assert key.allows("solo/7") and key.allows("pinned/3")
    assert not key.allows("pinned/4") and not key.allows("other/bot/1")
    assert not key.allows(None)
    assert ApiKey(id="a", name="a").allows(None) and ApiKey(id="a", name="a").allows("x/1")


async def test_requests_per_minute(store):
    limiter = RateLimiter(store, "t:gw:", failure="open", metrics=GatewayMetrics())
    key = ApiKey(id="rpm-key", name="k", rpm=3)
    for _ in range(3):
        await limiter.admit(key, 0)
    with pytest.raises(RateLimited) as info:
        await limiter.admit(key, 0)
    assert info.value.details == {"limit": "rpm"}
    assert 1 <= info.value.retry_after <= 120
    other = ApiKey(id="other-key", name="o", rpm=3)
    await limiter.admit(other, 0)  # limits are per key


async def test_tokens_per_minute(store):
    limiter = RateLimiter(store, "t:gw:", failure="open", metrics=GatewayMetrics())
    key = ApiKey(id="tpm-key", name="k", tpm=100)
    await limiter.admit(key, 500)  # nothing used yet: one large request may start
    await limiter.add_tokens(key, 90)
    await limiter.admit(key, 10)
    await limiter.add_tokens(key, 10)
    with pytest.raises(RateLimited) as info:
        await limiter.admit(key, 1)
    assert info.value.details == {"limit": "tpm"}
