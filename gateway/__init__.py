"""The routing gateway: one OpenAI-compatible URL in front of every backend.

It resolves the adapter each request needs (named, or chosen by the router), picks a backend
that serves its base model and preferably holds the adapter already, and stays correct under
load, slow backends, crashes and abuse. ``serve()`` runs it; ``create_app()`` builds the ASGI
app; :mod:`quiver.gateway.balancer` is the pure backend-selection policy.
"""

from __future__ import annotations

from quiver.gateway.app import Gateway, create_app
from quiver.gateway.balancer import choose_backends
from quiver.gateway.server import serve
from quiver.gateway.settings import GatewaySettings

__all__ = ["Gateway", "GatewaySettings", "choose_backends", "create_app", "serve"]
