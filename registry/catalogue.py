"""The base-model catalogue: models adapters are checked against, registered from config.json."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlmodel import Session, select

from quiver.errors import BaseModelNotFound, Conflict
from quiver.registry.compat import base_model_info_from_config
from quiver.registry.models import BaseModelRow
from quiver.wire import BaseModelInfo

__all__ = ["register_base_model", "get_base_model", "list_base_models"]


def _config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def register_base_model(session: Session, *, name: str, config: dict[str, Any],
                        revision: str | None) -> tuple[BaseModelInfo, bool]:
    """Register ``name``; returns its info and whether it is new. Idempotent for the same config,
    :class:`Conflict` for a different one."""
    info = base_model_info_from_config(name, config, revision)
    digest = _config_digest(config)
    row = session.get(BaseModelRow, name)
    if row is not None:
        if row.config_sha256 == digest and row.revision == revision:
            return BaseModelInfo.model_validate(row.info), False
        raise Conflict(f"base model {name!r} is already registered with another config or revision",
                       details={"name": name, "revision": row.revision})
    session.add(BaseModelRow(name=name, revision=revision, family=info.family,
                             info=info.model_dump(mode="json"), config_sha256=digest))
    session.commit()
    return info, True


def get_base_model(session: Session, *, name: str) -> BaseModelInfo:
    row = session.get(BaseModelRow, name)
    if row is None:
        raise BaseModelNotFound(f"base model {name!r} is not registered; register its config.json "
                                "with POST /api/v1/base-models first", details={"base_model": name})
    return BaseModelInfo.model_validate(row.info)


def list_base_models(session: Session) -> list[BaseModelInfo]:
    rows = session.exec(select(BaseModelRow).order_by(BaseModelRow.name))
    return [BaseModelInfo.model_validate(r.info) for r in rows]
