"""Fixtures for the router tests: one loaded encoder per session, a real registry on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

ADMIN_TOKEN = "router-test-admin-token-0123456789"
BASE = "tiny-llama"


@pytest.fixture(scope="session")
def encoder():
    """The bundled all-MiniLM-L6-v2, loaded once for the whole session."""
    from quiver.routing.encoder import Encoder

    return Encoder(cache_size=1000)


@pytest.fixture(autouse=True)
def _client_env(tmp_path, monkeypatch):
    for name in ("QUIVER_TOKEN", "QUIVER_REGISTRY_URL", "QUIVER_THRESHOLD", "QUIVER_FALLBACK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QUIVER_CONFIG_FILE", str(tmp_path / "config.json"))
    monkeypatch.setenv("QUIVER_CACHE_DIR", str(tmp_path / "client-cache"))


def start_registry(data_dir: Path, redis_url: str | None = None):
    """A real registry (SQLite, local blobs) served by uvicorn in a thread; returns (url, stop)."""
    from quiver.registry.app import create_app
    from quiver.registry.settings import Settings
    from tests.conftest import ServerThread

    settings = Settings(data_dir=data_dir, admin_token=ADMIN_TOKEN, anonymous_read=True,
                        redis_url=redis_url)
    server = ServerThread(create_app(settings))
    return server.url, server.stop


class Hub:
    """A registry with the tiny Llama registered, and a helper to push adapters with examples."""

    def __init__(self, url: str, adapter: Path, cache: Path) -> None:
        from quiver.client import Client

        self.url = url
        self.token = ADMIN_TOKEN
        self.adapter = adapter
        self.client = Client(url, ADMIN_TOKEN, cache_dir=cache)

    def push(self, repo: str, examples: list[str] | None = None,
             task_description: str | None = None, aliases: list[str] | None = None):
        return self.client.push(self.adapter, repo, base_model=BASE, examples=examples,
                                task_description=task_description, aliases=aliases)


@pytest.fixture
def hub(tmp_path, tiny_llama, lora_adapter):
    url, stop = start_registry(tmp_path / "registry")
    h = Hub(url, lora_adapter, tmp_path / "push-cache")
    h.client.add_base_model(tiny_llama, BASE)
    yield h
    h.client.close()
    stop()


@pytest.fixture
def hub_with_events(tmp_path, tiny_llama, lora_adapter, redis_url):
    url, stop = start_registry(tmp_path / "registry", redis_url=redis_url)
    h = Hub(url, lora_adapter, tmp_path / "push-cache")
    h.client.add_base_model(tiny_llama, BASE)
    h.redis_url = redis_url
    yield h
    h.client.close()
    stop()


MATH = ["Solve the equation 3x + 5 = 20", "What is the derivative of x squared?",
        "Compute the integral of sin(x) from 0 to pi", "Factor the polynomial x^2 - 9",
        "What is 17 times 23?", "Find the roots of x^2 + 2x - 8"]
COOKING = ["How long should I bake chocolate chip cookies?", "Give me a recipe for tomato soup",
           "How do I make fresh pasta dough?", "What spices go well with roasted chicken?",
           "How do I caramelize onions?", "What can I cook with rice and eggs?"]
TRANSLATE = ["Translate 'good morning' into French", "How do you say thank you in Japanese?",
             "Translate this sentence to Spanish: where is the station?",
             "What is the German word for apple?", "Translate 'I love you' to Italian",
             "How do I say goodbye in Portuguese?"]
