"""The residency heartbeat: a :class:`~quiver.wire.BackendHeartbeat` in Redis, refreshed often.

Every ``interval`` seconds the backend writes its report to ``HEARTBEAT_PREFIX + backend_id``
with a TTL of a few intervals, so a backend that dies disappears from the gateway's view on its
own. A lost Redis connection is retried with back-off and never stops serving. On shutdown the
last report says ``draining`` and the key is deleted once the backend has drained.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from quiver.logging import get_logger, log_event
from quiver.wire import HEARTBEAT_PREFIX, BackendHeartbeat

__all__ = ["Heartbeat"]

_log = get_logger("quiver.backend.heartbeat")


class Heartbeat:
    """Publishes ``report()`` to Redis every ``interval`` seconds with a ``ttl``."""

    def __init__(self, redis_url: str, backend_id: str, report: Callable[[], BackendHeartbeat], *,
                 interval: float = 1.0, ttl: float = 5.0) -> None:
        import redis.asyncio as aioredis

        self.key = HEARTBEAT_PREFIX + backend_id
        self._redis = aioredis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
        self._report = report
        self.interval = interval
        self.ttl_ms = max(int(ttl * 1000), int(interval * 2000))
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self.beats = 0

    async def start(self) -> None:
        with contextlib.suppress(Exception):
            await self.beat()
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def beat(self) -> None:
        """Publish one report now."""
        body = self._report().model_dump_json()
        await self._redis.set(self.key, body, px=self.ttl_ms)
        self.beats += 1

    def poke(self) -> None:
        """Publish at once rather than at the next tick (an adapter arrived, draining began)."""
        self._wake.set()

    async def _run(self) -> None:
        delay = self.interval
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.beat()
                delay = self.interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis down or flapping: keep serving, retry later
                log_event(_log, "heartbeat.failed", error=str(exc))
                delay = min(max(delay * 2, self.interval), 10.0)

    async def stop(self, *, delete: bool = True) -> None:
        if self._task is not None:
            # Let a beat in flight finish rather than cancel it: a cancelled SET may still
            # reach Redis after the DELETE below and bring the key back until its TTL.
            self._stopping = True
            self._wake.set()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5.0)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
            self._task = None
        with contextlib.suppress(Exception):
            if delete:
                await self._redis.delete(self.key)
            else:
                await self.beat()
        with contextlib.suppress(Exception):
            await self._redis.aclose()
