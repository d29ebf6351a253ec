"""The registry's FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from quiver import __version__
from quiver.http import install_error_handlers
from quiver.logging import get_logger, log_event
from quiver.registry import api_admin, api_blobs, api_repos, api_uploads, hf
from quiver.registry.auth import ensure_admin_token
from quiver.registry.pipeline import collect_blobs, expire_uploads
from quiver.registry.settings import Settings, get_settings
from quiver.registry.state import Registry, build_registry

__all__ = ["create_app"]

_log = get_logger("quiver.registry")


async def _collect_periodically(registry: Registry, interval_s: float) -> None:
    """Expire stale uploads and collect unreferenced blobs every ``interval_s`` seconds."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            expired = await expire_uploads(registry)
            deleted, freed = await collect_blobs(registry)
            log_event(_log, "registry.gc", expired_uploads=expired, deleted_blobs=deleted,
                      freed_bytes=freed)
        except Exception:  # noqa: BLE001 - a failed round is retried at the next one
            _log.exception("registry.gc_failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the database, blob store and event bus open in its lifespan."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = build_registry(settings)
        if settings.admin_token:
            with registry.db.write_session() as session:
                ensure_admin_token(session, settings.admin_token)
        await registry.store.cleanup_stale(older_than_s=settings.upload_ttl_s)
        app.state.registry = registry
        log_event(_log, "registry.started", database=registry.db.engine.url.get_backend_name(),
                  blob_store=settings.blob_store, anonymous_read=settings.anonymous_read)
        collector = (asyncio.create_task(_collect_periodically(registry, settings.gc_interval_s))
                     if settings.gc_interval_s else None)
        try:
            yield
        finally:
            if collector is not None:
                collector.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collector
            await registry.close()

    app = FastAPI(title="Quiver registry", version=__version__, lifespan=lifespan)
    install_error_handlers(app, "quiver")
    for module in (api_admin, api_repos, api_uploads, api_blobs, hf):
        app.include_router(module.router)   # hf last: its resolve route matches broadly
    return app
