"""The router service: keeps one router per base model current, and answers routing requests.

Routers are immutable snapshots held in one dict that is replaced in a single assignment, so a
request sees either the old or the new router, never a mix. A retrain runs on a worker thread
while requests keep being answered; registry events (and every (re)connection of the event bus)
mark the state dirty, and one sync loop coalesces bursts of events into one retrain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from quiver.errors import BaseModelNotFound, InvalidRequest, RoutingAbstained, Unavailable
from quiver.logging import log_event
from quiver.routing.batcher import MicroBatcher
from quiver.routing.classifier import Classifier, ClassifierConfig
from quiver.routing.data import LabelledExample, load_labelled, prompt_text
from quiver.routing.encoder import Encoder
from quiver.routing.settings import RouterSettings
from quiver.routing.training import (ExampleStore, Router, TrainingSet, build_training_sets,
                                     train_router)
from quiver.wire import RouteCandidate, RouteDecision, VersionInfo

__all__ = ["RouterService", "decide"]

_log = logging.getLogger("quiver.routing")


def decide(router: Router, emb: np.ndarray, *, settings: RouterSettings, top_k: int) -> RouteDecision:
    """Apply ``router`` to one embedding and the abstain/fallback policy to its answer."""
    clf = router.classifier
    if clf is None:
        return _fallback(router, 0.0, [], settings)
    pred = clf.predict(emb[None, :])
    k = max(1, min(top_k, len(clf.labels)))
    cands = [RouteCandidate(adapter=clf.labels[int(pred.order[0, i])],
                            score=round(float(pred.probs[0, i]), 6)) for i in range(k)]
    conf = float(pred.confidence[0])
    threshold = settings.threshold
    if threshold is None:
        threshold = clf.threshold if clf.threshold is not None else settings.default_threshold
    if conf >= threshold:
        return RouteDecision(adapter=cands[0].adapter, base_model=router.base_model,
                             confidence=round(conf, 6), action="adapter", candidates=cands,
                             router_version=router.version)
    return _fallback(router, conf, cands, settings)


def _fallback(router: Router, conf: float, cands: list[RouteCandidate],
              settings: RouterSettings) -> RouteDecision:
    if settings.fallback == "error":
        raise RoutingAbstained(
            "no adapter is confident enough for this prompt",
            details={"base_model": router.base_model, "confidence": round(conf, 6),
                     "candidates": [c.model_dump() for c in cands],
                     "router_version": router.version})
    if settings.fallback == "default_adapter":
        default = settings.default_adapter or ""
        ref = next((a for a in router.adapters
                    if a == default or a.rsplit("/", 1)[0] == default), None)
        if ref is not None:
            return RouteDecision(adapter=ref, base_model=router.base_model,
                                 confidence=round(conf, 6), action="default_adapter",
                                 candidates=cands, router_version=router.version)
    return RouteDecision(adapter=None, base_model=router.base_model, confidence=round(conf, 6),
                         action="base", candidates=cands, router_version=router.version)


class RouterService:
    """Routers for every base model in a registry, kept current from its events."""

    def __init__(self, settings: RouterSettings, encoder: Encoder | None = None, *,
                 client=None, event_bus=None) -> None:
        self.settings = settings
        self.encoder = encoder or Encoder(settings.encoder_path, device=settings.encoder_device,
                                          cache_size=settings.cache_size)
        self.config = ClassifierConfig(target_precision=settings.target_precision)
        self.batcher = MicroBatcher(self.encoder.encode, max_batch=settings.max_batch,
                                    window_ms=settings.batch_window_ms)
        self.store = ExampleStore()
        self.routers: dict[str, Router] = {}
        self.extra: list[LabelledExample] = (load_labelled(settings.extra_data)
                                             if settings.extra_data else [])
        self._client = client
        self._owns_client = client is None
        self._bus = event_bus
        self._dirty = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self.ready = asyncio.Event()
        self.last_sync_error: str | None = None
        self.syncs = 0

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self, *, watch: bool = True) -> None:
        # The encoder's torch threads own the cores; numpy's BLAS pool competing with them
        # made the classifier's similarity term 3-5x slower under load. Its matrices are
        # small, so one BLAS thread is the fast choice.
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
        if self._client is None:
            from quiver.client import AsyncClient

            self._client = AsyncClient(self.settings.registry_url, self.settings.registry_token)
        await self.batcher.start()
        if watch:
            if self._bus is None:
                from quiver.events import make_event_bus

                self._bus = make_event_bus(self.settings.redis_url)
            self._tasks = [asyncio.create_task(self._watch(), name="quiver-router-events"),
                           asyncio.create_task(self._sync_loop(), name="quiver-router-sync")]
            self._dirty.set()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        await self.batcher.close()
        if self._owns_client and self._client is not None:
            await self._client.aclose()
        if self._bus is not None and hasattr(self._bus, "close"):
            with contextlib.suppress(Exception):
                await self._bus.close()

    async def _watch(self) -> None:
        assert self._bus is not None
        while True:
            try:
                async for event in self._bus.subscribe():
                    if event is not None:
                        log_event(_log, "registry.event", type=event.type, repo=event.repo,
                                  version=event.version)
                    self._dirty.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep listening whatever the bus does
                log_event(_log, "events.failed", logging.WARNING, error=str(exc))
                await asyncio.sleep(1.0)

    async def _sync_loop(self) -> None:
        delay = 0.5
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.sync()
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried; routing keeps the old routers
                self.last_sync_error = str(exc)
                log_event(_log, "sync.failed", logging.WARNING, error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                self._dirty.set()

    # --- training ---------------------------------------------------------------------------------

    async def fetch_versions(self) -> list[VersionInfo]:
        if self._client is None:
            raise Unavailable("the router service is not started")
        return await self._client.list_all_versions(status="ready")

    async def sync(self, versions: Sequence[VersionInfo] | None = None) -> dict[str, Router]:
        """Retrain the routers whose training data changed; swap them in atomically."""
        async with self._sync_lock:
            if versions is None:
                versions = await self.fetch_versions()
            sets = build_training_sets(
                versions, alias=self.settings.candidate_alias,
                namespaces=self.settings.namespaces, repos=self.settings.repos, extra=self.extra)
            current = self.routers
            fresh: dict[str, Router] = {}
            inexact = []
            for base, ts in sets.items():
                old = current.get(base)
                if old is not None and old.training_version == ts.version(
                        self.encoder.fingerprint, self.config):
                    fresh[base] = old
                    continue
                router = self._load_saved(ts)
                if router is None:
                    router = await asyncio.to_thread(train_router, ts, self.encoder, self.store,
                                                     config=self.config, previous=old, fast=True)
                    self._trained(router)
                fresh[base] = router
                if not router.exact:
                    inexact.append((router, ts))
            self.routers = fresh
            self._tasks = [t for t in self._tasks if not t.done()]
            for router, ts in inexact:
                self._tasks.append(asyncio.create_task(self._refine(router, ts),
                                                       name="quiver-router-refine"))
            self.store.retain(t for ts in sets.values()
                              for t in [*(x for c in ts.candidates for x in c.texts), *ts.oos])
            self.syncs += 1
            self.last_sync_error = None
            if any(r.classifier is not None for r in fresh.values()):
                self.ready.set()
            return fresh

    def _trained(self, router: Router) -> None:
        self._save(router)
        log_event(_log, "router.trained", base_model=router.base_model, version=router.version,
                  adapters=len(router.adapters), encoded=router.encoded, exact=router.exact,
                  seconds=round(router.train_seconds, 3))

    async def _refine(self, fast: Router, ts) -> None:
        """Replace a fast incremental router by the full fit, unless a newer one came first."""
        try:
            router = await asyncio.to_thread(train_router, ts, self.encoder, self.store,
                                             config=self.config, previous=fast)
        except Exception as exc:  # noqa: BLE001 - the fast router keeps serving
            log_event(_log, "refine.failed", logging.WARNING, error=str(exc))
            return
        if self.routers.get(fast.base_model) is fast:
            self._trained(router)
            self.routers = {**self.routers, fast.base_model: router}

    async def settled(self) -> None:
        """Wait until every pending full refit of a fast update has finished."""
        pending = [t for t in self._tasks if t.get_name() == "quiver-router-refine"]
        await asyncio.gather(*pending, return_exceptions=True)
        self._tasks = [t for t in self._tasks if not t.done()]

    def refresh(self) -> None:
        """Ask the sync loop for a resync from the registry."""
        self._dirty.set()

    def _artifact(self, base_model: str, version: str) -> Path | None:
        if self.settings.artifact_dir is None:
            return None
        return Path(self.settings.artifact_dir) / base_model.replace("/", "--") / f"{version}.npz"

    def _load_saved(self, ts: TrainingSet) -> Router | None:
        """The router saved for exactly this training data, so a restart retrains nothing."""
        version = ts.version(self.encoder.fingerprint, self.config)
        path = self._artifact(ts.base_model, version)
        if path is None or not path.exists():
            return None
        try:
            clf = Classifier.from_bytes(path.read_bytes())
        except (OSError, ValueError, KeyError) as exc:
            log_event(_log, "router.artifact_unreadable", logging.WARNING, path=str(path),
                      error=str(exc))
            return None
        if sorted(clf.labels) != sorted(c.ref for c in ts.candidates if c.texts):
            return None
        log_event(_log, "router.loaded", base_model=ts.base_model, version=version)
        return Router(base_model=ts.base_model, version=version, classifier=clf,
                      adapters=tuple(clf.labels),
                      example_counts={c.ref: len(c.texts) for c in ts.candidates},
                      skipped=ts.skipped, trained_at=path.stat().st_mtime, train_seconds=0.0,
                      stats=dict(clf.stats), digests={c.ref: c.digest for c in ts.candidates})

    def _save(self, router: Router) -> None:
        path = self._artifact(router.base_model, router.version)
        if path is None or router.classifier is None:
            return
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{time.monotonic_ns()}.tmp")
        tmp.write_bytes(router.classifier.to_bytes())
        tmp.replace(path)

    # --- routing ----------------------------------------------------------------------------------

    def _routers_for(self, base_model: str | None) -> list[Router]:
        routers = self.routers
        if base_model:
            if base_model not in routers:
                raise BaseModelNotFound(f"no router for base model {base_model!r}",
                                        details={"base_model": base_model,
                                                 "known": sorted(routers)})
            return [routers[base_model]]
        if self.settings.default_base_model and self.settings.default_base_model in routers:
            return [routers[self.settings.default_base_model]]
        if not routers:
            raise Unavailable("no router is trained yet", retry_after=1.0)
        return list(routers.values())

    async def route(self, *, prompt: str | None = None, messages: Sequence[dict] | None = None,
                    base_model: str | None = None, top_k: int | None = None) -> RouteDecision:
        t0 = time.perf_counter()
        k = self.settings.top_k if top_k is None else top_k
        if not 1 <= k <= 100:
            raise InvalidRequest("top_k must lie in 1..100", details={"param": "top_k"})
        text = prompt_text(prompt, messages, self.settings.embed_part,
                           self.settings.max_prompt_chars)
        routers = self._routers_for(base_model)
        emb = await self.batcher.embed(text)
        decisions: list[RouteDecision] = []
        abstained: RoutingAbstained | None = None
        for router in routers:
            try:
                decisions.append(decide(router, emb, settings=self.settings, top_k=k))
            except RoutingAbstained as exc:
                abstained = exc
        if not decisions:
            assert abstained is not None
            raise abstained
        # Across base models: an adapter beats a fallback, then the higher confidence wins.
        best = max(decisions, key=lambda d: (d.action == "adapter", d.confidence))
        if len(routers) > 1 and best.action != "adapter" and abstained is not None:
            raise abstained
        best.latency_ms = round((time.perf_counter() - t0) * 1000.0, 3)
        return best
