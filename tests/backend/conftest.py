"""Fixtures for the backend: a tiny chat model, real PEFT adapters in a real registry process,
one engine for the session and backend servers on loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, wait_for_port

BASE = "tiny-chat"
OTHER_BASE = "tiny-other"
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def _write_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer of 300 tokens (ids 0-2 special), saved next to the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, how are you?",
              "quiver serves many adapters on one base model"] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> Path:
    from tests._models import make_tiny_base

    out = make_tiny_base(tmp_path_factory.mktemp("tiny-chat"), family="llama", vocab_size=300,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    _write_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def other_model(tmp_path_factory) -> Path:
    from tests._models import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny-other"), family="llama",
                          hidden_size=32, intermediate_size=64, vocab_size=300)


def _variant(src: Path, out: Path, seed: int) -> Path:
    """Another real adapter of the same shape: ``src`` with fresh random LoRA weights."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    fresh = {k: (torch.randn(v.shape, generator=gen) * 0.3).to(v.dtype).contiguous()
             for k, v in tensors.items()}
    save_file(fresh, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return out


@pytest.fixture(scope="session")
def adapter_dirs(chat_model, other_model, tmp_path_factory) -> dict[str, Path]:
    """``a0`` … ``a7`` (rank 8 on q/k/v/o), ``big`` (rank 128: over the engine's max_rank),
    ``other`` (for a different base model)."""
    from tests._models import make_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    first = make_peft_adapter(chat_model, root / "a0", r=8, seed=1, init_scale=0.3,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    out = {"a0": first}
    for i in range(1, 8):
        out[f"a{i}"] = _variant(first, root / f"a{i}", seed=100 + i)
    out["big"] = make_peft_adapter(chat_model, root / "big", r=128, seed=2,
                                   target_modules=["q_proj", "v_proj"])
    out["other"] = make_peft_adapter(other_model, root / "other", r=8, seed=3,
                                     target_modules=["q_proj", "v_proj"])
    return out


@dataclass
class RegistryProcess:
    """A real registry (``python -m quiver.registry``) on a loopback port."""

    data_dir: Path
    redis_url: str | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RegistryProcess:
        env = {**os.environ, "QUIVER_ANONYMOUS_READ": "true", "QUIVER_ADMIN_TOKEN": "admin-t"}
        env.pop("QUIVER_REDIS_URL", None)
        if self.redis_url:
            env["QUIVER_REDIS_URL"] = self.redis_url
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quiver.registry", "--host", "127.0.0.1", "--port",
             str(self.port), "--data-dir", str(self.data_dir)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("registry did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self):
        from quiver.client import Client

        return Client(self.url, "admin-t", cache_dir=self.data_dir.parent / "client-cache")


def _seed_registry(reg: RegistryProcess, chat_model: Path, other_model: Path,
                   adapter_dirs: dict[str, Path]) -> dict[str, Any]:
    with reg.client() as c:
        c.add_base_model(json.loads((chat_model / "config.json").read_text()), BASE)
        c.add_base_model(json.loads((other_model / "config.json").read_text()), OTHER_BASE)
        infos = {}
        for name in [f"a{i}" for i in range(8)] + ["big"]:
            infos[name] = c.push(adapter_dirs[name], f"team/{name}", base_model=BASE)
        infos["other"] = c.push(adapter_dirs["other"], "team/other", base_model=OTHER_BASE)
        # A repo with two versions and an alias, for alias moves.
        infos["moving1"] = c.push(adapter_dirs["a1"], "team/moving", base_model=BASE)
        infos["moving2"] = c.push(adapter_dirs["a2"], "team/moving", base_model=BASE)
        c.set_alias("team/moving", "prod", 1)
    return infos


@pytest.fixture(scope="session")
def registry(tmp_path_factory, chat_model, other_model, adapter_dirs):
    """A registry process seeded with base models and adapters; yields (process, infos)."""
    reg = RegistryProcess(tmp_path_factory.mktemp("registry") / "data").start()
    try:
        infos = _seed_registry(reg, chat_model, other_model, adapter_dirs)
        yield reg, infos
    finally:
        reg.stop()


@pytest.fixture
def fresh_registry(tmp_path, chat_model, other_model, adapter_dirs):
    """A registry of the test's own (for tests that stop it or move its aliases)."""
    reg = RegistryProcess(tmp_path / "registry-data").start()
    try:
        infos = _seed_registry(reg, chat_model, other_model, adapter_dirs)
        yield reg, infos
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def engine(chat_model):
    from quiver.backend.engine import Engine, EngineConfig

    return Engine(EngineConfig(model_dir=chat_model, device="cpu", dtype="float32", max_slots=4,
                               max_rank=64, max_running=16, max_batch_tokens=512,
                               kv_cache_tokens=8192, max_context=256))


class ServerThread:
    """A backend app served by uvicorn in a thread of this process."""

    def __init__(self, app, port: int) -> None:
        import uvicorn

        from quiver.backend.server import BackendServer

        self.app = app
        self.port = port
        self.server = BackendServer(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                   log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def runtime(self):
        return self.app.state.runtime

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("backend server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def make_backend(engine, chat_model, tmp_path):
    """Factory: start a backend for ``registry_url`` with setting overrides; stopped after.
    The engine is shared, so only one backend may run at a time."""
    from quiver.backend.app import create_app
    from quiver.backend.settings import BackendSettings

    started: list[ServerThread] = []

    def make(registry_url: str, **overrides: Any) -> ServerThread:
        assert not any(s.thread.is_alive() for s in started), "stop the previous backend first"
        port = free_port()
        values = dict(model_dir=chat_model, base_model_name=BASE, registry_url=registry_url,
                      host="127.0.0.1", port=port, backend_id=f"test-{port}",
                      disk_cache_dir=tmp_path / f"cache-{port}", max_slots=4,
                      heartbeat_interval=0.2, drain_timeout=5.0, redis_url=None)
        values.update(overrides)
        settings = BackendSettings(**values)
        server = ServerThread(create_app(settings, engine), port).start()
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()
