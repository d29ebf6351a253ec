"""Helpers for registry tests: settings, an in-process harness, pushes and error checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from quiver.registry.app import create_app
from quiver.registry.settings import Settings

ADMIN = "qvr_test_admin_token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
BASE = "tiny-llama"


def make_settings(tmp_path: Path, *, database_url: str | None = None, s3: dict | None = None,
                  **overrides: Any) -> Settings:
    kw: dict[str, Any] = {"data_dir": tmp_path / "registry", "admin_token": ADMIN,
                          "database_url": database_url}
    if s3:
        kw.update(blob_store="s3", s3_endpoint=s3["endpoint"], s3_access_key=s3["access_key"],
                  s3_secret_key=s3["secret_key"], s3_bucket=s3["bucket"], s3_region=s3["region"])
    kw.update(overrides)
    return Settings(**kw)


class RegistryHarness:
    """An app running its lifespan in-process, and an httpx client bound to it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.client: httpx.AsyncClient

    async def __aenter__(self) -> RegistryHarness:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                        base_url="http://registry", timeout=60)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.aclose()
        await self._lifespan.__aexit__(None, None, None)

    @property
    def registry(self):
        return self.app.state.registry


async def register_base(client: httpx.AsyncClient, base_dir: Path, name: str = BASE) -> dict:
    config = json.loads((base_dir / "config.json").read_text())
    r = await client.post("/api/v1/base-models", json={"name": name, "config": config},
                          headers=AUTH)
    assert r.status_code in (200, 201), r.text
    return r.json()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


async def push_files(client: httpx.AsyncClient, repo: str, files: dict[str, bytes],
                     headers: dict[str, str] | None = None, **meta: Any) -> httpx.Response:
    metadata = {"base_model": BASE, **meta}
    multipart = [("files", (path, data, "application/octet-stream"))
                 for path, data in files.items()]
    return await client.post(f"/api/v1/repos/{repo}/-/push",
                             data={"metadata": json.dumps(metadata)}, files=multipart,
                             headers=AUTH if headers is None else headers)


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    assert r.headers["x-error-code"] == code
    assert body["error"]["message"]
    return body["error"]


class RegistryProcess:
    """A real registry (``python -m quiver.registry``) on a free loopback port."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        from tests.conftest import free_port

        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "QUIVER_ADMIN_TOKEN": ADMIN, **env}
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.parent / f"registry-{self.port}.log"

    def start(self) -> RegistryProcess:
        from tests.conftest import wait_for_port

        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "quiver.registry", "--host", "127.0.0.1", "--port",
                 str(self.port), "--data-dir", str(self.data_dir)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, timeout=30)
        except TimeoutError:
            self.stop()
            raise RuntimeError(self.log.read_text()) from None
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no cleanup, like a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
