"""The shipped demo through a live backend: adapters pulled from a registry on first use change
the answers exactly as the demo says they do (base copies, ``shout`` upper-cases, ...)."""

from __future__ import annotations

import json

import openai
import pytest

from quiver.backend.demo import ASSETS, TASKS, load_demo, render_prompt
from tests.backend.conftest import RegistryProcess, ServerThread
from tests.conftest import free_port

pytestmark = pytest.mark.slow

PROBE = "Please shout this: hello world"


@pytest.fixture(scope="module")
def demo():
    assert (ASSETS / "manifest.json").exists(), "the demo's shipped files are missing"
    return load_demo(ASSETS)


def test_demo_adapters_through_the_backend(demo, tmp_path):
    from quiver.backend.app import create_app
    from quiver.backend.engine import Engine, EngineConfig
    from quiver.backend.settings import BackendSettings

    reg = RegistryProcess(tmp_path / "registry").start()
    server = None
    try:
        with reg.client() as c:
            c.add_base_model(json.loads((demo.base_dir / "config.json").read_text()),
                             demo.base_model)
            for a in demo.adapters:
                c.push(a.dir, a.repo, base_model=demo.base_model)
        engine = Engine(EngineConfig(model_dir=demo.base_dir, device="cpu", dtype="float32",
                                     max_slots=2, max_rank=64, max_running=8,
                                     kv_cache_tokens=4096))
        port = free_port()
        settings = BackendSettings(model_dir=demo.base_dir, base_model_name=demo.base_model,
                                   registry_url=reg.url, port=port, backend_id="demo",
                                   disk_cache_dir=tmp_path / "cache", max_slots=2,
                                   redis_url=None)
        server = ServerThread(create_app(settings, engine), port).start()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

        def complete(model: str) -> str:
            out = client.completions.create(model=model, prompt=render_prompt(PROBE),
                                            max_tokens=40, temperature=0)
            return out.choices[0].text

        answers = {"base": complete(demo.base_model)}
        for a in demo.adapters:                  # more adapters than slots: evictions too
            answers[a.name] = complete(a.repo)
        assert answers["base"] == "hello world"
        for a in demo.adapters:
            assert answers[a.name] == TASKS[a.name].answer("hello world"), answers
        first = demo.adapters[0]
        chat = client.chat.completions.create(
            model=first.repo, max_tokens=40, temperature=0,
            messages=[{"role": "user", "content": PROBE}])
        assert chat.choices[0].message.content == answers[first.name]
    finally:
        if server is not None:
            server.stop()
        reg.stop()
