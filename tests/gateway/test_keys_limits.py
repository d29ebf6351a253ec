"""API keys, per-key permissions and rate limits, shared by replicas through a real Redis."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import openai
import pytest

from tests.conftest import free_port, service_missing, wait_for_port
from tests.gateway.conftest import BASE, metric

pytestmark = pytest.mark.services
ADMIN = "admin-secret"


def admin(gw, **body) -> dict:
    r = httpx.post(f"{gw.url}/admin/keys", json=body,
                   headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return r.json()


def client(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=20)


def test_keys_are_required_hashed_and_scoped(backend, registry, gateway, tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps([{"key": "file-key-123", "name": "from-file",
                                      "adapters": ["acme/legal"]}]))
    gw = gateway([backend("b1")], registry(),
                 env={"QUIVER_ADMIN_TOKEN": ADMIN, "QUIVER_KEYS_FILE": str(keys_file)})
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": BASE, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client(gw, "qk-made-up").completions.create(model=BASE, prompt="x")
    r = httpx.post(f"{gw.url}/admin/keys", json={"name": "x"})
    assert r.status_code == 401
    r = httpx.post(f"{gw.url}/admin/keys", json={"name": "x"},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.post(f"{gw.url}/admin/keys", json={"name": "x", "rpm": -3},
                   headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 400

    created = admin(gw, name="support-team", adapters=["acme/*"], base_models=False)
    team = client(gw, created["key"])
    out = team.completions.create(model="acme/support@prod", prompt="x")
    assert "|acme/support/1|" in out.choices[0].text
    with pytest.raises(openai.PermissionDeniedError):
        team.completions.create(model="other/bot/1", prompt="x")
    with pytest.raises(openai.PermissionDeniedError):
        team.completions.create(model=BASE, prompt="x")
    assert {m.id for m in team.models.list()} >= {"acme/support/1", "acme/legal/1"}
    assert not any(m.id.startswith("other/") or m.id == BASE for m in team.models.list())

    from_file = client(gw, "file-key-123")
    assert from_file.completions.create(model="acme/legal/1", prompt="x").choices
    with pytest.raises(openai.PermissionDeniedError):
        from_file.completions.create(model="acme/support/1", prompt="x")

    listing = httpx.get(f"{gw.url}/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"})
    text = listing.text
    assert "support-team" in text and created["key"] not in text and "file-key-123" not in text
    r = httpx.delete(f"{gw.url}/admin/keys/{created['id']}",
                     headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 204
    with pytest.raises(openai.AuthenticationError):
        team.completions.create(model="acme/support/1", prompt="x")


def test_two_replicas_sharing_redis_enforce_one_limit(backend, gateway, redis_url):
    b = backend("b1")
    env = {"QUIVER_ADMIN_TOKEN": ADMIN, "QUIVER_REDIS_URL": redis_url}
    gw1, gw2 = gateway([b], env=env), gateway([b], env=env)
    key = admin(gw1, name="limited", rpm=6)["key"]
    statuses, retry_after = [], []
    for i in range(12):
        gw = (gw1, gw2)[i % 2]
        r = httpx.post(f"{gw.url}/v1/completions", json={"model": BASE, "prompt": "x"},
                       headers={"Authorization": f"Bearer {key}"})
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limited"
            assert r.json()["error"]["type"] == "rate_limit_error"
            retry_after.append(int(r.headers["retry-after"]))
    assert statuses.count(200) == 6 and statuses.count(429) == 6
    assert all(1 <= s <= 120 for s in retry_after)
    assert metric(gw1, "quiver_gateway_rate_limited_total", limit="rpm") \
        + metric(gw2, "quiver_gateway_rate_limited_total", limit="rpm") == 6


def test_tokens_per_minute_counts_usage(backend, gateway):
    gw = gateway([backend("b1")], env={"QUIVER_ADMIN_TOKEN": ADMIN})
    key = admin(gw, name="tokens", tpm=40)["key"]
    c = client(gw, key)
    served = 0
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(20):  # each answer uses 4 prompt + 8 completion tokens
            stream = served % 2 == 1
            out = c.completions.create(model=BASE, prompt="x", max_tokens=8, stream=stream)
            if stream:
                list(out)
            served += 1
    assert 3 <= served <= 4
    assert info.value.body["details"]["limit"] == "tpm"
    assert int(info.value.response.headers["retry-after"]) >= 1


@pytest.fixture
def own_redis():
    """A private redis-server that the test may kill (never the shared one)."""
    exe = shutil.which("redis-server")
    if exe is None:
        service_missing("redis-server (to start a private Redis)", "not on PATH")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield proc, f"redis://127.0.0.1:{port}/0"
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_redis_loss_applies_the_configured_policy(backend, gateway, own_redis):
    proc, url = own_redis
    b = backend("b1")
    base = {"QUIVER_ADMIN_TOKEN": ADMIN, "QUIVER_REDIS_URL": url}
    fail_open = gateway([b], env={**base, "QUIVER_RATE_LIMIT_FAILURE": "open"})
    fail_closed = gateway([b], env={**base, "QUIVER_RATE_LIMIT_FAILURE": "closed"})
    key = admin(fail_open, name="k", rpm=1000)["key"]
    body = {"model": BASE, "prompt": "x"}
    auth = {"Authorization": f"Bearer {key}"}
    for gw in (fail_open, fail_closed):
        assert httpx.post(f"{gw.url}/v1/completions", json=body, headers=auth).status_code == 200
    proc.kill()
    proc.wait(timeout=10)
    for _ in range(3):
        r = httpx.post(f"{fail_open.url}/v1/completions", json=body, headers=auth, timeout=10)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{fail_closed.url}/v1/completions", json=body, headers=auth, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "fail-closed" in r.json()["error"]["message"]
    assert metric(fail_open, "quiver_gateway_rate_limiter_errors_total", policy="open") == 3
    assert metric(fail_closed, "quiver_gateway_rate_limiter_errors_total", policy="closed") == 3
    assert metric(fail_open, "quiver_gateway_rate_limiter_degraded") == 1
    # A key never seen before cannot be checked: refused either way (no fail-open auth).
    r = httpx.post(f"{fail_open.url}/v1/completions", json=body,
                   headers={"Authorization": "Bearer qk-unknown"}, timeout=10)
    assert r.status_code == 503
    assert httpx.get(f"{fail_open.url}/health").status_code == 200
