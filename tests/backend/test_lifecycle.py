"""Registry events, client disconnects, and the real ``serve()`` process with its signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.backend.conftest import BASE, RegistryProcess, _seed_registry
from tests.conftest import free_port, wait_for_port

pytestmark = pytest.mark.slow


def _complete(url: str, model: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=30, json={
        "model": model, "prompt": "hello world", "max_tokens": 6, "temperature": 0, **extra})


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_alias_event_invalidates_and_prefetches(tmp_path, redis_url, chat_model, other_model,
                                                adapter_dirs, make_backend):
    reg = RegistryProcess(tmp_path / "reg", redis_url=redis_url).start()
    try:
        _seed_registry(reg, chat_model, other_model, adapter_dirs)
        # A long alias TTL: only the registry's event can make the backend ask again.
        backend = make_backend(reg.url, redis_url=redis_url, alias_ttl=3600.0)
        assert _complete(backend.url, "team/moving@prod").json()["model"] == "team/moving/1"
        assert _complete(backend.url, "team/moving@prod").json()["model"] == "team/moving/1"
        with reg.client() as c:
            c.set_alias("team/moving", "prod", 2)
        # The event makes the backend fetch version 2 into its host cache before any request.
        assert _wait(lambda: "team/moving/2" in httpx.get(
            f"{backend.url}/v1/state").json()["host"])
        assert _complete(backend.url, "team/moving@prod").json()["model"] == "team/moving/2"
        metrics = httpx.get(f"{backend.url}/metrics").text
        assert 'quiver_backend_adapter_load_seconds_count{source="host"} 1.0' in metrics
    finally:
        reg.stop()


def test_client_disconnect_releases_the_adapter(registry, make_backend):
    reg, _ = registry
    backend = make_backend(reg.url)
    with httpx.stream("POST", f"{backend.url}/v1/chat/completions", timeout=30, json={
            "model": "team/a5/1", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break                           # leave after the first chunk
    assert _wait(lambda: httpx.get(f"{backend.url}/v1/adapters").json()["data"][0]["in_use"]
                 == 0)
    assert _wait(lambda: backend.runtime.report().running == 0)
    assert backend.runtime.generation.active == 0
    r = httpx.post(f"{backend.url}/v1/adapters/unload", json={"adapter": "team/a5/1"})
    assert r.status_code == 200                  # nothing uses it any more


def test_serve_process_drains_on_sigterm(registry, chat_model, tmp_path, redis_url):
    """``python -m quiver.backend.server`` configured by QUIVER_* variables: it serves, and on
    SIGTERM reports draining, finishes the in-flight stream, removes its heartbeat, exits."""
    import redis

    reg, _ = registry
    port = free_port()
    env = {**os.environ, "QUIVER_MODEL_DIR": str(chat_model), "QUIVER_REGISTRY_URL": reg.url,
           "QUIVER_PORT": str(port), "QUIVER_BASE_MODEL_NAME": BASE,
           "QUIVER_DISK_CACHE_DIR": str(tmp_path / "cache"), "QUIVER_MAX_SLOTS": "4",
           "QUIVER_DEVICE": "cpu", "QUIVER_MAX_CONTEXT": "256", "QUIVER_KV_CACHE_TOKENS": "4096",
           "QUIVER_MAX_RUNNING": "8", "QUIVER_REDIS_URL": redis_url,
           "QUIVER_BACKEND_ID": "proc-test", "QUIVER_HEARTBEAT_INTERVAL": "0.1",
           "QUIVER_DRAIN_TIMEOUT": "30"}
    proc = subprocess.Popen([sys.executable, "-m", "quiver.backend.server"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    r = redis.Redis.from_url(redis_url)
    try:
        wait_for_port(port, timeout=120)
        url = f"http://127.0.0.1:{port}"
        assert _wait(lambda: httpx.get(f"{url}/ready").status_code == 200, 60)
        assert _complete(url, "team/a3/1").status_code == 200
        assert _wait(lambda: r.get("quiver:backends:proc-test") is not None)
        chunks = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                "model": "team/a3/1", "prompt": "hello", "max_tokens": 200,
                "ignore_eos": True, "stream": True}) as resp:
            lines = resp.iter_lines()
            chunks.append(next(line for line in lines if line.startswith("data: ")))
            proc.send_signal(signal.SIGTERM)
            assert _wait(lambda: json.loads(r.get("quiver:backends:proc-test") or "{}")
                         .get("draining") is True, 5)
            for line in lines:
                if line.startswith("data: "):
                    chunks.append(line)
                    time.sleep(0.002)
        assert chunks[-1] == "data: [DONE]"
        assert json.loads(chunks[-2][6:])["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        output = proc.stdout.read().decode()
        assert "Traceback" not in output, output
        assert r.get("quiver:backends:proc-test") is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        r.close()
