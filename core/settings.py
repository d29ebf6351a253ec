"""The settings base every Quiver process extends.

Each process (registry, backend, router, gateway, client) has exactly one ``Settings`` class in
its own package, derived from :class:`BaseQuiverSettings`, read from ``QUIVER_*`` environment
variables once at start-up and handed around through a cached dependency. Nothing else in the
code base reads ``os.environ``.
"""

from __future__ import annotations

from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["BaseQuiverSettings"]


class BaseQuiverSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUIVER_", extra="ignore", validate_default=True)

    log_level: str = "INFO"                         # DEBUG, INFO, WARNING, ERROR
    log_format: Literal["json", "text"] = "text"    # json: one object per line, for collectors
    # Shared event bus and state (heartbeats, rate limits); in-process when unset.
    redis_url: str | None = None
