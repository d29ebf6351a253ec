"""Crashes, slow backends, disconnects and failing backends, through a real gateway process."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest

from tests.gateway.conftest import BASE, metric

pytestmark = pytest.mark.services


def _stream_text(lines: list[str]) -> tuple[str, list[dict]]:
    text, errors = "", []
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            errors.append(event["error"])
        else:
            text += event["choices"][0].get("text", "")
    return text, errors


def test_backend_killed_mid_load(backend, gateway):
    victim = backend("victim", chunk_delay=0.1, delay=0.2)
    survivor = backend("survivor", chunk_delay=0.1, delay=0.2)
    gw = gateway([victim, survivor])
    words = 20
    expected_tail = " ".join(f"w{i}" for i in range(words)) + " "

    async def unary(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/completions", json={"model": BASE, "prompt": "x",
                                                           "max_tokens": words})

    async def streamed(client: httpx.AsyncClient) -> tuple[int, str, list[dict]]:
        async with client.stream("POST", "/v1/completions",
                                 json={"model": BASE, "prompt": "x", "max_tokens": words,
                                       "stream": True}) as r:
            lines = [line async for line in r.aiter_lines()]
        return r.status_code, *_stream_text(lines)

    async def run() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            jobs = [asyncio.ensure_future(unary(client)) for _ in range(24)]
            jobs += [asyncio.ensure_future(streamed(client)) for _ in range(12)]
            await asyncio.sleep(1.2)  # all in flight (2.2 s each): unary waiting, streams flowing
            victim.kill()
            results = await asyncio.gather(*jobs)
        return results[:24], results[24:]

    unaries, streams = asyncio.run(run())
    for r in unaries:  # not one byte had reached the client: retried on the survivor
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == f"survivor|{BASE}|" + expected_tail.strip()
    broken = 0
    for status, text, errors in streams:
        assert status == 200
        owner = text.split("|", 1)[0]
        full = f"{owner}|{BASE}|" + expected_tail
        if errors:  # cut mid-stream: a prefix of one answer, then one error event
            broken += 1
            assert owner == "victim" and full.startswith(text) and len(errors) == 1
            assert errors[0]["code"] == "upstream_error"
        else:
            assert text == full  # complete, never duplicated
    assert broken > 0
    assert metric(gw, "quiver_gateway_stream_errors_total") == broken


def test_client_disconnect_cancels_upstream(backend, gateway):
    b = backend("b", chunk_delay=0.2, delay=0.0)
    gw = gateway([b])
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        with client.stream("POST", "/v1/completions", json={
                "model": BASE, "prompt": "x", "max_tokens": 100, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    slow = backend("slow", delay=30)
    gw2 = gateway([slow])
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw2.url}/v1/completions", json={"model": BASE, "prompt": "x"}, timeout=0.5)
    deadline = time.monotonic() + 5
    while b.stats()["cancelled"] < 1 or slow.stats()["cancelled"] < 1:
        assert time.monotonic() < deadline, (b.stats(), slow.stats())
        time.sleep(0.1)
    assert b.stats()["completed"] == 0 and slow.stats()["completed"] == 0
    assert metric(gw, "quiver_gateway_client_disconnects_total") == 1


def test_slow_backend_times_out_but_long_streams_are_never_cut(backend, gateway):
    slow = backend("slow", delay=5)
    trickle = backend("trickle", chunk_delay=0.4, base_model="trickle-base")
    gw = gateway([slow, trickle], env={"QUIVER_READ_TIMEOUT_S": "1", "QUIVER_MAX_ATTEMPTS": "1"})
    t0 = time.monotonic()
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": BASE, "prompt": "x"}, timeout=20)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert time.monotonic() - t0 < 4
    # 10 chunks 0.4 s apart: 4 s in all, four times the idle-read timeout, never idle 1 s.
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="trickle-base", prompt="x", max_tokens=9, stream=True))
    assert text == "trickle|trickle-base|" + " ".join(f"w{i}" for i in range(9)) + " "


def test_failing_backend_is_retried_elsewhere_then_ejected(backend, gateway):
    bad = backend("bad", status=502)
    good = backend("good")
    gw = gateway([bad, good], env={"QUIVER_EJECT_BASE_S": "30"})
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    for _ in range(30):
        out = c.completions.create(model=BASE, prompt="x")
        assert out.choices[0].text.startswith("good|")
    hits = bad.stats()["requests"]
    assert 3 <= hits <= 6  # ejected after 3 consecutive failures
    for _ in range(20):
        c.completions.create(model=BASE, prompt="x")
    assert bad.stats()["requests"] == hits
    assert metric(gw, "quiver_gateway_ejections_total", backend="bad") == 1
    assert metric(gw, "quiver_gateway_retries_total") == hits


def test_when_every_backend_fails_the_error_is_openai_shaped(backend, gateway, registry):
    b = backend("only", status=503)
    gw = gateway([b])
    r = httpx.post(f"{gw.url}/v1/chat/completions",
                   json={"model": BASE, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    dead = backend("dead")
    gw2 = gateway([dead], registry())
    dead.kill()
    r = httpx.post(f"{gw2.url}/v1/completions", json={"model": BASE, "prompt": "x",
                                                      "stream": True})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_backend_available"
    assert r.headers["retry-after"] == "1"


def test_many_concurrent_streams_complete(backend, gateway):
    b = backend("b", tokens=16)
    gw = gateway([b])

    async def run() -> list[bool | str]:
        limits = httpx.Limits(max_connections=400)
        async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as client:
            async def one() -> bool | str:
                async with client.stream("POST", "/v1/chat/completions", json={
                        "model": BASE, "stream": True,
                        "messages": [{"role": "user", "content": "x"}]}) as r:
                    body = "".join([t async for t in r.aiter_text()])
                ok = r.status_code == 200 and body.rstrip().endswith("data: [DONE]")
                return True if ok else f"{r.status_code}: {body[-300:]}"

            return await asyncio.gather(*(one() for _ in range(200)))

    failures = [r for r in asyncio.run(run()) if r is not True]
    assert not failures, failures[:3]
    assert b.stats()["inflight"] == 0


def test_shutdown_drains_streams_in_flight(backend, gateway):
    b = backend("b", chunk_delay=0.2)
    gw = gateway([b])
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        with client.stream("POST", "/v1/completions", json={
                "model": BASE, "prompt": "x", "max_tokens": 10, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(lines)
            gw.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
    text, errors = _stream_text([first, *rest])
    assert not errors and "data: [DONE]" in rest
    assert text == f"b|{BASE}|" + " ".join(f"w{i}" for i in range(10)) + " "
    # uvicorn re-raises the signal once it has drained, so the exit status may say SIGTERM.
    assert gw.proc.wait(timeout=15) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gw.url}/health")
