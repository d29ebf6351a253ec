"""The gateway against the real Quiver registry: resolution, listing and alias moves by event."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import BASE

pytestmark = [pytest.mark.services, pytest.mark.slow]
ADMIN = "qvr_gateway_test_admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def push(registry_url: str, repo: str, folder: Path, **meta) -> dict:
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream"))
             for p in sorted(folder.iterdir()) if p.is_file()]
    r = httpx.post(f"{registry_url}/api/v1/repos/{repo}/-/push", headers=AUTH, timeout=60,
                   data={"metadata": json.dumps({"base_model": BASE, **meta})}, files=files)
    assert r.status_code == 201, r.text
    return r.json()


def test_gateway_follows_the_real_registry(spawn, backend, gateway, tiny_llama, lora_adapter,
                                           redis_url, tmp_path):
    env = {"QUIVER_ADMIN_TOKEN": ADMIN, "QUIVER_REDIS_URL": redis_url}
    reg = spawn(["-m", "quiver.registry", "--data-dir", str(tmp_path / "registry")], env=env,
                name="registry")
    config = json.loads((tiny_llama / "config.json").read_text())
    r = httpx.post(f"{reg.url}/api/v1/base-models", json={"name": BASE, "config": config},
                   headers=AUTH, timeout=30)
    assert r.status_code in (200, 201), r.text
    v1 = push(reg.url, "team/helper", lora_adapter, aliases=["prod"])
    assert v1["ref"] == "team/helper/1"

    gw = gateway([backend("b1")], reg, env={"QUIVER_REDIS_URL": redis_url,
                                            "QUIVER_RESOLVE_TTL_S": "600"})
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    out = c.completions.create(model="team/helper@prod", prompt="x")
    assert out.choices[0].text.startswith("b1|team/helper/1|")
    assert {"team/helper/1", "team/helper@prod", BASE} <= {m.id for m in c.models.list()}
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="team/helper/7", prompt="x")

    v2 = push(reg.url, "team/helper", lora_adapter, description="second")
    assert v2["version"] == 2
    time.sleep(0.3)
    r = httpx.put(f"{reg.url}/api/v1/repos/team/helper/-/aliases/prod", json={"version": 2},
                  headers=AUTH)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 5
    while not c.completions.create(model="team/helper@prod",
                                   prompt="x").choices[0].text.startswith("b1|team/helper/2|"):
        assert time.monotonic() < deadline, "the alias move did not reach the gateway"
        time.sleep(0.05)
    latest = c.completions.create(model="team/helper", prompt="x")
    assert latest.choices[0].text.startswith("b1|team/helper/2|")
