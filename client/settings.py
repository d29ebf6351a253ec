"""The client's settings: ``QUIVER_*`` environment variables over the config file over defaults.

``quiver login`` writes ``token`` and ``registry_url`` into the config file
(``~/.config/quiver/config.json`` unless ``QUIVER_CONFIG_FILE`` names another, mode 0600).
Explicit arguments to :class:`ClientSettings` win over both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from quiver.settings import BaseQuiverSettings

__all__ = ["ClientSettings", "DEFAULT_REGISTRY_URL", "read_config_file", "write_config_file"]

DEFAULT_REGISTRY_URL = "http://127.0.0.1:8700"
_DEFAULT_CONFIG = Path("~/.config/quiver/config.json")


class _ConfigLocation(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUIVER_", extra="ignore")

    config_file: Path = _DEFAULT_CONFIG


def read_config_file(path: Path) -> dict[str, Any]:
    """The config file's settings, or ``{}`` when it is missing or unreadable."""
    try:
        data = json.loads(path.expanduser().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_config_file(path: Path, updates: dict[str, Any]) -> Path:
    """Merge ``updates`` into the config file (``None`` removes a key); the file is mode 0600."""
    path = path.expanduser()
    data = read_config_file(path)
    for key, value in updates.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the keys of :class:`ClientSettings` from the JSON config file."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = read_config_file(_ConfigLocation().config_file)
        return {k: v for k, v in data.items() if k in self.settings_cls.model_fields}


class ClientSettings(BaseQuiverSettings):
    """Where the registry is, who we are, and how transfers behave."""

    registry_url: str = DEFAULT_REGISTRY_URL
    token: str | None = None
    cache_dir: Path = Path("~/.cache/quiver")
    config_file: Path = _DEFAULT_CONFIG
    # Concurrent connections for one large download (ranged GETs); by default 4, or the
    # number of CPUs when fewer (each connection needs a core on loopback).
    parallel_downloads: int = Field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)),
                                    ge=1, le=64)
    # Concurrent part uploads of one push. One by default: the registry hashes a blob's parts
    # in order as they arrive (parts sent side by side are hashed again when committing), and
    # one stream kept a loopback push at the speed of a plain PUT where two did not.
    parallel_uploads: int = Field(default=1, ge=1, le=64)
    # Bytes per ranged GET of a large download; uploads use the registry's part size.
    part_size: int = Field(default=32 << 20, ge=1 << 16)
    # Files at least this large are fetched with parallel ranged GETs.
    parallel_threshold: int = Field(default=64 << 20, ge=0)
    # Pushes whose files total at least this many bytes go manifest-first.
    multipart_push_limit: int = Field(default=16 << 20, ge=0)
    # In a manifest-first push, files at least this large whose sha256 is not remembered are
    # sent while they are hashed; the hash is declared once known.
    hash_while_sending: int = Field(default=16 << 20, ge=0)
    timeout: float = 60.0

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _ConfigFileSource(settings_cls))

    @property
    def cache_path(self) -> Path:
        return self.cache_dir.expanduser()

    @property
    def config_path(self) -> Path:
        return self.config_file.expanduser()
