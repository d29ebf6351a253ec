"""Fixtures for the registry: an in-process app over httpx, parametrised by database and store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.registry._util import RegistryHarness, make_settings, register_base


@pytest.fixture
def harness_factory(tmp_path) -> Callable[..., RegistryHarness]:
    def make(**kw: Any) -> RegistryHarness:
        return RegistryHarness(make_settings(tmp_path, **kw))

    return make


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str | None:
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=["local", "s3"])
def store_kw(request) -> dict[str, Any]:
    if request.param == "local":
        return {}
    return {"s3": request.getfixturevalue("s3_bucket")}


@pytest.fixture
async def reg(harness_factory, tiny_llama) -> AsyncIterator[RegistryHarness]:
    """A registry on SQLite and the local store, with the tiny Llama registered."""
    async with harness_factory() as h:
        await register_base(h.client, tiny_llama)
        yield h


