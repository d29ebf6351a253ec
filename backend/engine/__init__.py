"""Quiver's multi-LoRA inference engine.

:class:`Engine` runs continuous batches in which every request may use a different adapter;
:class:`AsyncEngine` drives it from asyncio. Adapters go from a PEFT folder
(:func:`load_adapter_dir`) through :meth:`Engine.prepare_adapter` (validation, host layout) to
a slot (:meth:`Engine.load_adapter`).
"""

from __future__ import annotations

from quiver.backend.engine.async_engine import AsyncEngine
from quiver.backend.engine.engine import Engine
from quiver.backend.engine.lora import PreparedAdapter, load_adapter_dir
from quiver.backend.engine.types import EngineConfig, SamplingParams, TokenEvent

__all__ = ["Engine", "AsyncEngine", "EngineConfig", "SamplingParams", "TokenEvent",
           "PreparedAdapter", "load_adapter_dir"]
