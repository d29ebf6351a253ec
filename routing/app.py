"""The router's HTTP API (FastAPI).

    POST /v1/route              {"prompt"? | "messages"?, "base_model"?, "top_k"?} → RouteDecision
    GET  /v1/routers            per base model: version, adapters, trained_at, example counts
    POST /v1/routers/refresh    resync from the registry now (waits for the retrain)
    GET  /health                the process is up
    GET  /ready                 200 once a router is trained, else 503
    GET  /metrics               Prometheus text format
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from pydantic import BaseModel, Field

from quiver.errors import Unavailable
from quiver.http import install_error_handlers
from quiver.routing.encoder import Encoder
from quiver.routing.service import RouterService
from quiver.routing.settings import RouterSettings
from quiver.wire import RouteDecision

__all__ = ["create_app", "RouteRequest"]


class ChatMessage(BaseModel):
    role: str
    content: Any = None


class RouteRequest(BaseModel):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    base_model: str | None = None
    top_k: int | None = Field(default=None, ge=1, le=100)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("quiver_router_requests", "Routing decisions by action",
                                ["action"], registry=self.registry)
        self.errors = Counter("quiver_router_errors", "Routing requests that failed, by code",
                              ["code"], registry=self.registry)
        self.latency = Histogram("quiver_router_latency_seconds", "Time to decide a route",
                                 buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32, 1, 5),
                                 registry=self.registry)
        self.adapters = Gauge("quiver_router_adapters", "Candidate adapters per base model",
                              ["base_model"], registry=self.registry)
        self.cache_hits = Gauge("quiver_router_cache_hits", "Embedding cache hits",
                                registry=self.registry)
        self.batches = Gauge("quiver_router_batches", "Encoder batches run",
                             registry=self.registry)
        self.syncs = Gauge("quiver_router_syncs", "Registry syncs completed",
                           registry=self.registry)


def _service(request: Request) -> RouterService:
    return request.app.state.service


ServiceDep = Annotated[RouterService, Depends(_service)]


def create_app(settings: RouterSettings | None = None, *, encoder: Encoder | None = None,
               client=None, event_bus=None) -> FastAPI:
    """The router app. ``encoder``, ``client`` and ``event_bus`` default to what settings say."""
    settings = settings or RouterSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = RouterService(settings, encoder, client=client, event_bus=event_bus)
        app.state.service = service
        await service.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(title="Quiver router", version="1", lifespan=lifespan)
    install_error_handlers(app, "quiver")
    metrics = _Metrics()
    app.state.metrics = metrics

    @app.post("/v1/route", response_model=RouteDecision)
    async def route(body: RouteRequest, service: ServiceDep) -> RouteDecision:
        t0 = time.perf_counter()
        try:
            decision = await service.route(
                prompt=body.prompt,
                messages=[m.model_dump() for m in body.messages] if body.messages else None,
                base_model=body.base_model, top_k=body.top_k)
        except Exception as exc:
            metrics.errors.labels(getattr(exc, "code", "internal")).inc()
            raise
        metrics.requests.labels(decision.action).inc()
        metrics.latency.observe(time.perf_counter() - t0)
        return decision

    @app.get("/v1/routers")
    async def routers(service: ServiceDep) -> dict:
        return {"items": [r.summary() for r in service.routers.values()],
                "ready": service.ready.is_set(), "last_sync_error": service.last_sync_error}

    @app.post("/v1/routers/refresh")
    async def refresh(service: ServiceDep) -> dict:
        fresh = await service.sync()
        return {"items": [r.summary() for r in fresh.values()]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(service: ServiceDep) -> JSONResponse:
        if not service.ready.is_set():
            raise Unavailable("no router is trained yet", retry_after=1.0,
                              details={"last_sync_error": service.last_sync_error})
        return JSONResponse({"status": "ready",
                             "routers": {b: r.version for b, r in service.routers.items()}})

    @app.get("/metrics")
    async def prometheus(service: ServiceDep) -> Response:
        for base, r in service.routers.items():
            metrics.adapters.labels(base).set(len(r.adapters))
        metrics.cache_hits.set(service.encoder.cache.hits)
        metrics.batches.set(service.batcher.batches)
        metrics.syncs.set(service.syncs)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
