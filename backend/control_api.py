"""Operations routes: ``/v1/adapters`` (list, load, unload, pin), ``/v1/state``, ``/health``,
``/ready`` and ``/metrics``.

    GET  /v1/adapters                   {"data": [adapter...], "slots", "host", "disk"}
    POST /v1/adapters/load    {"adapter": REF, "pin": false}   -> adapter (in a slot)
    POST /v1/adapters/unload  {"adapter": REF, "purge": false} -> adapter (409 while in use)
    POST /v1/adapters/pin     {"adapter": REF, "pinned": true} -> adapter
    GET  /v1/state                      the heartbeat (quiver.wire.BackendHeartbeat)

An adapter is ``{"ref", "repo", "version", "revision", "tier", "tiers", "slot", "pinned",
"in_use", "loading", "size_bytes", "rank"}``; ``tier`` is the fastest tier holding it.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from quiver.backend.deps import ResidencyDep, RuntimeDep
from quiver.backend.metrics import CONTENT_TYPE

__all__ = ["router"]

router = APIRouter()


class AdapterAction(BaseModel):
    adapter: str = Field(min_length=1, max_length=400)
    pin: bool = False


class UnloadAction(BaseModel):
    adapter: str = Field(min_length=1, max_length=400)
    purge: bool = False


class PinAction(BaseModel):
    adapter: str = Field(min_length=1, max_length=400)
    pinned: bool = True


@router.get("/v1/adapters")
async def list_adapters(residency: ResidencyDep):
    r = residency
    return {"object": "list",
            "data": [e.describe() for e in sorted(r.entries(), key=lambda e: e.ref)],
            "slots": {"total": r.max_slots, "free": r.free_slots},
            "host": {"used_bytes": r.host_used, "budget_bytes": r.host_cache_bytes},
            "disk": {"used_bytes": r.disk_used, "budget_bytes": r.disk_cache_bytes}}


@router.post("/v1/adapters/load")
async def load_adapter(body: AdapterAction, residency: ResidencyDep):
    return (await residency.load(body.adapter, pin=body.pin)).describe()


@router.post("/v1/adapters/unload")
async def unload_adapter(body: UnloadAction, residency: ResidencyDep):
    return (await residency.unload(body.adapter, purge=body.purge)).describe()


@router.post("/v1/adapters/pin")
async def pin_adapter(body: PinAction, residency: ResidencyDep):
    return (await residency.set_pinned(body.adapter, body.pinned)).describe()


@router.get("/v1/state")
async def state(runtime: RuntimeDep):
    return runtime.report().model_dump(mode="json")


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(runtime: RuntimeDep):
    if not runtime.ready:
        reason = "draining" if runtime.generation.draining else "starting"
        return JSONResponse({"status": reason}, status_code=503, headers={"Retry-After": "1"})
    return {"status": "ready", "base_model": runtime.base_model}


@router.get("/metrics")
async def metrics(runtime: RuntimeDep):
    return Response(runtime.metrics.render(runtime.live()), media_type=CONTENT_TYPE)
