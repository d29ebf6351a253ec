"""FastAPI dependencies of the gateway's non-streaming routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from quiver.gateway.keys import ApiKey
from quiver.gateway.state import GatewayState

__all__ = ["StateDep", "CurrentKey", "AdminDep"]


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway


StateDep = Annotated[GatewayState, Depends(_state)]


async def _current_key(state: StateDep,
                       authorization: Annotated[str | None, Header()] = None) -> ApiKey | None:
    return await state.authenticate(authorization)


async def _admin(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> None:
    state.check_admin(authorization)


CurrentKey = Annotated[ApiKey | None, Depends(_current_key)]
AdminDep = Annotated[None, Depends(_admin)]
