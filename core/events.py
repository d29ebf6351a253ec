"""The event bus: registry events out to the router, backends and caches.

Two implementations behind one small interface: Redis pub/sub when ``QUIVER_REDIS_URL`` is set,
an in-process fan-out otherwise. Subscribers get :class:`~quiver.wire.RegistryEvent` objects.
Pub/sub does not replay missed events, so a subscriber that (re)connects should also resync from
the registry's state; :meth:`EventBus.subscribe` yields ``None`` once right after every
(re)connection to say exactly that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from quiver.wire import EVENTS_CHANNEL, RegistryEvent

__all__ = ["EventBus", "InProcessEventBus", "RedisEventBus", "make_event_bus"]

_log = logging.getLogger("quiver.events")


class EventBus(Protocol):
    async def publish(self, event: RegistryEvent) -> None: ...

    def subscribe(self) -> AsyncIterator[RegistryEvent | None]: ...

    async def close(self) -> None: ...


class InProcessEventBus:
    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[RegistryEvent]] = set()

    async def publish(self, event: RegistryEvent) -> None:
        for q in list(self._queues):
            q.put_nowait(event)

    async def subscribe(self) -> AsyncIterator[RegistryEvent | None]:
        q: asyncio.Queue[RegistryEvent] = asyncio.Queue()
        self._queues.add(q)
        try:
            yield None
            while True:
                yield await q.get()
        finally:
            self._queues.discard(q)

    async def close(self) -> None:
        self._queues.clear()


class RedisEventBus:
    def __init__(self, url: str, channel: str = EVENTS_CHANNEL) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(url, decode_responses=True)
        self._url = url
        self.channel = channel

    async def publish(self, event: RegistryEvent) -> None:
        await self._redis.publish(self.channel, event.model_dump_json())

    async def subscribe(self) -> AsyncIterator[RegistryEvent | None]:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        delay = 0.2
        while True:
            client = aioredis.from_url(self._url, decode_responses=True)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                delay = 0.2
                yield None  # (re)connected: resync from the registry
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    try:
                        yield RegistryEvent.model_validate_json(msg["data"])
                    except ValueError:
                        _log.warning("dropping malformed event", extra={"fields": {"data": msg["data"]}})
            except (RedisError, ConnectionError, OSError) as exc:
                _log.warning("event bus disconnected; retrying", extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                    await client.aclose()

    async def close(self) -> None:
        await self._redis.aclose()


def make_event_bus(redis_url: str | None) -> EventBus:
    return RedisEventBus(redis_url) if redis_url else InProcessEventBus()
