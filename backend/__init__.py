"""Quiver's multi-LoRA backend: one base model, adapters pulled from the registry on demand.

``create_app(settings, engine)`` builds the FastAPI app (OpenAI and LoRAX APIs, adapter
operations, metrics, state); ``serve(model_dir=..., registry_url=...)`` runs it. Adapters live
in three tiers (GPU slots, host cache, disk cache) managed by
:class:`~quiver.backend.residency.Residency`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["BackendSettings", "create_app", "serve", "Residency"]

if TYPE_CHECKING:
    from quiver.backend.app import create_app
    from quiver.backend.residency import Residency
    from quiver.backend.server import serve
    from quiver.backend.settings import BackendSettings

_WHERE = {"BackendSettings": "quiver.backend.settings", "create_app": "quiver.backend.app",
          "serve": "quiver.backend.server", "Residency": "quiver.backend.residency"}


def __getattr__(name: str) -> Any:
    # Lazy so that importing a submodule (the engine, settings) does not start a web stack.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(name)
