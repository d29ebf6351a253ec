"""Fixtures for the client tests: an isolated config and cache, a blob server."""

from __future__ import annotations

import pytest

from tests.client._blobserver import start_blob_server


@pytest.fixture(autouse=True)
def client_env(tmp_path, monkeypatch):
    """Point the client's config file and cache into the test's temporary folder."""
    for name in ("QUIVER_TOKEN", "QUIVER_REGISTRY_URL", "QUIVER_PART_SIZE",
                 "QUIVER_PARALLEL_DOWNLOADS", "QUIVER_PARALLEL_THRESHOLD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QUIVER_CONFIG_FILE", str(tmp_path / "config" / "config.json"))
    monkeypatch.setenv("QUIVER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def blob_server():
    state, server = start_blob_server()
    yield state
    server.shutdown()
    server.server_close()


ADMIN_TOKEN = "admin-test-token-0123456789"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real registry (SQLite, local blobs, 64 KiB upload parts) served by uvicorn on loopback."""
    from quiver.registry.app import create_app
    from quiver.registry.settings import Settings
    from tests.conftest import ServerThread

    data = tmp_path_factory.mktemp("registry")
    settings = Settings(data_dir=data, admin_token=ADMIN_TOKEN, anonymous_read=True,
                        part_size=64 * 1024)
    server = ServerThread(create_app(settings))
    yield {"url": server.url, "token": ADMIN_TOKEN, "data_dir": data}
    server.stop()


@pytest.fixture(scope="module")
def tiny_base(registry, tiny_llama):
    """``tiny_llama`` registered as base model ``tiny-llama``."""
    from quiver.client import Client

    with Client(registry["url"], registry["token"], cache_dir=tiny_llama.parent / "c") as c:
        c.add_base_model(tiny_llama, "tiny-llama")
    return "tiny-llama"
