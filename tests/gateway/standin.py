"""Small real servers the gateway talks to in tests and in ``bench/gateway_overhead.py``.

- ``backend``: an OpenAI-style server (``/v1/completions``, ``/v1/chat/completions`` with SSE
  streaming, ``/v1/models``, ``/health``, ``/ready``, ``/v1/state``) that answers instantly or
  with configured delays, names itself and the ``model`` it received in every answer, reports
  the adapters it has served as resident, optionally publishes heartbeats to Redis, and counts
  requests that ended because the client went away (``GET /stats``).
- ``registry``: the three read endpoints of the registry contract the gateway uses, over a JSON
  file of versions, plus alias moves that publish ``alias.moved`` events.
- ``router``: ``POST /v1/route`` choosing an adapter by keyword.

Run one with ``python -m tests.gateway.standin backend --port 8001 --base-model tiny``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

HEARTBEAT_PREFIX = "quiver:backends:"


# --- backend ---------------------------------------------------------------------------------

class StandinBackend:
    """A raw ASGI OpenAI-style backend (no framework, so it is never the bottleneck)."""

    def __init__(self, *, backend_id: str, base_model: str, url: str, delay: float = 0.0,
                 chunk_delay: float = 0.0, tokens: int = 8, status: int = 200,
                 resident: list[str] | None = None) -> None:
        self.backend_id = backend_id
        self.base_model = base_model
        self.url = url
        self.delay = delay
        self.chunk_delay = chunk_delay
        self.tokens = tokens
        self.status = status
        self.resident: list[str] = list(resident or [])
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "inflight": 0}

    def heartbeat(self) -> dict[str, Any]:
        return {"backend_id": self.backend_id, "url": self.url, "base_model": self.base_model,
                "gpu": self.resident, "total_slots": 8,
                "free_slots": max(0, 8 - len(self.resident)),
                "queue_depth": 0, "running": self.stats["inflight"], "ts": time.time()}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if method == "GET":
            if path in ("/health", "/ready"):
                return await _json(send, 200, {"status": "ok"})
            if path == "/v1/state":
                return await _json(send, 200, self.heartbeat())
            if path == "/stats":
                return await _json(send, 200, self.stats)
            if path == "/v1/models":
                data = [{"id": self.base_model, "object": "model", "owned_by": "standin"}]
                data += [{"id": a, "object": "model", "owned_by": "standin",
                          "parent": self.base_model} for a in self.resident]
                return await _json(send, 200, {"object": "list", "data": data})
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            chat = path.endswith("chat/completions")
            return await self._generate(scope, receive, send, chat=chat)
        await _json(send, 404, {"error": {"message": f"no route {path}", "type": "not_found_error",
                                          "param": None, "code": "not_found"}})

    async def _generate(self, scope: dict[str, Any], receive: Any, send: Any, chat: bool) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.stats["requests"] += 1
        if self.status != 200:
            return await _json(send, self.status, {"error": {
                "message": f"stand-in answers {self.status}", "type": "server_error",
                "param": None, "code": "standin"}})
        request = json.loads(body)
        model = request.get("model", "")
        if model != self.base_model and model not in self.resident:
            self.resident.append(model)
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        self.stats["inflight"] += 1
        try:
            if await _sleep_unless(gone, self.delay):
                self.stats["cancelled"] += 1
                return
            n = int(request.get("max_tokens") or self.tokens)
            words = [f"w{i}" for i in range(n)]
            prefix = f"{self.backend_id}|{model}|"
            created = int(time.time())
            if request.get("stream"):
                await self._stream(send, gone, chat, model, prefix, words, created,
                                   bool((request.get("stream_options") or {}).get("include_usage")))
            else:
                if await _sleep_unless(gone, self.chunk_delay * n):  # as long as a stream
                    self.stats["cancelled"] += 1
                    return
                text = prefix + " ".join(words)
                usage = {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}
                if chat:
                    choice = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}
                else:
                    choice = {"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}
                kind = "chat.completion" if chat else "text_completion"
                await _json(send, 200, {"id": "cmpl-standin", "object": kind, "created": created,
                                        "model": model, "choices": [choice], "usage": usage})
                self.stats["completed"] += 1
        finally:
            self.stats["inflight"] -= 1
            watcher.cancel()

    async def _stream(self, send: Any, gone: asyncio.Event, chat: bool, model: str, prefix: str,
                      words: list[str], created: int, include_usage: bool) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        kind = "chat.completion.chunk" if chat else "text_completion"
        pieces = [prefix] + [w + " " for w in words]
        for i, piece in enumerate(pieces):
            if i and await _sleep_unless(gone, self.chunk_delay):
                self.stats["cancelled"] += 1
                return
            if chat:
                delta = {"content": piece} if i else {"role": "assistant", "content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": None}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None, "logprobs": None}
            chunk = {"id": "cmpl-standin", "object": kind, "created": created, "model": model,
                     "choices": [choice]}
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + json.dumps(chunk).encode() + b"\n\n"})
        tail = b""
        if include_usage:
            usage = {"id": "cmpl-standin", "object": kind, "created": created, "model": model,
                     "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": len(words),
                                              "total_tokens": 4 + len(words)}}
            tail = b"data: " + json.dumps(usage).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})
        self.stats["completed"] += 1


async def _sleep_unless(gone: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``; True if the client went away meanwhile."""
    if seconds <= 0:
        return gone.is_set()
    try:
        await asyncio.wait_for(gone.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return False


async def _json(send: Any, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _publish_heartbeats(backend: StandinBackend, redis_url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    while True:
        try:
            await client.set(HEARTBEAT_PREFIX + backend.backend_id,
                             json.dumps(backend.heartbeat()), ex=2)
        except Exception:  # noqa: BLE001 - a stand-in keeps serving without Redis
            pass
        await asyncio.sleep(0.5)


# --- registry --------------------------------------------------------------------------------

def registry_app(data_file: Path, redis_url: str | None) -> FastAPI:
    """The registry's read contract over ``data_file``: ``{"base_models": [BaseModelInfo],
    "versions": [VersionInfo]}``. Alias moves rewrite the file and publish ``alias.moved``."""
    app = FastAPI()

    def load() -> dict[str, Any]:
        return json.loads(data_file.read_text())

    def missing(code: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message, "details": None}},
                            status_code=404, headers={"X-Error-Code": code})

    @app.get("/api/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/v1/base-models")
    async def base_models() -> dict[str, Any]:
        return {"items": load()["base_models"]}

    @app.get("/api/v1/versions")
    async def versions(status: str = "ready", base_model: str | None = None) -> dict[str, Any]:
        items = [v for v in load()["versions"] if v["status"] == status
                 and (base_model is None or v["base_model"] == base_model)]
        return {"items": items, "next_cursor": None}

    @app.get("/api/v1/resolve/{ref:path}")
    async def resolve(ref: str) -> Response:
        versions = load()["versions"]
        if "@" in ref:
            repo, _, alias = ref.partition("@")
            found = [v for v in versions if v["repo"] == repo and alias in v["aliases"]]
            if not any(v["repo"] == repo for v in versions):
                return missing("repo_not_found", f"no repo {repo}")
            if not found:
                return missing("alias_not_found", f"no alias {alias} in {repo}")
            return JSONResponse(found[0])
        head, _, tail = ref.rpartition("/")
        if tail.isdigit():
            found = [v for v in versions if v["repo"] == head and v["version"] == int(tail)]
            if not found:
                return missing("version_not_found", f"no version {ref}")
            return JSONResponse(found[0])
        ready = [v for v in versions if v["repo"] == ref and v["status"] == "ready"]
        if not ready:
            return missing("repo_not_found", f"no repo {ref}")
        return JSONResponse(max(ready, key=lambda v: v["version"]))

    @app.put("/api/v1/repos/{repo:path}/-/aliases/{alias}")
    async def move_alias(repo: str, alias: str, request: Request) -> Response:
        target = (await request.json())["version"]
        data = load()
        moved = None
        for v in data["versions"]:
            if v["repo"] != repo:
                continue
            v["aliases"] = [a for a in v["aliases"] if a != alias]
            if v["version"] == target:
                v["aliases"].append(alias)
                moved = v
        data_file.write_text(json.dumps(data))
        if redis_url:
            import redis.asyncio as aioredis

            client = aioredis.from_url(redis_url)
            await client.publish("quiver:events", json.dumps(
                {"type": "alias.moved", "repo": repo, "version": target, "alias": alias,
                 "ts": time.time()}))
            await client.aclose()
        return JSONResponse(moved)

    return app


# --- router ----------------------------------------------------------------------------------

def router_app(routes: dict[str, str], base_model: str, abstain: bool) -> FastAPI:
    """``POST /v1/route``: the adapter whose keyword occurs in the prompt, else the base model
    (or 422 ``routing_abstained`` with ``abstain``)."""
    app = FastAPI()

    @app.post("/v1/route")
    async def route(request: Request) -> JSONResponse:
        body = await request.json()
        text = body.get("prompt") or " ".join(
            str(m.get("content", "")) for m in body.get("messages") or [])
        scored = [(adapter, 0.9 if word in str(text) else 0.1) for word, adapter in routes.items()]
        scored.sort(key=lambda pair: -pair[1])
        candidates = [{"adapter": a, "score": s} for a, s in scored]
        if scored and scored[0][1] > 0.5:
            return JSONResponse({"adapter": scored[0][0], "base_model": base_model,
                                 "confidence": scored[0][1], "action": "adapter",
                                 "candidates": candidates, "latency_ms": 0.1})
        if abstain:
            return JSONResponse({"error": {"code": "routing_abstained", "details": None,
                                           "message": "no adapter fits this prompt"}},
                                status_code=422, headers={"X-Error-Code": "routing_abstained"})
        return JSONResponse({"adapter": None, "base_model": base_model, "confidence": 0.1,
                             "action": "base", "candidates": candidates, "latency_ms": 0.1})

    return app


# --- entry point -----------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["backend", "registry", "router"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-model", default="tiny-llama")
    parser.add_argument("--id")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--resident", default="")
    parser.add_argument("--redis-url")
    parser.add_argument("--data")
    parser.add_argument("--routes", default="{}")
    parser.add_argument("--abstain", action="store_true")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    if args.kind == "backend":
        app: Any = StandinBackend(
            backend_id=args.id or f"standin-{args.port}", base_model=args.base_model, url=url,
            delay=args.delay, chunk_delay=args.chunk_delay, tokens=args.tokens,
            status=args.status, resident=[r for r in args.resident.split(",") if r])
    elif args.kind == "registry":
        app = registry_app(Path(args.data), args.redis_url)
    else:
        app = router_app(json.loads(args.routes), args.base_model, args.abstain)
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, access_log=False,
                            log_level="warning", backlog=4096, lifespan="auto")
    server = uvicorn.Server(config)
    if args.kind == "backend" and args.redis_url:
        async def run() -> None:
            task = asyncio.ensure_future(_publish_heartbeats(app, args.redis_url))
            try:
                await server.serve()
            finally:
                task.cancel()
        asyncio.run(run())
    else:
        server.run()


if __name__ == "__main__":
    main()
