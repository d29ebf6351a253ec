"""Run the registry with uvicorn: ``serve(host, port, data_dir)``."""

from __future__ import annotations

from pathlib import Path

from quiver.logging import configure
from quiver.registry.settings import Settings

__all__ = ["serve"]


def serve(host: str, port: int, data_dir: str | None = None) -> None:
    """Serve the registry until interrupted; ``data_dir`` overrides ``QUIVER_DATA_DIR``."""
    import uvicorn

    from quiver.registry.app import create_app

    settings = Settings(host=host, port=port,
                        **({"data_dir": Path(data_dir)} if data_dir is not None else {}))
    configure(settings.log_level, settings.log_format)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=5)
