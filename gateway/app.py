"""The gateway's ASGI application.

The two generation endpoints go straight to :class:`~quiver.gateway.proxy.Proxy`, a plain ASGI
app with no framework layer in the way; everything else (models, route, health, readiness,
metrics, the admin API) is a small FastAPI app that also owns the lifespan.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from quiver.errors import InvalidRequest, PayloadTooLarge
from quiver.gateway.deps import AdminDep, CurrentKey, StateDep
from quiver.gateway.proxy import ENDPOINTS, Proxy
from quiver.gateway.settings import GatewaySettings
from quiver.gateway.state import open_state
from quiver.http import install_error_handlers

__all__ = ["Gateway", "create_app"]


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    adapters: list[str] | None = None
    base_models: bool = True
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class Gateway:
    """ASGI entry point: the hot path to the proxy, the rest to the FastAPI app."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.proxy = Proxy()
        self.api = _build_api(self)

    @property
    def draining(self) -> bool:
        state = self.proxy.state
        return state is None or state.draining

    def start_draining(self) -> None:
        if self.proxy.state is not None:
            self.proxy.state.draining = True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in ENDPOINTS and scope["method"] == "POST":
            await self.proxy(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def create_app(settings: GatewaySettings | None = None) -> Gateway:
    return Gateway(settings or GatewaySettings())


def _build_api(gateway: Gateway) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_state(gateway.settings) as state:
            app.state.gateway = state
            gateway.proxy.state = state
            yield

    api = FastAPI(title="Quiver gateway", lifespan=lifespan, docs_url="/docs",
                  openapi_url="/openapi.json")
    install_error_handlers(api, "openai")

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(state: StateDep) -> JSONResponse:
        serving = [hb for hb in state.fleet.backends if not hb.draining]
        if state.draining or not serving:
            reason = "draining" if state.draining else "no backend available"
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "backends": len(serving)})

    @api.get("/metrics")
    async def metrics(state: StateDep) -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(state: StateDep, key: CurrentKey) -> dict[str, Any]:
        data = await state.resolver.list_models()
        if key is not None:
            data = [m for m in data if m["id"] == state.settings.auto_model
                    or key.allows(m["id"] if "parent" in m else None)]
        return {"object": "list", "data": data}

    @api.post("/v1/route")
    async def route(state: StateDep, key: CurrentKey, request: Request,
                    x_quiver_base_model: Annotated[str | None, Header()] = None
                    ) -> dict[str, Any]:
        """The routing decision and backend order for a request, without generating."""
        body = await request.body()
        if len(body) > state.settings.max_body_bytes:
            raise PayloadTooLarge(f"request body over {state.settings.max_body_bytes} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("the request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("the request body must be a JSON object")
        model = payload.get("model") or state.settings.auto_model
        if not isinstance(model, str):
            raise InvalidRequest("`model` must be a string", details={"param": "model"})
        if model == state.settings.auto_model:
            base = payload.get("base_model") or x_quiver_base_model
            target = await state.resolver.route(payload, base if isinstance(base, str) else None)
            target = state.narrow_to_key(key, target)
        else:
            target = await state.resolver.resolve(model)
        state.check_allowed(key, target)
        order = state.fleet.choose(target.base_model, target.adapter)
        return {"model": model, "adapter": target.adapter, "base_model": target.base_model,
                "confidence": target.confidence,
                "decision": target.decision.model_dump() if target.decision else None,
                "backends": [{"backend_id": hb.backend_id, "url": hb.url} for hb in order]}

    @api.post("/admin/keys", status_code=201)
    async def create_key(state: StateDep, _admin: AdminDep, body: KeyCreate) -> dict[str, Any]:
        key, plain = await state.keys.create(name=body.name, adapters=body.adapters,
                                             base_models=body.base_models, rpm=body.rpm,
                                             tpm=body.tpm)
        return {**key.public(), "key": plain}

    @api.get("/admin/keys")
    async def list_keys(state: StateDep, _admin: AdminDep) -> dict[str, Any]:
        return {"items": [k.public() for k in await state.keys.list()]}

    @api.delete("/admin/keys/{key_id}", status_code=204)
    async def delete_key(state: StateDep, _admin: AdminDep, key_id: str) -> Response:
        await state.keys.delete(key_id)
        return Response(status_code=204)

    return api
