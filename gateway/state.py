"""The long-lived parts of one gateway process, built in the lifespan and shared by every route."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

from quiver.errors import Forbidden, Unauthorized
from quiver.events import make_event_bus
from quiver.gateway.fleet import Fleet
from quiver.gateway.keys import ApiKey, KeyStore
from quiver.gateway.metrics import GatewayMetrics
from quiver.gateway.ratelimit import RateLimiter
from quiver.gateway.resolver import Resolver, Target
from quiver.gateway.settings import GatewaySettings
from quiver.logging import get_logger, log_event

__all__ = ["GatewayState", "open_state"]

_log = get_logger("quiver.gateway")


@dataclass(slots=True)
class GatewayState:
    settings: GatewaySettings
    http: httpx.AsyncClient
    upstream: aiohttp.ClientSession
    redis: Any | None
    metrics: GatewayMetrics
    fleet: Fleet
    resolver: Resolver
    keys: KeyStore
    limiter: RateLimiter
    draining: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key from an ``Authorization: Bearer`` header value.

        No header is anonymous (refused when keys are required); a header with an unknown key
        is always refused.
        """
        if not authorization:
            if self.settings.keys_required:
                raise Unauthorized("missing API key: send Authorization: Bearer <key>")
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("malformed Authorization header: expected Bearer <key>")
        key = await self.keys.lookup(token)
        if key is None:
            if not self.settings.keys_required and not self.settings.admin_token \
                    and not self.settings.keys_file:
                return None  # an open gateway ignores whatever token the client library sends
            raise Unauthorized("invalid API key")
        return key

    def check_admin(self, authorization: str | None) -> None:
        token = self.settings.admin_token
        if not token:
            raise Forbidden("the admin API is disabled: set QUIVER_ADMIN_TOKEN")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), token):
            raise Unauthorized("admin token required")

    @staticmethod
    def narrow_to_key(key: ApiKey | None, target: Target) -> Target:
        """For auto requests: the router's best candidate this key may use, if its first
        choice is not allowed (:meth:`check_allowed` refuses the request otherwise)."""
        if key is None or key.allows(target.adapter) or target.decision is None:
            return target
        for candidate in target.decision.candidates:
            if key.allows(candidate.adapter):
                return Target(adapter=candidate.adapter, base_model=target.base_model,
                              confidence=candidate.score, decision=target.decision)
        return target

    @staticmethod
    def check_allowed(key: ApiKey | None, target: Target) -> None:
        if key is not None and not key.allows(target.adapter):
            what = target.adapter or f"base model {target.base_model}"
            raise Forbidden(f"key {key.name!r} may not use {what}",
                            details={"param": "model"})


@contextlib.asynccontextmanager
async def open_state(settings: GatewaySettings) -> AsyncIterator[GatewayState]:
    """Build every long-lived part, start the background loops, and tear it all down after."""
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s,
                              write=settings.read_timeout_s, pool=settings.pool_timeout_s),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64,
                            keepalive_expiry=30.0),
        headers={"accept-encoding": "identity"})
    # The data plane: no total timeout (long streams), an idle-read timeout between bytes.
    upstream = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=settings.max_connections, limit_per_host=0,
                                       keepalive_timeout=30.0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s,
                                      sock_read=settings.read_timeout_s),
        headers={"accept-encoding": "identity"}, auto_decompress=False)
    redis = None
    if settings.redis_url:
        import redis.asyncio as aioredis

        redis = aioredis.from_url(settings.redis_url, decode_responses=True,
                                  socket_connect_timeout=0.5, socket_timeout=1.0,
                                  health_check_interval=10)
    metrics = GatewayMetrics()
    fleet = Fleet(settings, http, redis, metrics)
    state = GatewayState(
        settings=settings, http=http, upstream=upstream, redis=redis, metrics=metrics, fleet=fleet,
        resolver=Resolver(settings, http, upstream, fleet),
        keys=KeyStore(redis, settings.redis_prefix),
        limiter=RateLimiter(redis, settings.redis_prefix, failure=settings.rate_limit_failure,
                            metrics=metrics))
    bus = make_event_bus(settings.redis_url)
    try:
        if settings.keys_file:
            n = await state.keys.load_file(settings.keys_file)
            log_event(_log, "keys.loaded", count=n, file=settings.keys_file)
        with contextlib.suppress(Exception):
            await fleet.refresh()
        state.tasks = [asyncio.create_task(fleet.run(), name="quiver-fleet"),
                       asyncio.create_task(state.resolver.follow(bus), name="quiver-events")]
        log_event(_log, "gateway.started", backends=len(fleet.backends),
                  registry=settings.registry_url, router=settings.router_url,
                  redis=bool(redis), keys_required=settings.keys_required,
                  rate_limit_failure=settings.rate_limit_failure)
        yield state
    finally:
        state.draining = True
        for task in state.tasks:
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await bus.close()
        await http.aclose()
        await upstream.close()
        if redis is not None:
            with contextlib.suppress(Exception):
                await redis.aclose()
