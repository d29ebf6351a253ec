"""FastAPI dependencies as ``Annotated`` aliases: the registry, the settings and the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from quiver.errors import Unauthorized
from quiver.registry.auth import ANONYMOUS, Principal, hash_token, principal_for_digest
from quiver.registry.settings import Settings
from quiver.registry.state import Registry

__all__ = ["RegistryDep", "SettingsDep", "CurrentPrincipal", "Reader", "Writer", "Admin",
           "get_registry", "current_principal"]


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


RegistryDep = Annotated[Registry, Depends(get_registry)]


def get_settings(registry: RegistryDep) -> Settings:
    return registry.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return secret.strip()


_ANONYMOUS_READER = Principal(name="anonymous", scopes=frozenset({"read"}))


async def current_principal(request: Request, registry: RegistryDep) -> Principal:
    """The caller: a token's principal, or an anonymous one without a token (401 on a bad
    token); anonymous callers may read when ``anonymous_read`` is on."""
    secret = _bearer(request)
    if secret is None:
        return _ANONYMOUS_READER if registry.settings.anonymous_read else ANONYMOUS
    digest = hash_token(secret)
    principal = registry.principals.get(digest)
    if principal is None:
        generation = registry.principals.generation
        principal = await registry.db.run(lambda session: principal_for_digest(session, digest))
        registry.principals.put(digest, principal, generation=generation)
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def _reader(principal: CurrentPrincipal) -> Principal:
    principal.require("read")
    return principal


def _writer(principal: CurrentPrincipal) -> Principal:
    principal.require("write")
    return principal


def _admin(principal: CurrentPrincipal) -> Principal:
    principal.require("admin")
    return principal


Reader = Annotated[Principal, Depends(_reader)]
Writer = Annotated[Principal, Depends(_writer)]
Admin = Annotated[Principal, Depends(_admin)]
