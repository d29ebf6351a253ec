"""The backend's FastAPI application: ``create_app(settings, engine)``.

The lifespan builds the parts in order (engine, its async driver, one registry client, the
runtime with residency, heartbeat and event listener) and takes them down in reverse after
draining. Errors answer in OpenAI's shape on the OpenAI and operations routes and in LoRAX's
shape on the LoRAX routes; every answer's ``X-Error-Code`` is counted in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Response

from quiver.backend import control_api, lorax_api, openai_api
from quiver.backend.generation import ClientGone
from quiver.backend.runtime import Runtime
from quiver.backend.settings import BackendSettings
from quiver.http import install_error_handlers
from quiver.logging import get_logger

__all__ = ["create_app", "build_engine"]

_log = get_logger("quiver.backend.app")
_COUNTED = {"/v1/completions": "completions", "/v1/chat/completions": "chat",
            "/generate": "generate", "/generate_stream": "generate_stream", "/": "compat"}


def build_engine(settings: BackendSettings) -> Any:
    """The engine for ``settings.model_dir`` (CUDA when available unless told otherwise)."""
    from quiver.backend.engine import Engine, EngineConfig

    if settings.model_dir is None:
        raise ValueError("QUIVER_MODEL_DIR (or --model) must name the base model's folder")
    return Engine(EngineConfig(
        model_dir=settings.model_dir, device=settings.device, dtype=settings.dtype,
        max_slots=settings.max_slots, max_rank=settings.max_rank,
        max_running=settings.max_running, max_batch_tokens=settings.max_batch_tokens,
        kv_cache_tokens=settings.kv_cache_tokens, max_context=settings.max_context))


class _CountRequests:
    """Counts generation requests by status and every error answer by its ``X-Error-Code``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                runtime = getattr(scope["app"].state, "runtime", None) if "app" in scope \
                    else None
                if runtime is not None:
                    m = runtime.metrics
                    endpoint = _COUNTED.get(scope.get("path", ""))
                    if endpoint is not None and scope.get("method") == "POST":
                        m.requests.labels(endpoint=endpoint,
                                          status=str(message["status"])).inc()
                    for k, v in message.get("headers", []):
                        if k.lower() == b"x-error-code":
                            m.errors.labels(code=v.decode("latin-1")).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(settings: BackendSettings | None = None, engine: Any = None, *,
               registry: Any = None) -> FastAPI:
    """The backend app for ``engine`` (built from ``settings.model_dir`` when None) and a
    registry client (one ``quiver.client.AsyncClient`` built here when None)."""
    settings = settings or BackendSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from quiver.backend.engine import AsyncEngine, SamplingParams

        eng = engine if engine is not None else await asyncio.to_thread(build_engine, settings)
        client = registry
        owned = client is None
        if owned:
            from quiver.client import AsyncClient

            client = AsyncClient(settings.registry_url, settings.token,
                                 cache_dir=settings.disk_cache_dir / "blobs")
        runtime = Runtime(settings, eng, AsyncEngine(eng), client, sampling_params=SamplingParams)
        await runtime.start()
        app.state.runtime = runtime
        try:
            yield
        finally:
            await runtime.stop()
            app.state.runtime = None
            if owned:
                await client.aclose()

    app = FastAPI(title="Quiver backend", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.runtime = None
    install_error_handlers(app, "openai")

    @app.exception_handler(ClientGone)
    async def _gone(_request, _exc: ClientGone):
        # Nobody is listening; the status is for the access log (nginx's "client closed").
        return Response(status_code=499)

    app.include_router(openai_api.router)
    app.include_router(lorax_api.router)
    app.include_router(control_api.router)
    app.add_middleware(_CountRequests)
    return app
