"""The long-lived objects of one registry process, built in the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from quiver.events import EventBus, make_event_bus
from quiver.logging import get_logger, log_event
from quiver.registry.auth import PrincipalCache
from quiver.registry.db import Database
from quiver.registry.settings import Settings
from quiver.registry.storage import BlobStore, make_blob_store
from quiver.wire import RegistryEvent

__all__ = ["Registry", "build_registry"]

_log = get_logger("quiver.registry")


@dataclass
class Registry:
    settings: Settings
    db: Database
    store: BlobStore
    bus: EventBus
    principals: PrincipalCache = field(default_factory=lambda: PrincipalCache(0))
    # Upload id -> [lock, holders]: a second commit of one upload waits for the first.
    _commit_locks: dict[str, list] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def commit_lock(self, upload_id: str) -> AsyncIterator[None]:
        entry = self._commit_locks.setdefault(upload_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._commit_locks.pop(upload_id, None)

    async def emit(self, event: RegistryEvent) -> None:
        """Publish an event; a bus outage is logged, never turned into a failed request."""
        try:
            await self.bus.publish(event)
        except Exception as exc:  # noqa: BLE001 - redis errors of every kind
            log_event(_log, "event.publish_failed", type=event.type, repo=event.repo,
                      error=str(exc))

    async def close(self) -> None:
        await self.bus.close()
        self.db.dispose()


def build_registry(settings: Settings) -> Registry:
    """Open the database (migrating it), the blob store and the event bus."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url())
    db.migrate()
    store = make_blob_store(
        kind=settings.blob_store, root=settings.resolved_blobs_dir(),
        endpoint=settings.s3_endpoint, access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key, bucket=settings.s3_bucket,
        secure=settings.s3_secure, region=settings.s3_region)
    return Registry(settings=settings, db=db, store=store, bus=make_event_bus(settings.redis_url),
                    principals=PrincipalCache(settings.token_cache_s))
