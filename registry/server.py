"""Run the registry with uvicorn: ``serve(host, port, data_dir)``."""

from __future__ import annotations

from pathlib import Path

from quiver.logging import configure
from quiver.registry.settings import Settings

__all__ = ["serve"]


def serve(host: str | None = None, port: int | None = None,
          data_dir: str | Path | None = None) -> None:
    """Serve the registry until interrupted; arguments given override ``QUIVER_*`` settings."""
    import uvicorn

    from quiver.registry.app import create_app

    overrides = {"host": host, "port": port,
                 "data_dir": Path(data_dir) if data_dir is not None else None}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    configure(settings.log_level, settings.log_format)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="warning", timeout_graceful_shutdown=5)
