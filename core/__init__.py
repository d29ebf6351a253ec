"""Quiver: an open hub for LoRA adapters.

``quiver.Client`` is the Python client of the registry; the components live in
``quiver.registry``, ``quiver.client``, ``quiver.routing``, ``quiver.gateway`` and
``quiver.backend``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Client", "__version__"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from quiver.client import Client


def __getattr__(name: str) -> Any:
    # Lazy so that `import quiver.errors` in a server does not pull in the client.
    if name == "Client":
        from quiver.client import Client

        return Client
    raise AttributeError(name)
