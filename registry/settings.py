"""The registry's settings, read once from ``QUIVER_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field

from quiver.settings import BaseQuiverSettings

__all__ = ["Settings", "get_settings"]

_MiB = 1024 * 1024
_GiB = 1024 * _MiB


class Settings(BaseQuiverSettings):
    """Everything the registry process can be told; defaults give an embedded single-user hub."""

    host: str = "127.0.0.1"                      # where to listen
    port: int = 8700
    data_dir: Path = Path(".quiver/registry")    # SQLite file and local blobs live here
    # SQLAlchemy URL; an SQLite file under ``data_dir`` when unset.
    database_url: str | None = None

    blob_store: Literal["local", "s3"] = "local"  # local directory or an S3-compatible bucket
    blobs_dir: Path | None = None                # local store root; ``data_dir/blobs`` when unset
    s3_endpoint: str | None = None               # host:port
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_bucket: str = "quiver"
    s3_region: str = "us-east-1"
    s3_secure: bool = False
    s3_redirect: bool = False                    # downloads answer 302 to a presigned URL
    presign_expires_s: int = 3600                # lifetime of presigned download URLs

    admin_token: str | None = None               # bootstrap admin token, stored hashed at start
    anonymous_read: bool = True                  # reads without a token; writes always need one
    token_cache_s: float = Field(default=5.0, ge=0)  # known tokens are looked up again after this

    max_file_bytes: int = Field(default=8 * _GiB, gt=0)            # largest file in a push
    max_push_bytes: int = Field(default=16 * _GiB, gt=0)           # largest push, all files
    max_single_push_bytes: int = Field(default=256 * _MiB, gt=0)   # one-request push
    max_json_bytes: int = Field(default=4 * _MiB, gt=0)            # adapter_config.json & co
    part_size: int = Field(default=64 * _MiB, gt=0)                # resumable upload part
    upload_ttl_s: int = Field(default=24 * 3600, gt=0)             # an upload expires after this
    gc_interval_s: float = Field(default=3600, ge=0)              # 0: only POST /api/v1/gc

    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL; plain ``postgresql://`` URLs get the installed psycopg driver."""
        if self.database_url:
            for prefix in ("postgresql://", "postgres://"):
                if self.database_url.startswith(prefix):
                    return "postgresql+psycopg://" + self.database_url[len(prefix):]
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    def resolved_blobs_dir(self) -> Path:
        return self.blobs_dir or self.data_dir / "blobs"


@lru_cache
def get_settings() -> Settings:
    return Settings()
