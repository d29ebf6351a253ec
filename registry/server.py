"""Run the registry with uvicorn: ``serve(host, port, data_dir)``."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

from quiver.logging import configure
from quiver.registry.settings import Settings

__all__ = ["serve"]

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _bound_malloc() -> None:
    """Keep streamed buffers from piling up in glibc's heaps.

    Blobs pass through as 1 MiB buffers on many worker threads. glibc raises its mmap
    threshold after the first such buffer is freed, so later ones come from per-thread arenas
    that hold on to the memory; a fixed threshold returns each buffer to the system when it is
    freed, and two arenas bound what threads can strand. No effect outside glibc.
    """
    try:
        libc = ctypes.CDLL(None)     # the symbols already loaded: no library search at start
        libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass


def serve(host: str | None = None, port: int | None = None,
          data_dir: str | Path | None = None) -> None:
    """Serve the registry until interrupted; arguments given override ``QUIVER_*`` settings."""
    import uvicorn

    from quiver.registry.app import create_app

    overrides = {"host": host, "port": port,
                 "data_dir": Path(data_dir) if data_dir is not None else None}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    configure(settings.log_level, settings.log_format)
    _bound_malloc()
    app = create_app(settings)
    # The modules and the app live as long as the process: leaving them out of every later
    # collection keeps a full one from pausing the event loop for ~80 ms to walk them again.
    gc.freeze()
    uvicorn.run(app, host=settings.host, port=settings.port,
                log_level="warning", timeout_graceful_shutdown=5)
