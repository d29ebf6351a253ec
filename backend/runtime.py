"""One backend process's parts, wired together and started and stopped in order.

:class:`Runtime` owns the async engine, the registry client, the residency tiers, the shared
generation layer, the metrics, the heartbeat and the registry-event listener. The FastAPI
lifespan (``quiver.backend.app``) builds one and the routes reach it through ``deps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from pathlib import Path
from typing import Any

from quiver.backend.generation import Generation
from quiver.backend.heartbeat import Heartbeat
from quiver.backend.metrics import BackendMetrics, LiveState
from quiver.backend.residency import RegistryAccess, Residency
from quiver.backend.settings import BackendSettings
from quiver.logging import get_logger, log_event
from quiver.wire import BackendHeartbeat, RegistryEvent

__all__ = ["Runtime", "EngineSlots"]

_log = get_logger("quiver.backend.runtime")


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _slot_info(engine: Any) -> dict[str, Any]:
    info = engine.slot_info() if hasattr(engine, "slot_info") else {}
    return info if isinstance(info, dict) else {}


def _engine_slots(engine: Any, wanted: int) -> int:
    total = _slot_info(engine).get("total")
    return min(wanted, int(total)) if total else wanted


class EngineSlots:
    """Residency's view of the engine: read + validate + prepare a folder, load, unload."""

    def __init__(self, engine: Any, aengine: Any) -> None:
        self.engine = engine
        self.aengine = aengine

    def prepare(self, adapter_dir: Path) -> tuple[Any, int]:
        from quiver.backend.engine import load_adapter_dir

        config, tensors = load_adapter_dir(adapter_dir)
        # The engine lays the weights out in page-locked memory on CUDA.
        prepared = self.engine.prepare_adapter(config, tensors)
        nbytes = getattr(prepared, "nbytes", None)
        if nbytes is None:
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return prepared, int(nbytes)

    async def load(self, key: str, prepared: Any) -> int:
        return await self.aengine.load_adapter(key, prepared)

    async def unload(self, key: str) -> None:
        await self.aengine.unload_adapter(key)


class Runtime:
    """The running backend: engine, residency, generation, metrics, heartbeat, events."""

    def __init__(self, settings: BackendSettings, engine: Any, aengine: Any,
                 registry: RegistryAccess, *, sampling_params: Any) -> None:
        self.settings = settings
        self.engine = engine
        self.aengine = aengine
        self.registry = registry
        self.metrics = BackendMetrics()
        self.base_model = settings.base_model_name or engine.model_name
        m = self.metrics
        cache = getattr(registry, "cache", None)
        self.residency = Residency(
            registry=registry, engine=EngineSlots(engine, aengine),
            base_model=self.base_model, max_slots=_engine_slots(engine, settings.max_slots),
            host_cache_bytes=settings.host_cache_bytes,
            disk_cache_bytes=settings.disk_cache_bytes, disk_cache_dir=settings.disk_cache_dir,
            alias_ttl=settings.alias_ttl, registry_retry_after=settings.registry_retry_after,
            slot_wait_timeout=settings.pull_timeout,
            on_load=lambda source, s: m.adapter_load.labels(source=source).observe(s),
            on_evict=lambda tier: m.evictions.labels(tier=tier).inc(),
            on_pull=lambda result: m.pulls.labels(result=result).inc(),
            discard_blob=getattr(cache, "discard_blob", None))
        tokenizer = engine.tokenizer
        cfg = engine.model_config
        vocab = cfg.get("vocab_size") if isinstance(cfg, dict) else getattr(cfg, "vocab_size")
        names = {engine.model_name, str(settings.model_dir) if settings.model_dir else ""} - {""}
        self.generation = Generation(
            engine=aengine, tokenizer=tokenizer, residency=self.residency, metrics=m,
            base_model_name=self.base_model, aliases=tuple(names),
            max_context=engine.max_context, max_running=settings.max_running,
            max_queue=settings.max_queue, vocab_size=int(vocab),
            params_factory=sampling_params)
        self.heartbeat = Heartbeat(settings.redis_url, settings.backend_id, self.report,
                                   interval=settings.heartbeat_interval,
                                   ttl=settings.heartbeat_ttl) if settings.redis_url else None
        engine_config = getattr(engine, "config", None)
        # Sequences the engine runs at once (its KV rows), for the gateway's load estimate.
        self.max_running = int(getattr(engine_config, "max_running", 0) or 0)
        self._events: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.ready = False

    # --- reports ---------------------------------------------------------------------------

    def engine_stats(self) -> dict[str, Any]:
        try:
            stats = self.aengine.stats()
        except Exception:  # a stats failure must never break a heartbeat or a scrape
            return {}
        return stats if isinstance(stats, dict) else {}

    def report(self) -> BackendHeartbeat:
        tiers = self.residency.by_tier()
        stats = self.engine_stats()
        gen = self.generation
        engine_waiting = int(stats.get("waiting", stats.get("queue_depth", 0)) or 0)
        return BackendHeartbeat(
            backend_id=self.settings.backend_id, url=self.settings.public_url(),
            base_model=self.base_model, gpu=tiers["gpu"], host=tiers["host"],
            disk=tiers["disk"], loading=tiers["loading"], total_slots=self.residency.max_slots,
            free_slots=self.residency.free_slots, queue_depth=gen.queue_depth + engine_waiting,
            running=int(stats.get("running", gen.generating) or 0),
            max_running=self.max_running,
            kv_cache_usage=float(stats.get("kv_cache_usage", 0.0) or 0.0),
            draining=gen.draining, ts=time.time())

    def live(self) -> LiveState:
        hb = self.report()
        return LiveState(queue_depth=hb.queue_depth, running=hb.running,
                         tiers={"gpu": len(hb.gpu), "host": len(hb.host), "disk": len(hb.disk)},
                         free_slots=hb.free_slots)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await _maybe_await(self.aengine.start())
        # Residency starts empty, so the engine's slots must too (an engine can outlive an app).
        for key in list(_slot_info(self.engine).get("loaded", {})):
            await self.aengine.unload_adapter(key)
        adopted = await asyncio.to_thread(self.residency.scan_disk_cache)
        if self.heartbeat is not None:
            await self.heartbeat.start()
        if self.settings.redis_url:
            self._events = asyncio.create_task(self._listen(), name="registry events")
        self.ready = True
        log_event(_log, "backend.started", base_model=self.base_model,
                  url=self.settings.public_url(), disk_cache_adopted=adopted)

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait for admitted ones; True when all finished in time."""
        self.generation.draining = True
        self.ready = False
        if self.heartbeat is not None:
            self.heartbeat.poke()
        deadline = time.monotonic() + timeout
        while self.generation.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.generation.active == 0

    async def stop(self) -> None:
        drained = await self.drain(self.settings.drain_timeout)
        log_event(_log, "backend.stopping", drained=drained)
        for task in [t for t in (self._events, *self._background) if t is not None]:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await _maybe_await(self.aengine.stop(0.0 if drained else 1.0))
        await self.residency.close()
        if self.heartbeat is not None:
            await self.heartbeat.stop(delete=True)

    def _prefetch(self, repo: str, ref: str) -> None:
        """A hint: the repo is in use here and what ``ref`` names just changed, so fetch the
        new version into the host cache before anyone asks for it."""
        if not self.settings.prefetch_on_events or not self.residency.holds_repo(repo):
            return
        task = asyncio.create_task(self.residency.prefetch(ref), name=f"prefetch {ref}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- registry events ---------------------------------------------------------------------

    async def _listen(self) -> None:
        from quiver.events import RedisEventBus

        bus = RedisEventBus(self.settings.redis_url or "")
        try:
            async for event in bus.subscribe():
                try:
                    await self.on_event(event)
                except Exception as exc:  # one bad event must not end the listener
                    log_event(_log, "event.failed", error=str(exc))
        finally:
            with contextlib.suppress(Exception):
                await bus.close()

    async def on_event(self, event: RegistryEvent | None) -> None:
        """Keep cached resolutions true to the registry; ``None`` means "resync"."""
        r = self.residency
        if event is None:
            r.forget_alias_all()
            return
        if event.type == "alias.moved" and event.alias:
            r.forget_alias(event.repo, event.alias)
            self._prefetch(event.repo, f"{event.repo}@{event.alias}")
        elif event.type in ("version.ready", "version.archived"):
            r.forget_alias(event.repo, "")
            if event.type == "version.ready":
                self._prefetch(event.repo, event.repo)
        elif event.type == "version.deleted":
            r.forget_alias(event.repo, None)
            if event.revision:
                await r.forget_revision(event.revision)
