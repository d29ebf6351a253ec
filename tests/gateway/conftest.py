"""Fixtures: real stand-in backends, registry and router processes, and real gateway processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
BASE = "tiny-llama"
OTHER_BASE = "tiny-qwen2"


@dataclass
class Proc:
    url: str
    port: int
    proc: subprocess.Popen
    name: str = ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/stats", timeout=5).json()


def _spawn(args: list[str], env: dict[str, str] | None = None, name: str = "") -> Proc:
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, *args, "--port", str(port)], cwd=ROOT, env=full_env,
                            stdout=subprocess.DEVNULL, stderr=None)
    try:
        wait_for_port(port, timeout=30)
    except TimeoutError:
        proc.kill()
        raise
    return Proc(url=f"http://127.0.0.1:{port}", port=port, proc=proc, name=name)


class Spawner:
    """Starts processes on free ports and stops every one of them at the end."""

    def __init__(self) -> None:
        self.started: list[Proc] = []

    def __call__(self, args: list[str], env: dict[str, str] | None = None,
                 name: str = "") -> Proc:
        p = _spawn(args, env, name)
        self.started.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.started:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in self.started:
            try:
                p.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.proc.kill()


@pytest.fixture
def spawn():
    """Factory starting a process on a free port; every one is stopped after the test."""
    spawner = Spawner()
    yield spawner
    spawner.stop_all()


@pytest.fixture(scope="module")
def module_spawn():
    """Like ``spawn``, for processes a whole test module shares."""
    spawner = Spawner()
    yield spawner
    spawner.stop_all()


def start_backend(spawn: Spawner, backend_id: str, base_model: str = BASE,
                  **options: Any) -> Proc:
    args = ["-m", "tests.gateway.standin", "backend", "--id", backend_id,
            "--base-model", base_model]
    for k, v in options.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return spawn(args, name=backend_id)


@pytest.fixture
def backend(spawn):
    """Factory: ``backend(id, base_model=..., delay=..., chunk_delay=..., tokens=..., ...)``."""
    return lambda backend_id, base_model=BASE, **options: start_backend(
        spawn, backend_id, base_model, **options)


def _version(repo: str, n: int, base: str, aliases: list[str] | None = None) -> dict[str, Any]:
    return {"repo": repo, "version": n, "ref": f"{repo}/{n}", "revision": f"{n:040x}",
            "status": "ready", "base_model": base, "aliases": aliases or [],
            "created_at": "2026-01-01T00:00:00Z"}


def _base(name: str, family: str) -> dict[str, Any]:
    return {"name": name, "architecture": "LlamaForCausalLM", "family": family,
            "hidden_size": 64, "intermediate_size": 160, "num_layers": 2, "num_heads": 4,
            "num_kv_heads": 2, "head_dim": 16, "vocab_size": 256}


def start_registry(spawn: Spawner, folder: Path, redis_url: str | None = None) -> Proc:
    """A stand-in registry holding acme/support 1 (@prod) and 2, acme/legal 1, other/bot 1 and
    qwen-helper 1 (on the other base model)."""
    data = {"base_models": [_base(BASE, "llama"), _base(OTHER_BASE, "qwen2")],
            "versions": [_version("acme/support", 1, BASE, ["prod"]),
                         _version("acme/support", 2, BASE),
                         _version("acme/legal", 1, BASE),
                         _version("other/bot", 1, BASE),
                         _version("qwen-helper", 1, OTHER_BASE)]}
    path = folder / "registry.json"
    path.write_text(json.dumps(data))
    args = ["-m", "tests.gateway.standin", "registry", "--data", str(path)]
    if redis_url:
        args += ["--redis-url", redis_url]
    return spawn(args, name="registry")


@pytest.fixture
def registry(spawn, tmp_path):
    return lambda redis_url=None: start_registry(spawn, tmp_path, redis_url)


def start_gateway(spawn: Spawner, backends: list[Proc] | None = None,
                  registry: Proc | None = None, router: Proc | None = None,
                  env: dict[str, str] | None = None, wait_ready: bool = True) -> Proc:
    """A real gateway process; waits until it sees a backend unless told not to."""
    args = ["-m", "quiver.gateway"]
    for b in backends or []:
        args += ["--backend", b.url]
    if registry:
        args += ["--registry", registry.url]
    if router:
        args += ["--router", router.url]
    gw_env = {"QUIVER_POLL_INTERVAL_S": "0.2", "QUIVER_LOG_LEVEL": "WARNING", **(env or {})}
    gw = spawn(args, env=gw_env, name="gateway")
    if wait_ready:
        deadline = time.monotonic() + 20
        while httpx.get(f"{gw.url}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "gateway never became ready"
            time.sleep(0.1)
    return gw


@pytest.fixture
def gateway(spawn):
    return lambda *args, **kwargs: start_gateway(spawn, *args, **kwargs)


def metric(gw: Proc, name: str, **labels: str) -> float:
    """The value of one Prometheus sample on the gateway's /metrics (0 when absent)."""
    text = httpx.get(f"{gw.url}/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        if sample == name and all(f'{k}="{v}"' in rest for k, v in labels.items()) \
                and (want or not rest):
            return float(value)
    return 0.0
