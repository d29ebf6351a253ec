"""Service routes: health, identity, tokens, the base-model catalogue and garbage collection."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from sqlmodel import Session, select

from quiver.errors import NotFound, Unauthorized
from quiver.registry import pipeline
from quiver.registry.auth import hash_token, new_token_secret
from quiver.registry.catalogue import get_base_model, list_base_models, register_base_model
from quiver.registry.deps import Admin, CurrentPrincipal, Reader, RegistryDep, Writer
from quiver.registry.models import BaseModelCreate, Token, TokenCreate
from quiver.wire import BaseModelInfo

__all__ = ["router"]

router = APIRouter(tags=["service"])


@router.get("/api/v1/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/api/v1/whoami")
async def whoami(principal: CurrentPrincipal) -> dict[str, Any]:
    if principal.anonymous:
        raise Unauthorized("no token given")
    return {"name": principal.name, "scopes": sorted(principal.scopes),
            "repos": list(principal.repos) if principal.repos is not None else None}


def _public(t: Token) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "scopes": t.scopes, "repos": t.repos,
            "created_at": t.created_at}


@router.post("/api/v1/tokens", status_code=201)
async def create_token(body: TokenCreate, reg: RegistryDep, _: Admin) -> dict[str, Any]:
    secret = new_token_secret()

    def insert(session: Session) -> Token:
        row = Token(name=body.name, token_hash=hash_token(secret), scopes=list(body.scopes),
                    repos=body.repos)
        session.add(row)
        session.commit()
        return row

    row = await reg.db.run(insert)
    return {**_public(row), "token": secret}


@router.get("/api/v1/tokens")
async def list_tokens(reg: RegistryDep, _: Admin) -> dict[str, Any]:
    rows = await reg.db.run(lambda s: list(s.exec(select(Token).order_by(Token.id))))
    return {"items": [_public(t) for t in rows]}


@router.delete("/api/v1/tokens/{token_id}", status_code=204)
async def delete_token(token_id: int, reg: RegistryDep, _: Admin) -> Response:
    def remove(session: Session) -> None:
        row = session.get(Token, token_id)
        if row is None:
            raise NotFound(f"no token {token_id}", details={"id": token_id})
        session.delete(row)
        session.commit()

    await reg.db.run(remove)
    reg.principals.forget(token_id)
    return Response(status_code=204)


@router.post("/api/v1/base-models", response_model=BaseModelInfo)
async def create_base_model(body: BaseModelCreate, reg: RegistryDep, _: Writer,
                            response: Response) -> BaseModelInfo:
    info, created = await reg.db.run(lambda s: register_base_model(
        s, name=body.name, config=body.config, revision=body.revision), write=True)
    response.status_code = 201 if created else 200
    return info


@router.get("/api/v1/base-models")
async def base_models(reg: RegistryDep, _: Reader) -> dict[str, Any]:
    return {"items": await reg.db.run(list_base_models)}


@router.get("/api/v1/base-models/{name:path}", response_model=BaseModelInfo)
async def base_model(name: str, reg: RegistryDep, _: Reader) -> BaseModelInfo:
    return await reg.db.run(lambda s: get_base_model(s, name=name))


@router.post("/api/v1/gc")
async def gc(reg: RegistryDep, _: Admin) -> dict[str, Any]:
    """Expire stale uploads and delete blobs that nothing refers to."""
    expired = await pipeline.expire_uploads(reg)
    deleted, freed = await pipeline.collect_blobs(reg)
    return {"deleted_blobs": deleted, "freed_bytes": freed, "expired_uploads": expired}
