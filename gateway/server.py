"""Running the gateway: ``serve()`` (what ``quiver serve gateway`` calls) and a module entry point.

Uvicorn runs it with uvloop and httptools when they are installed. On SIGTERM or SIGINT the
gateway first reports not-ready (``/ready`` answers 503), then stops accepting connections and
lets requests in flight, streams included, finish for up to ``drain_timeout_s``.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from typing import Any

import uvicorn

from quiver.gateway.app import Gateway, create_app
from quiver.gateway.settings import GatewaySettings
from quiver.logging import configure

__all__ = ["serve", "build_settings", "main"]


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self._gateway = gateway

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._gateway.start_draining()
        super().handle_exit(sig, frame)


def build_settings(*, registry_url: str | None = None, backends: Sequence[str] | None = None,
                   router_url: str | None = None, host: str | None = None,
                   port: int | None = None, **overrides: Any) -> GatewaySettings:
    """Settings from the environment, with the given arguments taking precedence."""
    given: dict[str, Any] = {"registry_url": registry_url, "router_url": router_url,
                             "host": host, "port": port, **overrides}
    if backends:
        given["backends"] = list(backends)
    return GatewaySettings(**{k: v for k, v in given.items() if v is not None})


def serve(*, registry_url: str | None = None, backends: Sequence[str] | None = None,
          router_url: str | None = None, host: str | None = None, port: int | None = None,
          **overrides: Any) -> None:
    """Run a gateway until SIGTERM/SIGINT. Arguments override ``QUIVER_*`` settings."""
    settings = build_settings(registry_url=registry_url, backends=backends,
                              router_url=router_url, host=host, port=port, **overrides)
    configure(settings.log_level, settings.log_format)
    gateway = create_app(settings)
    config = uvicorn.Config(
        gateway, host=settings.host, port=settings.port, lifespan="on",
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        access_log=False, log_level=settings.log_level.lower(), backlog=4096,
        proxy_headers=False, server_header=False, date_header=False,
        timeout_keep_alive=30, timeout_graceful_shutdown=int(settings.drain_timeout_s))
    _DrainingServer(config, gateway).run()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quiver.gateway",
                                     description="Run the Quiver routing gateway.")
    parser.add_argument("--registry", help="registry URL")
    parser.add_argument("--backend", action="append", default=[], help="backend URL (repeat)")
    parser.add_argument("--router", help="router URL (enables model=auto)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    serve(registry_url=args.registry, backends=args.backend, router_url=args.router,
          host=args.host, port=args.port)
