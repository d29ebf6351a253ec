"""The backend as users and operators see it: bad input, failures, alias moves, residency
reporting, metrics and shutdown, all over HTTP against a live server."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from quiver.wire import HEARTBEAT_PREFIX, BackendHeartbeat
from tests.backend.conftest import BASE
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def _complete(url: str, model: str, prompt: str = "hello world", max_tokens: int = 8,
              **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=30,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, **extra})


@pytest.fixture
def backend(registry, make_backend):
    reg, _ = registry
    return make_backend(reg.url)


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(backend):
    url = backend.url
    cases = [
        (httpx.post(f"{url}/v1/completions", content=b"{oops",
                    headers={"content-type": "application/json"}), 400, "invalid_request"),
        (httpx.post(f"{url}/v1/chat/completions", json={"model": BASE}), 400,
         "invalid_request"),
        (_complete(url, BASE, max_tokens=10**9), 400, "context_length_exceeded"),
        (_complete(url, BASE, max_tokens=-5), 400, "invalid_request"),
        (_complete(url, BASE, prompt="hello " * 400), 400, "context_length_exceeded"),
        (_complete(url, BASE, prompt="x" * 500_000), 400, "context_length_exceeded"),
        (_complete(url, BASE, n=1000), 400, "invalid_request"),
        (_complete(url, BASE, prompt=[1, 2, 99999]), 400, "invalid_request"),
        (_complete(url, BASE, top_p=0), 400, "invalid_request"),
        (_complete(url, "team/does-not-exist"), 404, "repo_not_found"),
        (_complete(url, "team/a0/99"), 404, "version_not_found"),
        (_complete(url, "team/moving@nope"), 404, "alias_not_found"),
        (_complete(url, "Not a model!"), 404, "model_not_found"),
        (_complete(url, "team/other/1"), 422, "incompatible_adapter"),
        (_complete(url, "team/big/1"), 422, "unservable_adapter"),
    ]
    for resp, status, code in cases:
        assert resp.status_code == status, (code, resp.text)
        body = resp.json()["error"]
        assert body["code"] == code and body["message"] and "type" in body
        assert resp.headers["x-error-code"] == code
    incompatible = cases[-2][0].json()["error"]
    assert incompatible["details"][0]["found"] == "tiny-other"
    assert _complete(url, "team/a0/1").status_code == 200
    stream = httpx.post(f"{url}/v1/completions", json={
        "model": BASE, "prompt": "hi", "max_tokens": 10**9, "stream": True})
    assert stream.status_code == 400                     # refused before the stream starts


def test_openai_client_sees_typed_errors(backend):
    client = openai.OpenAI(base_url=f"{backend.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="team/missing", prompt="hi", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="team/big/1", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=BASE, prompt="hi", max_tokens=100_000)


def test_eviction_under_load_keeps_every_answer_right(backend):
    """Eight adapters through four slots, many requests at once: each answer is the one that
    adapter gives alone."""
    url = backend.url
    models = [f"team/a{i}/1" for i in range(8)]
    alone = {m: _complete(url, m, max_tokens=12).json()["choices"][0]["text"] for m in models}

    async def burst() -> list[tuple[str, httpx.Response]]:
        async with httpx.AsyncClient(timeout=60) as client:
            order = models * 3
            resps = await asyncio.gather(*(client.post(f"{url}/v1/completions", json={
                "model": m, "prompt": "hello world", "max_tokens": 12, "temperature": 0})
                for m in order))
            return list(zip(order, resps))

    for _ in range(3):
        for model, resp in asyncio.run(burst()):
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["text"] == alone[model], model
    metrics = httpx.get(f"{url}/metrics").text
    evictions = [line for line in metrics.splitlines()
                 if line.startswith('quiver_backend_evictions_total{tier="gpu"}')]
    assert evictions and float(evictions[0].split()[-1]) >= 4


def test_alias_moved_between_two_requests(fresh_registry, make_backend):
    reg, infos = fresh_registry
    backend = make_backend(reg.url)
    first = _complete(backend.url, "team/moving@prod")
    assert first.json()["model"] == "team/moving/1"
    with reg.client() as c:
        c.set_alias("team/moving", "prod", 2)
    second = _complete(backend.url, "team/moving@prod")
    assert second.json()["model"] == "team/moving/2"
    direct = _complete(backend.url, "team/moving/2")
    assert second.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
    assert second.json()["choices"][0]["text"] != first.json()["choices"][0]["text"]


def test_registry_stopped_mid_run(fresh_registry, make_backend):
    reg, _ = fresh_registry
    backend = make_backend(reg.url, registry_retry_after=4.0)
    assert _complete(backend.url, "team/a0/1").status_code == 200
    assert _complete(backend.url, "team/moving@prod").status_code == 200
    reg.stop()
    assert _complete(backend.url, "team/a0/1").status_code == 200
    assert _complete(backend.url, "team/moving@prod").json()["model"] == "team/moving/1"
    cold = _complete(backend.url, "team/a5/1")
    assert cold.status_code == 503
    assert cold.json()["error"]["code"] == "registry_unavailable"
    assert cold.headers["retry-after"] == "4"
    assert _complete(backend.url, BASE).status_code == 200


def test_adapters_api(backend):
    url = backend.url
    r = httpx.post(f"{url}/v1/adapters/load", json={"adapter": "team/a4", "pin": True})
    assert r.status_code == 200, r.text
    assert r.json()["ref"] == "team/a4/1" and r.json()["tier"] == "gpu" and r.json()["pinned"]
    listing = httpx.get(f"{url}/v1/adapters").json()
    assert [a["ref"] for a in listing["data"]] == ["team/a4/1"]
    assert listing["slots"] == {"total": 4, "free": 3}
    assert httpx.post(f"{url}/v1/adapters/pin",
                      json={"adapter": "team/a4/1", "pinned": False}).json()["pinned"] is False
    r = httpx.post(f"{url}/v1/adapters/unload", json={"adapter": "team/a4/1"})
    assert r.status_code == 200 and r.json()["tiers"] == ["host", "disk"]
    r = httpx.post(f"{url}/v1/adapters/unload", json={"adapter": "team/a4/1", "purge": True})
    assert r.json()["tiers"] == []
    assert httpx.post(f"{url}/v1/adapters/unload",
                      json={"adapter": "team/a4/1"}).status_code == 404
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").status_code == 200


def test_metrics_count_what_happened(backend):
    url = backend.url
    assert _complete(url, "team/a0/1", max_tokens=5).status_code == 200
    assert _complete(url, "team/missing").status_code == 404
    text = httpx.get(f"{url}/metrics").text
    want = ['quiver_backend_requests_total{endpoint="completions",status="200"} 1.0',
            'quiver_backend_requests_total{endpoint="completions",status="404"} 1.0',
            'quiver_backend_errors_total{code="repo_not_found"} 1.0',
            "quiver_backend_generated_tokens_total 5.0",
            'quiver_backend_adapters_resident{tier="gpu"} 1.0',
            'quiver_backend_adapter_load_seconds_count{source="registry"} 1.0',
            'quiver_backend_adapter_pulls_total{result="ok"} 1.0',
            "quiver_backend_queue_depth 0.0"]
    for line in want:
        assert line in text, line
    assert "quiver_backend_tokens_per_second" in text


def test_heartbeat_in_redis_and_state(registry, make_backend, redis_url):
    import redis

    reg, _ = registry
    backend = make_backend(reg.url, redis_url=redis_url, heartbeat_interval=0.1,
                           advertise_url="http://backend-7:8300")
    assert _complete(backend.url, "team/a2/1").status_code == 200
    r = redis.Redis.from_url(redis_url)
    key = HEARTBEAT_PREFIX + backend.runtime.settings.backend_id
    deadline = time.monotonic() + 5
    while True:
        raw = r.get(key)
        beat = BackendHeartbeat.model_validate_json(raw) if raw else None
        if beat is not None and beat.gpu == ["team/a2/1"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert beat is not None and beat.gpu == ["team/a2/1"]
    assert beat.url == "http://backend-7:8300" and beat.base_model == BASE
    assert beat.total_slots == 4 and beat.free_slots == 3 and not beat.draining
    assert beat.max_running == 16                     # the engine's rows (see conftest)
    assert 0 < r.pttl(key) <= 5000
    state = httpx.get(f"{backend.url}/v1/state").json()
    assert state["gpu"] == ["team/a2/1"] and state["disk"] == ["team/a2/1"]
    backend.stop()
    assert r.get(key) is None                          # removed on shutdown
    r.close()


def test_graceful_shutdown_finishes_in_flight_streams(registry, make_backend):
    reg, _ = registry
    backend = make_backend(reg.url, drain_timeout=20.0)
    chunks: list[str] = []
    started = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", f"{backend.url}/v1/completions", timeout=60, json={
                "model": "team/a1/1", "prompt": "hello", "max_tokens": 200,
                "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    chunks.append(line[6:])
                    time.sleep(0.005)                 # a slow reader keeps the stream open

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(20)
    backend.server.handle_exit(15, None)
    time.sleep(0.2)
    assert backend.runtime is None or backend.runtime.generation.draining
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{backend.url}/health", timeout=2)  # no longer accepting
    reader.join(60)
    backend.thread.join(30)
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert not backend.thread.is_alive()


class _CorruptingProxy:
    """Forwards to the registry; flips a byte in the first ``times`` downloads of ``sha`` and
    holds every download of it for ``delay`` seconds."""

    def __init__(self, upstream: str, sha: str, times: int, delay: float = 0.0) -> None:
        from starlette.applications import Starlette
        from starlette.responses import Response
        from starlette.routing import Route

        self.served = 0

        async def forward(request):
            async with httpx.AsyncClient(base_url=upstream, timeout=30) as c:
                headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
                r = await c.request(request.method, request.url.path,
                                    params=dict(request.query_params), headers=headers,
                                    content=await request.body())
            body = r.content
            if request.url.path.endswith(f"/blobs/{sha}") and request.method == "GET":
                await asyncio.sleep(delay)
                self.served += 1
                if self.served <= times:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
            keep = {k: v for k, v in r.headers.items()
                    if k.lower() not in ("content-length", "content-encoding",
                                         "transfer-encoding", "connection")}
            return Response(body, status_code=r.status_code, headers=keep)

        import uvicorn

        self.port = free_port()
        app = Starlette(routes=[Route("/{path:path}", forward,
                                      methods=["GET", "HEAD", "POST", "PUT"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _weights_sha(info) -> str:
    return next(f.sha256 for f in info.files if f.path.endswith(".safetensors"))


def test_corrupt_download_is_retried_never_loaded(registry, make_backend):
    reg, infos = registry
    first = make_backend(reg.url)
    clean = _complete(first.url, "team/a7/1").json()["choices"][0]["text"]
    first.stop()                                          # one app per engine at a time
    proxy = _CorruptingProxy(reg.url, _weights_sha(infos["a7"]), times=1)
    try:
        backend = make_backend(proxy.url)
        r = _complete(backend.url, "team/a7/1")
        assert r.status_code == 200, r.text
        assert proxy.served >= 2                        # the corrupt copy was fetched again
        assert r.json()["choices"][0]["text"] == clean
    finally:
        proxy.stop()


def test_always_corrupt_download_fails_cleanly(registry, make_backend):
    reg, infos = registry
    proxy = _CorruptingProxy(reg.url, _weights_sha(infos["a6"]), times=1000)
    try:
        backend = make_backend(proxy.url)
        r = _complete(backend.url, "team/a6/1")
        assert r.status_code in (422, 502), r.text
        assert r.json()["error"]["code"] in ("checksum_mismatch", "upstream_error")
        listing = httpx.get(f"{backend.url}/v1/adapters").json()["data"]
        assert listing == []                              # nothing of it was kept
        assert _complete(backend.url, "team/a0/1").status_code == 200
    finally:
        proxy.stop()


def test_a_slow_pull_holds_up_nobody_else(registry, make_backend):
    reg, infos = registry
    proxy = _CorruptingProxy(reg.url, _weights_sha(infos["a5"]), times=0, delay=3.0)
    try:
        backend = make_backend(proxy.url)
        assert _complete(backend.url, "team/a0/1").status_code == 200
        result: dict[str, httpx.Response] = {}
        slow = threading.Thread(target=lambda: result.update(r=_complete(backend.url,
                                                                         "team/a5/1")))
        slow.start()
        deadline = time.monotonic() + 10
        while "team/a5/1" not in httpx.get(f"{backend.url}/v1/state").json()["loading"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # While a5 is being pulled, the resident adapter and the base model answer.
        assert _complete(backend.url, "team/a0/1").status_code == 200
        assert _complete(backend.url, BASE).status_code == 200
        assert "team/a5/1" in httpx.get(f"{backend.url}/v1/state").json()["loading"]
        slow.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["model"] == "team/a5/1"
    finally:
        proxy.stop()


def test_back_pressure_and_an_unreachable_redis(registry, make_backend):
    """Requests beyond max_running + max_queue get 503 overloaded; a Redis that cannot be
    reached only costs the heartbeat, never the serving."""
    reg, infos = registry
    proxy = _CorruptingProxy(reg.url, _weights_sha(infos["a4"]), times=0, delay=3.0)
    try:
        backend = make_backend(proxy.url, max_running=1, max_queue=1,
                               redis_url=f"redis://127.0.0.1:{free_port()}/0")
        waiting = [threading.Thread(target=_complete, args=(backend.url, "team/a4/1"))
                   for _ in range(2)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 10
        while backend.runtime.generation.active < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = _complete(backend.url, BASE)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
        for t in waiting:
            t.join(30)
        assert _complete(backend.url, BASE).status_code == 200
        assert httpx.get(f"{backend.url}/v1/state").json()["gpu"] == ["team/a4/1"]
    finally:
        proxy.stop()


def test_concurrent_first_requests_pull_once(backend):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return list(await asyncio.gather(*(client.post(
                f"{backend.url}/v1/chat/completions", json={
                    "model": "team/a6/1", "max_tokens": 3, "temperature": 0,
                    "messages": [{"role": "user", "content": f"hello {i}"}]})
                for i in range(8))))

    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    text = httpx.get(f"{backend.url}/metrics").text
    assert 'quiver_backend_adapter_pulls_total{result="ok"} 1.0' in text
    assert 'quiver_backend_adapter_load_seconds_count{source="registry"} 1.0' in text


def test_a_client_that_leaves_cancels_its_generation(backend):
    """Without streaming too: a client that gives up frees its engine rows and its adapter."""
    assert httpx.post(f"{backend.url}/v1/adapters/load",
                      json={"adapter": "team/a3/1"}).status_code == 200
    before = backend.runtime.engine_stats().get("requests_cancelled", 0)
    for path, body in (("/v1/completions", {"prompt": "hello"}),
                       ("/generate", None)):
        payload = body and {"model": "team/a3/1", "max_tokens": 250, "ignore_eos": True,
                            **body}
        if payload is None:
            payload = {"inputs": "hello", "parameters": {
                "adapter_id": "team/a3/1", "max_new_tokens": 250, "ignore_eos_token": True}}
        # 250 tokens of the tiny model can take well under 0.3 s on a fast core; the client
        # gives up after 0.1 s, once the request is running.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{backend.url}{path}", json=payload, timeout=httpx.Timeout(30, read=0.1))
    deadline = time.monotonic() + 10
    while backend.runtime.engine_stats().get("requests_cancelled", 0) < before + 2:
        assert time.monotonic() < deadline, backend.runtime.engine_stats()
        time.sleep(0.05)
    assert backend.runtime.generation.active == 0
    assert httpx.get(f"{backend.url}/v1/adapters").json()["data"][0]["in_use"] == 0
