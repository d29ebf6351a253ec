"""Run the router service (``quiver serve router``)."""

from __future__ import annotations

__all__ = ["serve"]


def serve(registry_url: str | None = None, host: str | None = None, port: int | None = None) -> None:
    """Serve the router on ``host:port``, training from the registry at ``registry_url``."""
    import uvicorn

    from quiver.logging import configure
    from quiver.routing.app import create_app
    from quiver.routing.settings import RouterSettings

    overrides = {k: v for k, v in (("registry_url", registry_url), ("host", host), ("port", port))
                 if v is not None}
    settings = RouterSettings(**overrides)
    configure(settings.log_level, settings.log_format)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower())
