"""The Quiver registry: versioned LoRA adapters over HTTP, with a Hugging Face compatible read side.

``create_app(settings)`` builds the FastAPI app; ``serve(host, port, data_dir)`` runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app", "serve", "Settings"]

if TYPE_CHECKING:
    from quiver.registry.app import create_app
    from quiver.registry.server import serve
    from quiver.registry.settings import Settings


def __getattr__(name: str) -> Any:
    # Lazy so that importing a sub-module (storage, settings) does not build the whole service.
    if name == "create_app":
        from quiver.registry.app import create_app

        return create_app
    if name == "serve":
        from quiver.registry.server import serve

        return serve
    if name == "Settings":
        from quiver.registry.settings import Settings

        return Settings
    raise AttributeError(name)
