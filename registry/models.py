"""The registry's tables (SQLModel) and the request bodies its API accepts.

    Repo 1──* Version 1──* VersionFile *──1 Blob        (files point at content-addressed blobs)
    Repo 1──* Alias *──1 Version                          (prod, staging … → one version)
    BaseModelRow, Token, Upload                           (catalogue, credentials, pushes in flight)

Version numbers come from ``Repo.next_version``, a counter bumped in the transaction that inserts
the version, so concurrent pushes never share a number on SQLite or PostgreSQL. ``latest_version``
and ``version_count`` are kept on the repo row so listings never aggregate per row.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field as PydanticField, field_validator
from sqlalchemy import JSON, BigInteger, DateTime, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from quiver.wire import AdapterType

__all__ = [
    "Repo", "Version", "VersionFile", "Alias", "Blob", "BaseModelRow", "Token", "Upload",
    "PushMetadata", "ManifestFile", "UploadCreate", "AliasUpdate", "BaseModelCreate",
    "TokenCreate", "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(**kw: Any) -> Any:
    return Field(default_factory=utcnow, sa_type=DateTime(timezone=True), **kw)


# --- tables ---------------------------------------------------------------------------------

class RepoBase(SQLModel):
    name: str = Field(max_length=200)
    namespace: str | None = Field(default=None, max_length=100)
    description: str | None = None


class Repo(RepoBase, table=True):
    __tablename__ = "repo"
    __table_args__ = (UniqueConstraint("name", name="uq_repo_name"),
                      Index("ix_repo_namespace_name", "namespace", "name"))

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = _ts()
    next_version: int = 1
    latest_version: int | None = None
    version_count: int = 0


class VersionBase(SQLModel):
    base_model: str = Field(max_length=200)
    base_model_revision: str | None = Field(default=None, max_length=100)
    adapter_type: str = Field(default="lora", max_length=16)
    dtype: str | None = Field(default=None, max_length=16)
    parameter_count: int | None = Field(default=None, sa_type=BigInteger)
    size_bytes: int = Field(default=0, sa_type=BigInteger)
    description: str | None = None
    task_description: str | None = None
    parent: str | None = Field(default=None, max_length=300)
    pushed_by: str | None = Field(default=None, max_length=200)


class Version(VersionBase, table=True):
    __tablename__ = "version"
    __table_args__ = (UniqueConstraint("repo_id", "number", name="uq_version_repo_number"),
                      UniqueConstraint("revision", name="uq_version_revision"),
                      Index("ix_version_repo_status_number", "repo_id", "status", "number"),
                      Index("ix_version_base_status_id", "base_model", "status", "id"),
                      Index("ix_version_status_id", "status", "id"))

    id: int | None = Field(default=None, primary_key=True)
    repo_id: int = Field(foreign_key="repo.id")
    number: int
    revision: str = Field(max_length=40)
    status: str = Field(default="pending", max_length=16)
    peft: dict | None = Field(default=None, sa_type=JSON)
    examples: list = Field(default_factory=list, sa_type=JSON)
    labels: dict = Field(default_factory=dict, sa_type=JSON)
    upload_id: str | None = Field(default=None, max_length=32)
    created_at: datetime = _ts()


class VersionFile(SQLModel, table=True):
    __tablename__ = "version_file"
    __table_args__ = (UniqueConstraint("version_id", "path", name="uq_version_file_path"),
                      Index("ix_version_file_sha256", "sha256"))

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="version.id")
    path: str = Field(max_length=255)
    sha256: str = Field(max_length=64)
    size: int = Field(sa_type=BigInteger)


class Alias(SQLModel, table=True):
    __tablename__ = "alias"
    __table_args__ = (UniqueConstraint("repo_id", "name", name="uq_alias_repo_name"),
                      Index("ix_alias_version_id", "version_id"))

    id: int | None = Field(default=None, primary_key=True)
    repo_id: int = Field(foreign_key="repo.id")
    name: str = Field(max_length=64)
    version_id: int = Field(foreign_key="version.id")
    updated_at: datetime = _ts()


class Blob(SQLModel, table=True):
    __tablename__ = "blob"

    sha256: str = Field(primary_key=True, max_length=64)
    size: int = Field(sa_type=BigInteger)
    created_at: datetime = _ts()


class BaseModelRow(SQLModel, table=True):
    __tablename__ = "base_model"

    name: str = Field(primary_key=True, max_length=200)
    revision: str | None = Field(default=None, max_length=100)
    family: str = Field(max_length=32)
    info: dict = Field(sa_type=JSON)               # quiver.wire.BaseModelInfo
    config_sha256: str = Field(max_length=64)      # of the canonical config JSON
    created_at: datetime = _ts()


class Token(SQLModel, table=True):
    __tablename__ = "token"
    __table_args__ = (UniqueConstraint("token_hash", name="uq_token_hash"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100)
    token_hash: str = Field(max_length=64)
    scopes: list = Field(default_factory=list, sa_type=JSON)
    repos: list | None = Field(default=None, sa_type=JSON)
    created_at: datetime = _ts()


class Upload(SQLModel, table=True):
    __tablename__ = "upload"
    __table_args__ = (Index("ix_upload_state_expires", "state", "expires_at"),)

    id: str = Field(primary_key=True, max_length=32)
    repo: str = Field(max_length=200)
    meta: dict = Field(sa_type=JSON)               # PushMetadata
    files: list = Field(sa_type=JSON)              # [ManifestFile]
    part_size: int = Field(sa_type=BigInteger)
    state: str = Field(default="open", max_length=16)   # open | committed | aborted
    pushed_by: str | None = Field(default=None, max_length=200)
    version_id: int | None = None
    created_at: datetime = _ts()
    expires_at: datetime = Field(sa_type=DateTime(timezone=True))


# --- request bodies --------------------------------------------------------------------------

class PushMetadata(BaseModel):
    base_model: str = PydanticField(min_length=1, max_length=200)
    description: str | None = PydanticField(default=None, max_length=10_000)
    task_description: str | None = PydanticField(default=None, max_length=10_000)
    examples: list[str] = PydanticField(default_factory=list, max_length=200)
    labels: dict[str, str] = PydanticField(default_factory=dict)
    parent: str | None = None
    aliases: list[str] = PydanticField(default_factory=list, max_length=20)
    adapter_type: AdapterType = "lora"

    @field_validator("labels")
    @classmethod
    def _few_labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 100 or any(len(k) > 100 or len(x) > 1000 for k, x in v.items()):
            raise ValueError("at most 100 labels, keys up to 100 and values up to 1000 characters")
        return v


Sha256 = Annotated[str, PydanticField(pattern=r"^[0-9a-f]{64}$")]


class ManifestFile(BaseModel):
    path: str = PydanticField(min_length=1, max_length=255)
    size: int = PydanticField(ge=0)
    sha256: Sha256


class ManifestEntry(ManifestFile):
    """A file of a manifest-first push; ``sha256`` may be left out and declared later (with
    ``POST /uploads/{id}/declare``), so a client can send a large file while still hashing it."""

    sha256: Sha256 | None = None


class UploadCreate(BaseModel):
    metadata: PushMetadata
    files: list[ManifestEntry] = PydanticField(min_length=1, max_length=1000)


class HashDeclaration(BaseModel):
    files: dict[str, Sha256] = PydanticField(min_length=1, max_length=1000)


class AliasUpdate(BaseModel):
    version: int = PydanticField(ge=1)


class BaseModelCreate(BaseModel):
    name: str = PydanticField(min_length=1, max_length=200)
    config: dict[str, Any]
    revision: str | None = PydanticField(default=None, max_length=100)


class TokenCreate(BaseModel):
    name: str = PydanticField(min_length=1, max_length=100)
    scopes: list[Literal["read", "write", "admin"]] = PydanticField(min_length=1)
    repos: list[str] | None = None
