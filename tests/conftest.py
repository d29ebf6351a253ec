"""Shared fixtures: real PostgreSQL, Redis and an S3 server (moto) on loopback, tiny models.

A missing service is reported loudly. Under ``CI=true`` it fails the test instead of skipping it,
so CI can never pass by skipping what it should have run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("QUIVER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_TEST_URL = os.environ.get("QUIVER_TEST_REDIS", "redis://127.0.0.1:6379/9")
IN_CI = os.environ.get("CI", "").lower() == "true"


def service_missing(name: str, why: str) -> None:
    msg = f"*** {name} is not reachable ({why}); tests that need it cannot run ***"
    print("\n" + msg, file=sys.stderr)
    if IN_CI:
        pytest.fail(msg + " (CI=true: this is a failure, not a skip)", pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class ServerThread:
    """An ASGI app served by uvicorn on a free loopback port in a daemon thread."""

    def __init__(self, app, timeout: float = 30.0) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)


# --- PostgreSQL -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def _pg_admin():
    try:
        import psycopg

        conn = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001 - any failure means the service is missing
        service_missing("PostgreSQL", f"{PG_ADMIN_URL}: {exc}")
    yield conn
    conn.close()


@pytest.fixture
def make_postgres_db(_pg_admin):
    """Factory: a fresh, empty PostgreSQL database; returns its SQLAlchemy URL. Dropped after."""
    created: list[str] = []

    def make() -> str:
        name = f"quiver_t_{uuid.uuid4().hex[:12]}"
        _pg_admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        return f"{base}/{name}"

    yield make
    for name in created:
        _pg_admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(make_postgres_db) -> str:
    return make_postgres_db()


# --- Redis ----------------------------------------------------------------------------------

@pytest.fixture
def redis_url() -> str:
    try:
        import redis

        r = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2)
        r.ping()
    except Exception as exc:  # noqa: BLE001
        service_missing("Redis", f"{REDIS_TEST_URL}: {exc}")
    r.flushdb()
    yield REDIS_TEST_URL
    r.flushdb()
    r.close()


# --- S3 (moto's server mode as the protocol peer) ------------------------------------------------

@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback; yields (endpoint 'host:port', access key, secret key)."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).exists():
        service_missing("moto_server", "the moto[server] package is not installed")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
    except TimeoutError as exc:
        proc.kill()
        service_missing("moto_server", str(exc))
    yield {"endpoint": f"127.0.0.1:{port}", "access_key": "testing", "secret_key": "testing",
           "region": "us-east-1"}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; returns the s3_server dict plus 'bucket'."""
    return {**s3_server, "bucket": f"quiver-{uuid.uuid4().hex[:10]}"}


# --- tiny models and real PEFT adapters ----------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint folder (config.json + model.safetensors)."""
    from tests._models import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny-llama"), family="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    from tests._models import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny-qwen2"), family="qwen2")


@pytest.fixture(scope="session")
def lora_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A rank-8 PEFT LoRA adapter for ``tiny_llama`` on q/k/v/o, made by the real peft library."""
    from tests._models import make_peft_adapter

    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("lora"), r=8,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], seed=1)
