"""The engine's public value types: its configuration, sampling parameters and stream events."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EngineConfig", "SamplingParams", "TokenEvent", "FINISH_REASONS"]

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class EngineConfig:
    """How one engine instance is sized.

    ``kv_cache_tokens=None`` derives the KV-cache size from a memory budget: on CUDA
    ``kv_cache_memory_fraction`` of the memory left free after weights and adapter slots, on
    the CPU the smaller of what ``max_running`` full-length sequences need and that fraction of
    the machine's memory.
    """

    model_dir: Path
    device: str = "auto"
    dtype: str = "auto"
    max_slots: int = 32
    max_rank: int = 64
    max_running: int = 64
    max_batch_tokens: int = 2048
    kv_cache_tokens: int | None = None
    max_context: int | None = None
    max_queue: int = 4096
    kv_block_size: int = 16
    kv_cache_memory_fraction: float = 0.25
    seed: int = 0
    random_weights: bool = False    # weights of the configured shape, drawn at random (benchmarks)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        for name in ("max_slots", "max_rank", "max_running", "max_batch_tokens", "max_queue",
                     "kv_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")


@dataclass
class SamplingParams:
    """Per-request decoding controls; ``temperature=0`` means greedy."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def problems(self) -> list[str]:
        """Every reason these parameters are invalid (empty when they are fine)."""
        out = []
        if self.max_tokens < 1:
            out.append("max_tokens must be >= 1")
        if not self.temperature >= 0:
            out.append("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            out.append("top_p must be in (0, 1]")
        if self.top_k < 0:
            out.append("top_k must be >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            out.append("stop strings must be non-empty strings")
        return out


@dataclass
class TokenEvent:
    """One step of a request's stream: the new token and the text it added."""

    request_id: str
    token_id: int | None
    text: str
    logprob: float | None
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
