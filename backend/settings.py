"""The backend's settings: one class, read from ``QUIVER_*`` environment variables at start-up."""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator

from quiver.settings import BaseQuiverSettings

__all__ = ["BackendSettings", "get_settings"]


class BackendSettings(BaseQuiverSettings):
    """Everything a backend process can be told; field ``x`` is env ``QUIVER_X``."""

    # base model folder (config.json, weights, tokenizer)
    model_dir: Path | None = None
    # its name in the registry; default: the folder's name
    base_model_name: str | None = None
    device: str = "auto"                        # auto (CUDA when available) | cpu | cuda | cuda:N
    # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    dtype: str = "auto"

    host: str = "127.0.0.1"                     # where to listen
    port: int = 8300                            # where to listen
    backend_id: str | None = None               # heartbeat identity; default: {hostname}-{port}
    # URL the gateway should use; default: http://{host}:{port}
    advertise_url: str | None = None

    registry_url: str = "http://127.0.0.1:8700"  # the registry, source of truth for adapters
    token: str | None = None                    # registry token (read scope) for private adapters
    registry_retry_after: float = 5.0           # Retry-After (s) on 503s while the registry is down
    pull_timeout: float = 300.0                 # longest wait (s) for a free adapter slot

    # adapters resident in the engine at once (GPU slots)
    max_slots: int = Field(default=32, ge=1)
    max_rank: int = Field(default=64, ge=1)     # highest LoRA rank a slot holds
    # host-memory cache of prepared adapters
    host_cache_bytes: int = Field(default=2 * 1024**3, ge=0)
    disk_cache_bytes: int = Field(default=20 * 1024**3, ge=0)  # local disk cache of pulled adapters
    disk_cache_dir: Path = Path.home() / ".cache" / "quiver" / "backend"  # the disk cache's folder
    # How long an alias (repo@prod, bare repo) stays resolved before asking again; 0 asks the
    # registry on every request, so a moved alias is never served stale.
    alias_ttl: float = Field(default=0.0, ge=0.0)

    max_running: int = Field(default=64, ge=1)  # requests generating at once
    # tokens per engine step (prefill chunks + decodes)
    max_batch_tokens: int = Field(default=2048, ge=16)
    kv_cache_tokens: int | None = None          # KV-cache size in tokens; default: from free memory
    max_context: int | None = None              # longest prompt + completion; default: the model's
    # requests waiting beyond max_running before 503 overloaded
    max_queue: int = Field(default=1024, ge=1)

    heartbeat_interval: float = Field(default=1.0, gt=0.0)  # seconds between heartbeats in Redis
    heartbeat_ttl: float = Field(default=5.0, gt=0.0)       # a heartbeat's lifetime in Redis (s)
    # on SIGTERM, time (s) to finish in-flight requests
    drain_timeout: float = Field(default=30.0, ge=0.0)
    # fetch an alias's new target when the registry moves it
    prefetch_on_events: bool = True

    @model_validator(mode="after")
    def _default_backend_id(self) -> BackendSettings:
        if not self.backend_id:
            self.backend_id = f"{socket.gethostname()}-{self.port}"
        return self

    def public_url(self) -> str:
        """The URL peers reach this backend at (what the heartbeat advertises)."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


@lru_cache(maxsize=1)
def get_settings() -> BackendSettings:
    return BackendSettings()
