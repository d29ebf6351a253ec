"""The real openai client through a real gateway to real (stand-in) backends and registry."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.gateway.conftest import (BASE, OTHER_BASE, start_backend, start_gateway,
                                     start_registry)

pytestmark = pytest.mark.services


def client(gw, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def fleet(module_spawn, tmp_path_factory):
    """One gateway over two backends (one per base model) and a registry, for the tests that
    change nothing."""
    b1 = start_backend(module_spawn, "b1")
    b2 = start_backend(module_spawn, "q1", base_model=OTHER_BASE)
    reg = start_registry(module_spawn, tmp_path_factory.mktemp("registry"))
    gw = start_gateway(module_spawn, [b1, b2], reg)
    return gw, b1, b2, reg


def test_chat_and_completions_streaming_and_not(fleet):
    gw, b1, _, _ = fleet
    c = client(gw)
    raw = c.chat.completions.with_raw_response.create(
        model="acme/support@prod", messages=[{"role": "user", "content": "hello"}])
    chat = raw.parse()
    assert chat.choices[0].message.content.startswith("b1|acme/support/1|")
    assert raw.headers["x-quiver-adapter"] == "acme/support/1"
    assert raw.headers["x-quiver-backend"] == "b1"
    assert float(raw.headers["x-quiver-route-confidence"]) == 1.0
    assert raw.headers["x-request-id"]

    text = c.completions.create(model="acme/support", prompt="hi", max_tokens=3)
    assert text.choices[0].text == "b1|acme/support/2|w0 w1 w2"  # latest = 2
    assert text.usage.total_tokens == 7

    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="acme/legal/1", messages=[{"role": "user", "content": "x"}], stream=True,
        max_tokens=5) if ch.choices]
    assert "".join(pieces) == "b1|acme/legal/1|w0 w1 w2 w3 w4 "

    stream = c.completions.create(model=BASE, prompt="x", stream=True, max_tokens=4,
                                  stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == \
        f"b1|{BASE}|w0 w1 w2 w3 "
    assert chunks[-1].usage.completion_tokens == 4


def test_requests_go_only_to_backends_of_the_right_base_model(fleet):
    gw, _, _, _ = fleet
    c = client(gw)
    for _ in range(5):
        out = c.completions.create(model="qwen-helper", prompt="x", max_tokens=1)
        assert out.choices[0].text.startswith("q1|qwen-helper/1|")
        out = c.completions.create(model=OTHER_BASE, prompt="x", max_tokens=1)
        assert out.choices[0].text.startswith(f"q1|{OTHER_BASE}|")


def test_request_id_passes_through_and_models_lists_everything(fleet):
    gw, _, _, _ = fleet
    r = httpx.post(f"{gw.url}/v1/completions", headers={"x-request-id": "req-42"},
                   json={"model": BASE, "prompt": "x"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    assert r.headers["x-quiver-adapter"] == ""
    ids = {m.id for m in client(gw).models.list()}
    assert {BASE, OTHER_BASE, "acme/support/1", "acme/support/2", "acme/support@prod",
            "acme/legal/1", "qwen-helper/1"} <= ids


def test_unknown_models_and_bad_requests_get_openai_errors(fleet):
    gw, b1, _, _ = fleet
    c = client(gw)
    before = b1.stats()["requests"]
    for model in ("acme/nothing", "acme/support/9", "acme/support@canary", "Not A Ref!!", ""):
        with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as info:
            c.completions.create(model=model, prompt="x")
        assert info.value.status_code == (400 if model == "" else 404)
    with pytest.raises(openai.NotFoundError) as info:
        c.chat.completions.create(model="acme/nothing", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["type"] == "not_found_error"

    r = httpx.post(f"{gw.url}/v1/chat/completions", content=b'{"model": "tiny',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=b'["a list"]')
    assert r.status_code == 400
    big = json.dumps({"model": BASE, "prompt": "x" * (5 * 1024 * 1024)})
    r = httpx.post(f"{gw.url}/v1/completions", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    # Chunked upload without a length is cut off at the limit as well.
    r = httpx.post(f"{gw.url}/v1/completions",
                   content=(b"x" * 65536 for _ in range(100)))
    assert r.status_code == 413
    assert b1.stats()["requests"] == before  # nothing bad reached the backend
    # And the gateway still serves.
    assert c.completions.create(model=BASE, prompt="x").choices[0].text.startswith("b1|")


def test_route_explains_without_generating(fleet):
    gw, b1, _, _ = fleet
    before = b1.stats()["requests"]
    r = httpx.post(f"{gw.url}/v1/route", json={"model": "acme/support@prod", "prompt": "x"})
    assert r.status_code == 200
    body = r.json()
    assert body["adapter"] == "acme/support/1" and body["base_model"] == BASE
    assert [b["backend_id"] for b in body["backends"]] == ["b1"]
    assert b1.stats()["requests"] == before


def test_auto_uses_the_router_and_reports_its_confidence(fleet, spawn, gateway):
    _, b1, _, reg = fleet
    routes = {"refund": "acme/support/2", "contract": "acme/legal/1"}
    router = spawn(["-m", "tests.gateway.standin", "router", "--base-model", BASE,
                    "--routes", json.dumps(routes)])
    gw = gateway([b1], reg, router)
    c = client(gw)
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "I want a refund"}])
    assert raw.parse().choices[0].message.content.startswith("b1|acme/support/2|")
    assert raw.headers["x-quiver-adapter"] == "acme/support/2"
    assert float(raw.headers["x-quiver-route-confidence"]) == pytest.approx(0.9)
    out = c.completions.create(model="auto", prompt="weather today?",
                               extra_headers={"x-quiver-base-model": BASE})
    assert out.choices[0].text.startswith(f"b1|{BASE}|")  # router chose the base model
    r = httpx.post(f"{gw.url}/v1/route", json={"prompt": "read this contract"})
    assert r.json()["adapter"] == "acme/legal/1" and r.json()["confidence"] == pytest.approx(0.9)


def test_router_abstaining_is_a_clear_error(fleet, spawn, gateway):
    _, b1, _, reg = fleet
    router = spawn(["-m", "tests.gateway.standin", "router", "--base-model", BASE,
                    "--routes", "{}", "--abstain"])
    gw = gateway([b1], reg, router)
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": "auto", "prompt": "x"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "routing_abstained"


def test_a_moved_alias_is_followed_at_once(backend, registry, gateway, redis_url):
    reg = registry(redis_url=redis_url)
    gw = gateway([backend("b1")], reg,
                 env={"QUIVER_REDIS_URL": redis_url, "QUIVER_RESOLVE_TTL_S": "600"})
    c = client(gw)
    first = c.completions.create(model="acme/support@prod", prompt="x")
    assert "|acme/support/1|" in first.choices[0].text
    time.sleep(0.5)  # the gateway's event subscription is up
    httpx.put(f"{reg.url}/api/v1/repos/acme/support/-/aliases/prod", json={"version": 2})
    deadline = time.monotonic() + 3
    while True:
        out = c.completions.create(model="acme/support@prod", prompt="x")
        if "|acme/support/2|" in out.choices[0].text:
            break
        assert time.monotonic() < deadline, "the alias move was not followed"
        time.sleep(0.05)


def test_residency_steers_traffic_and_heartbeats_discover_backends(backend, registry, gateway,
                                                                   redis_url):
    cold = backend("cold", redis_url=redis_url)
    warm = backend("warm", resident="acme/legal/1", redis_url=redis_url)
    # No --backend at all: both come from their Redis heartbeats.
    gw = gateway([], registry(), env={"QUIVER_REDIS_URL": redis_url})
    deadline = time.monotonic() + 10
    while len(httpx.post(f"{gw.url}/v1/route", json={"model": BASE}).json()["backends"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    c = client(gw)
    for _ in range(6):
        raw = c.completions.with_raw_response.create(model="acme/legal/1", prompt="x")
        assert raw.headers["x-quiver-backend"] == "warm"
    # A backend whose heartbeat expires stops receiving traffic.
    warm.kill()
    deadline = time.monotonic() + 10
    while True:
        backends = httpx.post(f"{gw.url}/v1/route", json={"model": BASE}).json()["backends"]
        if [b["backend_id"] for b in backends] == ["cold"]:
            break
        assert time.monotonic() < deadline, backends
        time.sleep(0.2)
    for _ in range(3):
        out = c.completions.create(model="acme/legal/1", prompt="x")
        assert out.choices[0].text.startswith("cold|")
    cold.kill()
    deadline = time.monotonic() + 10
    while httpx.get(f"{gw.url}/ready").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with pytest.raises(openai.APIStatusError) as info:
        c.completions.create(model=BASE, prompt="x")
    assert info.value.status_code == 503
    assert info.value.body["code"] == "no_backend_available"


def test_registry_outage_serves_cached_resolutions(fleet, registry, gateway):
    _, b1, _, _ = fleet
    reg = registry()
    gw = gateway([b1], reg, env={"QUIVER_RESOLVE_TTL_S": "0.1"})
    c = client(gw)
    assert "|acme/support/1|" in c.completions.create(model="acme/support@prod",
                                                      prompt="x").choices[0].text
    reg.kill()
    time.sleep(0.3)  # the cached resolution is no longer fresh
    out = c.completions.create(model="acme/support@prod", prompt="x")
    assert "|acme/support/1|" in out.choices[0].text
    with pytest.raises(openai.APIStatusError) as info:
        c.completions.create(model="acme/legal/1", prompt="x")  # never resolved before
    assert info.value.status_code == 503
    assert info.value.body["code"] == "registry_unavailable"


def test_auto_keeps_to_what_the_key_may_use(fleet, spawn, gateway):
    _, b1, _, reg = fleet
    routes = {"refund": "acme/support/2", "contract": "acme/legal/1"}
    router = spawn(["-m", "tests.gateway.standin", "router", "--base-model", BASE,
                    "--routes", json.dumps(routes)])
    gw = gateway([b1], reg, router, env={"QUIVER_ADMIN_TOKEN": "adm"})
    made = httpx.post(f"{gw.url}/admin/keys", json={"name": "legal", "adapters": ["acme/legal"]},
                      headers={"Authorization": "Bearer adm"}).json()
    c = client(gw, made["key"])
    raw = c.completions.with_raw_response.create(model="auto", prompt="refund please")
    # The router preferred acme/support/2, which this key may not use: its next candidate.
    assert raw.headers["x-quiver-adapter"] == "acme/legal/1"
    assert raw.parse().choices[0].text.startswith("b1|acme/legal/1|")
    r = httpx.post(f"{gw.url}/v1/route", json={"prompt": "refund please"},
                   headers={"Authorization": f"Bearer {made['key']}"})
    assert r.json()["adapter"] == "acme/legal/1"
