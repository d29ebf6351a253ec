"""The backends this gateway knows, their reported state, in-flight counts and ejections.

Backends come from two places, refreshed every ``poll_interval_s``:

- the command line: each URL is polled at ``GET /v1/state`` (a
  :class:`~quiver.wire.BackendHeartbeat`); a backend without that endpoint is described from its
  ``GET /v1/models`` (first model = base model, models with a ``parent`` = resident adapters);
  one that has not answered for ``unreachable_after_s`` receives no traffic until it does
  (a backend too busy to answer one poll keeps serving);
- Redis: every key under ``HEARTBEAT_PREFIX``; a backend whose heartbeat expired is dropped.

Outlier ejection: ``eject_after_failures`` consecutive failures take a backend out for
``eject_base_s``, doubling on each new ejection up to ``eject_max_s``; a success resets it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import httpx

from quiver.gateway import balancer
from quiver.gateway.keys import REDIS_ERRORS
from quiver.gateway.metrics import GatewayMetrics
from quiver.gateway.settings import GatewaySettings
from quiver.logging import get_logger, log_event
from quiver.wire import HEARTBEAT_PREFIX, BackendHeartbeat

__all__ = ["Fleet"]

_log = get_logger("quiver.gateway.fleet")


class Fleet:
    def __init__(self, settings: GatewaySettings, http: httpx.AsyncClient, redis: Any | None,
                 metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._http = http
        self._redis = redis
        self._metrics = metrics
        self._static: dict[str, BackendHeartbeat] = {}
        self._last_seen: dict[str, float] = {}
        self._discovered: dict[str, BackendHeartbeat] = {}
        self._backends: list[BackendHeartbeat] = []
        self.inflight: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._ejections: dict[str, int] = {}
        self._ejected_until: dict[str, float] = {}
        self._base_models: frozenset[str] = frozenset()

    # --- what the request path reads -------------------------------------------------------

    @property
    def backends(self) -> list[BackendHeartbeat]:
        return self._backends

    @property
    def base_models(self) -> frozenset[str]:
        return self._base_models

    def excluded(self) -> set[str]:
        if not self._ejected_until:
            return set()
        now = time.monotonic()
        for bid in [b for b, until in self._ejected_until.items() if until <= now]:
            del self._ejected_until[bid]
        return set(self._ejected_until)

    def choose(self, base_model: str, adapter: str | None) -> list[BackendHeartbeat]:
        return balancer.choose_backends(base_model=base_model, adapter=adapter,
                                        backends=self._backends, inflight=self.inflight,
                                        excluded=self.excluded(),
                                        load_cap=self._settings.load_cap_factor)

    def acquire(self, backend_id: str) -> None:
        self.inflight[backend_id] = self.inflight.get(backend_id, 0) + 1

    def release(self, backend_id: str) -> None:
        self.inflight[backend_id] = max(0, self.inflight.get(backend_id, 1) - 1)

    def record_success(self, backend_id: str) -> None:
        if self._failures.get(backend_id):
            self._failures[backend_id] = 0
            self._ejections.pop(backend_id, None)

    def record_failure(self, backend_id: str, kind: str) -> None:
        self._metrics.upstream_failures.labels(backend_id, kind).inc()
        n = self._failures.get(backend_id, 0) + 1
        self._failures[backend_id] = n
        if n >= self._settings.eject_after_failures and backend_id not in self._ejected_until:
            times = self._ejections.get(backend_id, 0)
            span = min(self._settings.eject_base_s * (2 ** times), self._settings.eject_max_s)
            self._ejections[backend_id] = times + 1
            self._ejected_until[backend_id] = time.monotonic() + span
            self._failures[backend_id] = 0
            self._metrics.ejections.labels(backend_id).inc()
            log_event(_log, "backend.ejected", level=30, backend=backend_id, seconds=span,
                      kind=kind)

    # --- refresh ---------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # the loop must outlive any one bad round
                log_event(_log, "fleet.refresh_failed", level=40, error=repr(exc))
            await asyncio.sleep(self._settings.poll_interval_s)

    async def refresh(self) -> None:
        polled = await asyncio.gather(*(self._poll(url) for url in self._settings.backends))
        now = time.monotonic()
        for url, hb in zip(self._settings.backends, polled):
            if hb is not None:
                self._static[url] = hb
                self._last_seen[url] = now
            elif now - self._last_seen.get(url, -1e9) > self._settings.unreachable_after_s:
                self._static.pop(url, None)  # busy for a moment is not gone: only after a while
        if self._redis is not None:
            self._discovered = await self._read_heartbeats()
        self._publish(list(self._static.values()) + list(self._discovered.values()))

    def _publish(self, states: Iterable[BackendHeartbeat]) -> None:
        by_id: dict[str, BackendHeartbeat] = {}
        for hb in states:
            known = by_id.get(hb.backend_id)
            if known is None or hb.ts >= known.ts:
                by_id[hb.backend_id] = hb
        added = set(by_id) - {hb.backend_id for hb in self._backends}
        removed = {hb.backend_id for hb in self._backends} - set(by_id)
        for bid in added:
            log_event(_log, "backend.up", backend=bid, url=by_id[bid].url,
                      base_model=by_id[bid].base_model)
        for bid in removed:
            log_event(_log, "backend.gone", level=30, backend=bid)
        self._backends = sorted(by_id.values(), key=lambda hb: hb.backend_id)
        # Base models stay known after their last backend left: requests for them get 503
        # (no backend now), not 404 (no such model).
        self._base_models = self._base_models | {hb.base_model for hb in self._backends}
        excluded = self.excluded()
        self._metrics.backends.labels("serving").set(
            sum(1 for hb in self._backends if not hb.draining and hb.backend_id not in excluded))
        self._metrics.backends.labels("draining").set(sum(hb.draining for hb in self._backends))
        self._metrics.backends.labels("ejected").set(len(excluded))
        self._metrics.backends.labels("unreachable").set(
            len(self._settings.backends) - len(self._static))
        for bid, n in self.inflight.items():
            self._metrics.inflight.labels(bid).set(n)

    async def _poll(self, url: str) -> BackendHeartbeat | None:
        timeout = self._settings.state_timeout_s
        try:
            resp = await self._http.get(f"{url}/v1/state", timeout=timeout)
            if resp.status_code == 200:
                hb = BackendHeartbeat.model_validate_json(resp.content)
                return hb.model_copy(update={"url": hb.url.rstrip("/") or url})
            if resp.status_code != 404:
                return None
            resp = await self._http.get(f"{url}/v1/models", timeout=timeout)
            if resp.status_code != 200:
                return None
            models = resp.json().get("data") or []
            if not models:
                return None
            base = next((m["id"] for m in models if not m.get("parent")), models[0]["id"])
            return BackendHeartbeat(backend_id=url, url=url, base_model=base,
                                    gpu=[m["id"] for m in models if m.get("parent")],
                                    ts=time.time())
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    async def _read_heartbeats(self) -> dict[str, BackendHeartbeat]:
        try:
            names = [k async for k in self._redis.scan_iter(match=HEARTBEAT_PREFIX + "*",
                                                              count=1000)]
            values = await self._redis.mget(names) if names else []
        except REDIS_ERRORS as exc:
            log_event(_log, "fleet.redis_unreachable", level=30, error=str(exc))
            return self._discovered  # keep the last view until Redis answers again
        out: dict[str, BackendHeartbeat] = {}
        for raw in values:
            if not raw:
                continue
            try:
                hb = BackendHeartbeat.model_validate_json(raw)
            except ValueError:
                continue
            out[hb.backend_id] = hb.model_copy(update={"url": hb.url.rstrip("/")})
        return out
