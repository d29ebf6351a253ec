"""The router service against a real registry: training, routing, fallbacks, retrains, races."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from quiver.client import AsyncClient
from quiver.errors import BaseModelNotFound, InvalidRequest, RoutingAbstained
from quiver.routing.service import RouterService
from quiver.routing.settings import RouterSettings
from tests.routing.conftest import BASE, COOKING, MATH, TRANSLATE

OFF_TOPIC = "Which team won the football world cup in 1998?"


def _service(hub, encoder, **kw) -> RouterService:
    settings = RouterSettings(registry_url=hub.url, **kw)
    return RouterService(settings, encoder, client=AsyncClient(hub.url, hub.token))


async def _started(hub, encoder, **kw) -> RouterService:
    svc = _service(hub, encoder, **kw)
    await svc.start(watch=False)
    await svc.sync()
    return svc


async def test_routes_through_a_registry_and_follows_new_versions(hub, encoder):
    hub.push("math", MATH, "Solve mathematics problems")
    hub.push("cooking", COOKING, "Answer cooking and recipe questions")
    svc = await _started(hub, encoder)
    try:
        d = await svc.route(prompt="What is the square root of 144?")
        assert (d.adapter, d.action, d.base_model) == ("math/1", "adapter", BASE)
        assert d.candidates[0].adapter == "math/1" and len(d.candidates) == 2
        d = await svc.route(messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "How do I bake bread?"}])
        assert d.adapter == "cooking/1"
        first = d.router_version

        hub.push("translate", TRANSLATE, "Translate text between languages")
        hub.push("math", MATH[:4] + ["Simplify the fraction 12/18"], "Solve maths problems")
        await svc.sync()
        d = await svc.route(prompt="Translate 'see you tomorrow' into Spanish")
        assert d.adapter == "translate/1" and d.router_version != first
        d = await svc.route(prompt="What is 45 divided by 9?")
        assert d.adapter == "math/2"
        assert sorted(svc.routers[BASE].adapters) == ["cooking/1", "math/2", "translate/1"]

        hub.client.set_alias("math", "prod", 1)          # prod wins over latest
        await svc.sync()
        assert (await svc.route(prompt="What is 45 divided by 9?")).adapter == "math/1"
        hub.client.archive("translate/1")                 # archived: no longer a candidate
        await svc.sync()
        assert "translate/1" not in svc.routers[BASE].adapters
    finally:
        await svc.close()


async def test_same_registry_state_same_router_version(hub, encoder, tmp_path):
    from quiver.routing.classifier import Classifier

    hub.push("math", MATH)
    hub.push("cooking", COOKING)
    a = await _started(hub, encoder, artifact_dir=tmp_path / "artifacts")
    b = await _started(hub, encoder)
    try:
        assert a.routers[BASE].version == b.routers[BASE].version
        before = a.routers[BASE]
        await a.sync()                                    # nothing changed: nothing retrained
        assert a.routers[BASE] is before
        saved = tmp_path / "artifacts" / BASE / f"{before.version}.npz"
        back = Classifier.from_bytes(saved.read_bytes())
        assert back.labels == list(before.adapters)
    finally:
        await a.close()
        await b.close()


async def test_a_restart_loads_the_saved_router_instead_of_retraining(hub, encoder, tmp_path,
                                                                       monkeypatch):
    hub.push("math", MATH)
    hub.push("cooking", COOKING)
    first = await _started(hub, encoder, artifact_dir=tmp_path / "artifacts")
    trained = first.routers[BASE]
    await first.close()

    def no_encoding(texts):
        raise AssertionError(f"re-encoded {len(texts)} training texts after a restart")

    monkeypatch.setattr(encoder, "encode_uncached", no_encoding)
    encoder.cache.clear()
    again = await _started(hub, encoder, artifact_dir=tmp_path / "artifacts")
    try:
        loaded = again.routers[BASE]
        assert loaded.version == trained.version and loaded.train_seconds == 0.0
        assert sorted(loaded.adapters) == sorted(trained.adapters)
    finally:
        await again.close()
    monkeypatch.undo()
    d = await _started(hub, encoder, artifact_dir=tmp_path / "artifacts")
    try:                       # the loaded router routes like the trained one
        assert (await d.route(prompt="What is the square root of 144?")).adapter == "math/1"
    finally:
        await d.close()


@pytest.mark.parametrize("policy", ["base", "default_adapter", "error"])
async def test_abstention_and_fallback_policies(hub, encoder, policy):
    hub.push("math", MATH)
    hub.push("cooking", COOKING)
    kw = {"fallback": policy, "threshold": 0.3}
    if policy == "default_adapter":
        kw["default_adapter"] = "cooking"
    svc = await _started(hub, encoder, **kw)
    try:
        assert (await svc.route(prompt="Solve 2x - 4 = 10 for x")).adapter == "math/1"
        if policy == "error":
            with pytest.raises(RoutingAbstained) as err:
                await svc.route(prompt=OFF_TOPIC)
            assert err.value.details["confidence"] < 0.3
            return
        d = await svc.route(prompt=OFF_TOPIC)
        assert d.confidence < 0.3
        if policy == "base":
            assert (d.action, d.adapter) == ("base", None)
        else:
            assert (d.action, d.adapter) == ("default_adapter", "cooking/1")
    finally:
        await svc.close()


async def test_bad_inputs(hub, encoder):
    hub.push("math", MATH)
    hub.push("silent")                                    # no examples, no description
    svc = await _started(hub, encoder, threshold=0.2)
    try:
        router = svc.routers[BASE]
        assert router.adapters == ("math/1",) and router.skipped == ("silent/1",)
        d = await svc.route(prompt="Integrate x^3 with respect to x")   # single candidate
        assert d.adapter == "math/1" and d.confidence > 0.2
        assert (await svc.route(prompt=OFF_TOPIC)).action == "base"
        huge = "Solve the equation 7x - 3 = 11 and show each step. " + "x " * 200_000
        d = await svc.route(prompt=huge)                  # cut to max_prompt_chars, answered
        assert d.candidates[0].adapter == "math/1" and d.action in ("adapter", "base")
        with pytest.raises(InvalidRequest):
            await svc.route(prompt="   ")
        with pytest.raises(InvalidRequest):
            await svc.route(prompt="x", top_k=0)
        with pytest.raises(BaseModelNotFound):
            await svc.route(prompt="What is 2+2?", base_model="no-such-base")
    finally:
        await svc.close()


async def test_retrain_racing_with_live_routing(hub, encoder):
    hub.push("math", MATH)
    hub.push("cooking", COOKING)
    svc = await _started(hub, encoder)
    try:
        old = svc.routers[BASE].version
        hub.push("translate", TRANSLATE)
        prompts = ["What is 7 times 8?", "How do I roast vegetables?"] * 10

        async def hammer():
            out = []
            for p in prompts:
                out.append(await svc.route(prompt=p))
                await asyncio.sleep(0)
            return out

        results = await asyncio.gather(svc.sync(), hammer(), hammer())
        fast = svc.routers[BASE]
        assert fast.version.endswith("+inc") and not fast.exact      # one adapter added
        late = await asyncio.gather(svc.settled(), hammer())
        exact = svc.routers[BASE]
        assert exact.exact and exact.version == fast.version.removesuffix("+inc") != old
        for decisions in [*results[1:], late[1]]:
            for p, d in zip(prompts, decisions):
                assert d.router_version in (old, fast.version, exact.version)
                assert d.adapter == ("math/1" if "times" in p else "cooking/1")
        assert (await svc.route(prompt="Translate 'hello' to Dutch")).adapter == "translate/1"
    finally:
        await svc.close()


async def test_retrains_on_registry_events(hub_with_events, encoder):
    hub = hub_with_events
    hub.push("math", MATH)
    hub.push("cooking", COOKING)
    svc = _service(hub, encoder, redis_url=hub.redis_url)
    await svc.start(watch=True)
    try:
        await asyncio.wait_for(svc.ready.wait(), 60)
        hub.push("translate", TRANSLATE)                  # publishes version.ready
        for _ in range(600):
            if "translate/1" in svc.routers[BASE].adapters:
                break
            await asyncio.sleep(0.1)
        assert "translate/1" in svc.routers[BASE].adapters
        d = await svc.route(prompt="Translate 'good night' into German")
        assert d.adapter == "translate/1"
    finally:
        await svc.close()


async def test_http_api(hub, encoder):
    from quiver.routing.app import create_app

    hub.push("math", MATH)
    hub.push("cooking", COOKING)
    settings = RouterSettings(registry_url=hub.url, fallback="error", threshold=0.3)
    app = create_app(settings, encoder=encoder, client=AsyncClient(hub.url, hub.token))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://router") as http:
            assert (await http.get("/health")).json() == {"status": "ok"}
            for _ in range(600):
                if (await http.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await http.get("/ready")).status_code == 200
            r = await http.post("/v1/route", json={"prompt": "Recipe for pancakes?", "top_k": 1})
            body = r.json()
            assert r.status_code == 200 and body["adapter"] == "cooking/1"
            assert len(body["candidates"]) == 1 and body["latency_ms"] > 0
            r = await http.post("/v1/route", json={"prompt": OFF_TOPIC})
            assert r.status_code == 422 and r.headers["x-error-code"] == "routing_abstained"
            r = await http.post("/v1/route", json={"prompt": ""})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
            r = await http.post("/v1/route", json={"prompt": "hi", "top_k": 0})
            assert r.status_code == 400
            items = (await http.get("/v1/routers")).json()["items"]
            assert items[0]["base_model"] == BASE and items[0]["example_counts"]["math/1"] == 6
            hub.push("translate", TRANSLATE)
            items = (await http.post("/v1/routers/refresh")).json()["items"]
            assert "translate/1" in items[0]["adapters"]
            metrics = (await http.get("/metrics")).text
            assert 'quiver_router_requests_total{action="adapter"} 1.0' in metrics
            assert 'quiver_router_errors_total{code="routing_abstained"} 1.0' in metrics
