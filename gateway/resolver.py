"""Turning the ``model`` of a request into what to run: an adapter version or a base model.

``model`` may be a base model name, ``repo/3``, ``repo@alias``, ``repo`` (latest), or the auto
name (the router picks; a base model can narrow it). Resolutions are cached: refs that can move
(aliases, latest) for ``resolve_ttl_s``, pinned ones longer; registry events for a repo drop its
entries at once, so a moved ``@prod`` is followed on the next request. While the registry is
unreachable a cached answer is served for up to ``stale_if_error_s``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx

from quiver.errors import (InvalidRequest, ModelNotFound, NotFound, QuiverError,
                           RegistryUnavailable, Unavailable)
from quiver.events import EventBus
from quiver.gateway.fleet import Fleet
from quiver.gateway.settings import GatewaySettings
from quiver.http import raise_for_status
from quiver.logging import get_logger, log_event
from quiver.refs import parse_ref
from quiver.wire import RouteDecision, VersionInfo

__all__ = ["Target", "Resolver"]

_log = get_logger("quiver.gateway.resolver")
_MAX_CACHED = 50_000


@dataclass(frozen=True, slots=True)
class Target:
    """What a request runs: ``adapter`` (canonical ``repo/N``) on ``base_model``, or the base
    model alone when ``adapter`` is None. ``confidence`` is the router's, 1.0 when named."""

    adapter: str | None
    base_model: str
    confidence: float = 1.0
    decision: RouteDecision | None = None

    @property
    def upstream_model(self) -> str:
        return self.adapter or self.base_model


@dataclass(slots=True)
class _Entry:
    target: Target | None        # None: the registry said it does not exist
    fresh_until: float
    stale_until: float


def _not_found(model: str) -> ModelNotFound:
    return ModelNotFound(f"The model `{model}` does not exist", details={"param": "model"})


class Resolver:
    def __init__(self, settings: GatewaySettings, http: httpx.AsyncClient,
                 upstream: aiohttp.ClientSession, fleet: Fleet) -> None:
        self._settings = settings
        self._http = http
        self._upstream = upstream  # the router is asked on the request path: the fast pool
        self._fleet = fleet
        self._cache: dict[str, _Entry] = {}
        self._pending: dict[str, asyncio.Future[Target]] = {}
        self._registry_base_models: frozenset[str] = frozenset()
        self._base_models_until = 0.0
        self._registry_headers = ({"Authorization": f"Bearer {settings.registry_token}"}
                                  if settings.registry_token else {})

    # --- named models ------------------------------------------------------------------------

    async def resolve(self, model: str) -> Target:
        """The target of a named model (not the auto name). Raises ModelNotFound (404)."""
        if model in self._fleet.base_models:
            return Target(adapter=None, base_model=model)
        entry = self._cache.get(model)
        now = time.monotonic()
        if entry is not None and entry.fresh_until > now:
            if entry.target is None:
                raise _not_found(model)
            return entry.target
        if model in await self._base_models():
            return Target(adapter=None, base_model=model)
        pending = self._pending.get(model)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Target] = asyncio.get_running_loop().create_future()
        self._pending[model] = future
        try:
            target = await self._resolve_remote(model, entry)
            future.set_result(target)
            return target
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it through their own await
            raise
        finally:
            del self._pending[model]

    async def _resolve_remote(self, model: str, entry: _Entry | None) -> Target:
        try:
            ref = parse_ref(model)
        except InvalidRequest:
            raise _not_found(model) from None
        if not self._settings.registry_url:
            raise _not_found(model)
        now = time.monotonic()
        ttl = self._settings.pinned_ttl_s if ref.is_pinned else self._settings.resolve_ttl_s
        try:
            resp = await self._http.get(f"{self._settings.registry_url}/api/v1/resolve/{model}",
                                        headers=self._registry_headers)
            raise_for_status(resp)
            info = VersionInfo.model_validate_json(resp.content)
        except NotFound:
            self._remember(model, _Entry(None, now + self._settings.resolve_ttl_s, now))
            raise _not_found(model) from None
        except (httpx.HTTPError, Unavailable, ValueError) as exc:
            if entry is not None and entry.stale_until > now and entry.target is not None:
                log_event(_log, "resolve.stale", level=30, model=model, error=str(exc))
                return entry.target
            raise RegistryUnavailable(f"the registry cannot resolve {model!r} right now: {exc}",
                                      retry_after=1) from exc
        if info.status not in ("ready", "archived"):
            raise _not_found(model)
        target = Target(adapter=info.ref, base_model=info.base_model)
        self._remember(model, _Entry(target, now + ttl, now + self._settings.stale_if_error_s))
        return target

    def _remember(self, model: str, entry: _Entry) -> None:
        """Cache ``entry``, keeping the cache bounded however many names clients make up."""
        if len(self._cache) >= _MAX_CACHED:
            now = time.monotonic()
            for name in [n for n, e in self._cache.items() if max(e.fresh_until,
                                                                   e.stale_until) <= now]:
                del self._cache[name]
            while len(self._cache) >= _MAX_CACHED:
                del self._cache[next(iter(self._cache))]  # the oldest insertion
        self._cache[model] = entry

    async def _base_models(self) -> frozenset[str]:
        now = time.monotonic()
        if not self._settings.registry_url or self._base_models_until > now:
            return self._registry_base_models
        self._base_models_until = now + self._settings.models_ttl_s
        try:
            resp = await self._http.get(f"{self._settings.registry_url}/api/v1/base-models",
                                        headers=self._registry_headers)
            raise_for_status(resp)
            self._registry_base_models = frozenset(m["name"] for m in resp.json()["items"])
        except (httpx.HTTPError, QuiverError, ValueError, KeyError, TypeError) as exc:
            log_event(_log, "registry.base_models_failed", level=30, error=str(exc))
        return self._registry_base_models

    # --- auto --------------------------------------------------------------------------------

    async def route(self, payload: dict[str, Any], base_model: str | None) -> Target:
        """Ask the router which adapter should answer this request."""
        if not self._settings.router_url:
            raise _not_found(self._settings.auto_model)
        body: dict[str, Any] = {}
        if "messages" in payload:
            body["messages"] = payload["messages"]
        if "prompt" in payload:
            body["prompt"] = payload["prompt"]
        if base_model:
            body["base_model"] = base_model
        try:
            async with self._upstream.post(f"{self._settings.router_url}/v1/route",
                                           json=body) as resp:
                content = await resp.read()
                status = resp.status
                error_code = resp.headers.get("x-error-code", "")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise Unavailable(f"the router is unreachable: {exc!r}", retry_after=1) from exc
        if status != 200:
            raise_for_status(httpx.Response(status, content=content,
                                            headers={"x-error-code": error_code}))
        decision = RouteDecision.model_validate_json(content)
        return Target(adapter=decision.adapter, base_model=decision.base_model,
                      confidence=decision.confidence, decision=decision)

    # --- listing -----------------------------------------------------------------------------

    async def list_models(self) -> list[dict[str, Any]]:
        """OpenAI ``/v1/models`` entries: base models, then ready adapter versions and aliases."""
        created = int(time.time())
        names = set(self._fleet.base_models) | set(await self._base_models())
        out = [{"id": n, "object": "model", "created": created, "owned_by": "quiver"}
               for n in sorted(names)]
        if self._settings.router_url:
            out.append({"id": self._settings.auto_model, "object": "model", "created": created,
                        "owned_by": "quiver"})
        if not self._settings.registry_url:
            return out
        cursor: str | None = None
        for _ in range(100):
            params = {"status": "ready", "limit": 500, **({"cursor": cursor} if cursor else {})}
            try:
                resp = await self._http.get(f"{self._settings.registry_url}/api/v1/versions",
                                            params=params, headers=self._registry_headers)
                raise_for_status(resp)
            except httpx.HTTPError as exc:
                raise RegistryUnavailable(f"the registry is unreachable: {exc}",
                                          retry_after=1) from exc
            page = resp.json()
            for item in page.get("items", []):
                info = VersionInfo.model_validate(item)
                stamp = int(info.created_at.timestamp()) if info.created_at else created
                entry = {"object": "model", "created": stamp, "owned_by": "quiver",
                         "parent": info.base_model}
                out.append({"id": info.ref, **entry})
                out.extend({"id": f"{info.repo}@{alias}", **entry} for alias in info.aliases)
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return out

    # --- invalidation ------------------------------------------------------------------------

    def invalidate(self, repo: str | None = None) -> None:
        """Drop cached resolutions of ``repo`` (every movable one when None)."""
        for model in list(self._cache):
            if repo is None:
                try:
                    if parse_ref(model).is_pinned:
                        continue
                except InvalidRequest:
                    pass
                del self._cache[model]
            elif model == repo or model.startswith((repo + "/", repo + "@")):
                del self._cache[model]

    async def follow(self, bus: EventBus) -> None:
        """Apply registry events to the cache for as long as the gateway runs."""
        while True:
            try:
                async for event in bus.subscribe():
                    self.invalidate(None if event is None else event.repo)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a lost bus must not stop invalidation for good
                log_event(_log, "events.lost", level=30, error=repr(exc))
                self.invalidate()
                await asyncio.sleep(1.0)
