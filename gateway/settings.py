"""The gateway's settings: one class, read from ``QUIVER_*`` environment variables at start-up."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator

from pydantic_settings import NoDecode

from quiver.settings import BaseQuiverSettings

__all__ = ["GatewaySettings", "get_settings"]


class GatewaySettings(BaseQuiverSettings):
    """Everything the gateway process can be told. ``redis_url`` comes from the base class."""

    host: str = "127.0.0.1"
    port: int = 8080
    registry_url: str | None = None
    registry_token: str | None = None
    router_url: str | None = None
    # Backends given on the command line (QUIVER_BACKENDS="http://a:8000,http://b:8000");
    # more are discovered from the heartbeats backends publish in Redis.
    backends: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Keys and limits.
    admin_token: str | None = None
    keys_file: str | None = None
    # None: keys are required as soon as an admin token or a keys file is configured.
    require_api_key: bool | None = None
    # What to do with a request when Redis cannot be reached to count it.
    rate_limit_failure: Literal["open", "closed"] = "open"
    redis_prefix: str = "quiver:gw:"

    # Upstream I/O. There is deliberately no total timeout: long streams must not be cut.
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 300.0          # longest silence tolerated between upstream bytes
    pool_timeout_s: float = 5.0
    max_connections: int = 4096
    max_attempts: int = 3                  # backends tried for one request before giving up
    max_body_bytes: int = 4 * 1024 * 1024

    # Outlier ejection: this many consecutive failures take a backend out for a while.
    eject_after_failures: int = 3
    eject_base_s: float = 5.0
    eject_max_s: float = 60.0

    # Fleet and resolution.
    poll_interval_s: float = 1.0
    state_timeout_s: float = 2.0
    unreachable_after_s: float = 5.0       # a command-line backend silent this long is dropped
    resolve_ttl_s: float = 2.0             # refs that can move (aliases, latest)
    pinned_ttl_s: float = 300.0            # repo/N and revision ids
    stale_if_error_s: float = 300.0        # serve a cached resolution while the registry is down
    models_ttl_s: float = 5.0
    load_cap_factor: float = 1.25

    drain_timeout_s: float = 30.0
    auto_model: str = "auto"

    @field_validator("backends", mode="before")
    @classmethod
    def _split_backends(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("backends")
    @classmethod
    def _strip_slashes(cls, value: list[str]) -> list[str]:
        return [v.rstrip("/") for v in value]

    @property
    def keys_required(self) -> bool:
        if self.require_api_key is not None:
            return self.require_api_key
        return bool(self.admin_token or self.keys_file)


@lru_cache(maxsize=1)
def get_settings() -> GatewaySettings:
    return GatewaySettings()
