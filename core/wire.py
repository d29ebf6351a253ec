"""Wire schemas shared between Quiver's processes.

These are the contracts between components: the registry's public view of a version, the events
it publishes, the heartbeat a backend publishes for the gateway, and the router's decision.
Each component may have richer internal models; on the wire they speak these.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

__all__ = [
    "FileEntry", "PeftEssentials", "VersionInfo", "RepoInfo", "BaseModelInfo", "Page",
    "RegistryEvent", "EVENTS_CHANNEL", "BackendHeartbeat", "HEARTBEAT_PREFIX",
    "RouteCandidate", "RouteDecision",
]


class FileEntry(BaseModel):
    path: str
    sha256: str
    size: int


class PeftEssentials(BaseModel):
    peft_type: str = "LORA"
    r: int
    lora_alpha: float
    target_modules: list[str]
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    bias: str = "none"


VersionStatus = Literal["pending", "ready", "failed", "archived"]
AdapterType = Literal["lora", "turbo_lora", "turbo"]


class VersionInfo(BaseModel):
    """The registry's public view of one adapter version (``GET /api/v1/resolve/{ref}``)."""

    repo: str
    version: int
    ref: str                                  # canonical "repo/N"
    revision: str                             # 40-hex, immutable
    status: VersionStatus
    base_model: str
    base_model_revision: str | None = None
    adapter_type: AdapterType = "lora"
    peft: PeftEssentials | None = None
    dtype: str | None = None
    parameter_count: int | None = None
    size_bytes: int = 0
    description: str | None = None
    task_description: str | None = None
    examples: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    parent: str | None = None                 # "repo/N"
    aliases: list[str] = Field(default_factory=list)
    pushed_by: str | None = None
    created_at: datetime | None = None
    files: list[FileEntry] = Field(default_factory=list)


class RepoInfo(BaseModel):
    name: str
    namespace: str | None = None
    description: str | None = None
    created_at: datetime | None = None
    latest_version: int | None = None
    version_count: int = 0
    aliases: dict[str, int] = Field(default_factory=dict)


class BaseModelInfo(BaseModel):
    name: str
    revision: str | None = None
    architecture: str                        # e.g. LlamaForCausalLM
    family: str                              # llama | mistral | qwen2
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    # module name -> [in_features, out_features]
    modules: dict[str, list[int]] = Field(default_factory=dict)


class Page(BaseModel):
    items: list
    next_cursor: str | None = None


EVENTS_CHANNEL = "quiver:events"


class RegistryEvent(BaseModel):
    """Published on ``EVENTS_CHANNEL`` (Redis pub/sub) or the in-process bus."""

    type: Literal["version.ready", "version.archived", "version.deleted", "alias.moved"]
    repo: str
    version: int | None = None
    revision: str | None = None
    base_model: str | None = None
    alias: str | None = None
    ts: float


HEARTBEAT_PREFIX = "quiver:backends:"


class BackendHeartbeat(BaseModel):
    """A backend's residency report, stored at ``HEARTBEAT_PREFIX + backend_id`` with a TTL."""

    backend_id: str
    url: str
    base_model: str
    base_model_revision: str | None = None
    # canonical "repo/N" refs per tier
    gpu: list[str] = Field(default_factory=list)      # adapters in engine slots (GPU or CPU engine)
    host: list[str] = Field(default_factory=list)     # host-memory cache
    disk: list[str] = Field(default_factory=list)     # local disk cache
    loading: list[str] = Field(default_factory=list)
    total_slots: int = 0
    free_slots: int = 0
    queue_depth: int = 0
    running: int = 0
    max_running: int = 0                              # sequences the engine runs at once; 0 unknown
    kv_cache_usage: float = 0.0
    draining: bool = False
    ts: float


class RouteCandidate(BaseModel):
    adapter: str                             # canonical "repo/N"
    score: float


class RouteDecision(BaseModel):
    """The router's answer for one prompt (``POST /v1/route`` on the router)."""

    adapter: str | None                      # "repo/N", or None for the base model
    base_model: str
    confidence: float
    action: Literal["adapter", "base", "default_adapter"]
    candidates: list[RouteCandidate] = Field(default_factory=list)
    router_version: str | None = None
    latency_ms: float | None = None
