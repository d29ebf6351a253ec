"""The router process's settings (``QUIVER_*`` environment variables)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from quiver.routing.data import EmbedPart
from quiver.settings import BaseQuiverSettings

__all__ = ["RouterSettings", "get_settings"]


class RouterSettings(BaseQuiverSettings):
    registry_url: str = "http://127.0.0.1:8700"
    registry_token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8900

    # The encoder: a local sentence-transformers folder; unset means the bundled all-MiniLM-L6-v2.
    encoder_path: Path | None = None
    encoder_device: str = "cpu"

    # Candidates: one router per base model, optionally narrowed.
    namespaces: list[str] = Field(default_factory=list)
    repos: list[str] = Field(default_factory=list)
    candidate_alias: str = "prod"          # this alias if a repo has it, else its latest version
    default_base_model: str | None = None  # routes that name no base model go here
    extra_data: Path | None = None         # labelled JSONL/CSV: label = repo name, or "oos"

    # Decisions.
    fallback: Literal["base", "default_adapter", "error"] = "base"
    default_adapter: str | None = None     # a repo or "repo/N" (fallback "default_adapter")
    threshold: float | None = None         # fixed abstain threshold; unset: fitted per router
    default_threshold: float = 0.35        # used when a router has too little data to fit one
    target_precision: float = 0.95
    embed_part: EmbedPart = "last_user"
    max_prompt_chars: int = 4000
    top_k: int = 3

    # Speed.
    batch_window_ms: float = 0.0
    max_batch: int = 32
    cache_size: int = 10_000

    # Where router artifacts are written (one .npz per version); unset: kept in memory only.
    artifact_dir: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> RouterSettings:
        if self.fallback == "default_adapter" and not self.default_adapter:
            raise ValueError("fallback=default_adapter needs QUIVER_DEFAULT_ADAPTER")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must lie in [0, 1]")
        if not 0.0 < self.target_precision <= 1.0:
            raise ValueError("target_precision must lie in (0, 1]")
        return self


@lru_cache
def get_settings() -> RouterSettings:
    return RouterSettings()
