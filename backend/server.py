"""``quiver serve backend``: one process serving one base model.

On SIGTERM or SIGINT the server stops accepting connections, reports ``draining`` in its
heartbeat at once, lets in-flight requests finish for up to ``drain_timeout`` seconds, then stops
the engine and removes its heartbeat.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import uvicorn

from quiver.backend.app import create_app
from quiver.backend.settings import BackendSettings
from quiver.logging import configure

__all__ = ["serve", "BackendServer"]


class BackendServer(uvicorn.Server):
    """uvicorn's server, telling the runtime to drain as soon as an exit signal arrives."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        app = self.config.loaded_app if self.config.loaded else None
        runtime = getattr(getattr(_unwrap(app), "state", None), "runtime", None)
        if runtime is not None:
            runtime.generation.draining = True
            runtime.ready = False
            if runtime.heartbeat is not None:
                try:
                    asyncio.get_running_loop().call_soon(runtime.heartbeat.poke)
                except RuntimeError:
                    pass
        super().handle_exit(sig, frame)


def _unwrap(app: Any) -> Any:
    while app is not None and not hasattr(app, "state") and hasattr(app, "app"):
        app = app.app
    return app


def serve(model_dir: str | Path | None = None, registry_url: str | None = None,
          host: str | None = None, port: int | None = None,
          base_model_name: str | None = None, **overrides: Any) -> None:
    """Serve the model in ``model_dir`` until a signal stops the process."""
    given = {"model_dir": model_dir, "registry_url": registry_url, "host": host, "port": port,
             "base_model_name": base_model_name, **overrides}
    settings = BackendSettings(**{k: v for k, v in given.items() if v is not None})
    configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=max(1, int(settings.drain_timeout)),
                            lifespan="on")
    BackendServer(config).run()


def main() -> None:
    """``python -m quiver.backend.server``: settings from ``QUIVER_*`` only."""
    serve()


if __name__ == "__main__":
    main()
