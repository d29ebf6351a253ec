"""The ``quiver`` command line: JSON output, exit codes, and the Hugging Face folder bridge."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from quiver.client.cli import app
from tests.conftest import free_port

runner = CliRunner()


def quiver(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def out_json(result) -> dict | list:
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def cli_env(registry, monkeypatch):
    monkeypatch.setenv("QUIVER_REGISTRY_URL", registry["url"])
    monkeypatch.setenv("QUIVER_TOKEN", registry["token"])
    return registry


def test_cli_push_pull_ls_show_alias_rm(cli_env, tiny_base, lora_adapter, tmp_path):
    examples = tmp_path / "ex.csv"
    examples.write_text("text\nsummarise this\ntranslate that\n")
    r = quiver("push", str(lora_adapter), "cli/demo", "--base-model", tiny_base,
               "--examples", str(examples), "--description", "from the cli", "--label",
               "team=nlp", "--alias", "prod", "--task-description", "demo", "--progress")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "cli/demo/1"
    r = quiver("push", str(lora_adapter), "cli/demo", "--base-model", tiny_base, "--json",
               "--parent", "cli/demo/1")
    pushed = out_json(r)
    assert pushed["ref"] == "cli/demo/2" and pushed["parent"] == "cli/demo/1"

    r = quiver("pull", "cli/demo@prod", "-o", str(tmp_path / "out"), "--progress")
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / "out")
    r = quiver("pull", "cli/demo@prod", "-o", str(tmp_path / "out"), "--json")
    assert r.exit_code == 0 and out_json(r)["ref"] == "cli/demo/1"
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
        (lora_adapter / "adapter_model.safetensors").read_bytes()

    shown = out_json(quiver("show", "cli/demo/1", "--json"))
    assert shown["examples"] == ["summarise this", "translate that"]
    assert shown["labels"] == {"team": "nlp"} and shown["aliases"] == ["prod"]
    assert "cli/demo/1" in quiver("show", "cli/demo/1").stdout

    assert {v["ref"] for v in out_json(quiver("ls", "cli/demo", "--json"))} == \
        {"cli/demo/1", "cli/demo/2"}
    assert "cli/demo" in {x["name"] for x in out_json(quiver("ls", "--json"))}
    assert out_json(quiver("alias", "set", "cli/demo", "prod", "2", "--json"))["version"] == 2
    assert out_json(quiver("pull", "cli/demo@prod", "--json"))["ref"] == "cli/demo/2"
    assert quiver("rm", "cli/demo/1", "--yes").exit_code == 0
    assert quiver("show", "cli/demo/1").exit_code == 3


def test_cli_exit_codes(cli_env, tiny_base, tiny_llama, lora_adapter, tmp_path, monkeypatch):
    r = quiver("show", "cli/nothing-here", "--json")
    assert r.exit_code == 3 and out_json(r)["error"]["code"] == "repo_not_found"
    assert quiver("show", "Bad Ref!").exit_code == 2
    assert quiver("push", str(lora_adapter), "cli/x", "--base-model", tiny_base,
                  "--label", "novalue").exit_code == 2
    assert quiver("push", str(lora_adapter), "cli/x", "--base-model", "no-such-base").exit_code == 3

    cfg = tmp_path / "wide.json"
    cfg.write_text(json.dumps({**json.loads((tiny_llama / "config.json").read_text()),
                               "hidden_size": 96}))
    assert quiver("base", "add", str(cfg), "--name", "cli-wide").exit_code == 0
    r = quiver("push", str(lora_adapter), "cli/x", "--base-model", "cli-wide", "--json")
    assert r.exit_code == 5 and out_json(r)["error"]["code"] == "incompatible_adapter"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "hidden_size": 128}))
    r = quiver("base", "add", str(cfg), "--name", "cli-wide", "--json")
    assert r.exit_code == 6 and out_json(r)["error"]["code"] == "conflict"

    monkeypatch.setenv("QUIVER_TOKEN", "not-a-token")
    assert quiver("push", str(lora_adapter), "cli/x", "--base-model", tiny_base).exit_code == 4
    monkeypatch.delenv("QUIVER_TOKEN")
    assert quiver("rm", "cli/x", "--yes").exit_code == 4
    r = quiver("--registry", f"http://127.0.0.1:{free_port()}", "ls", "--json")
    assert r.exit_code == 7 and out_json(r)["error"]["code"] == "registry_unavailable"


def test_login_whoami_logout(cli_env, monkeypatch, client_env):
    monkeypatch.delenv("QUIVER_TOKEN")
    assert quiver("whoami").exit_code == 4
    r = quiver("login", "--token", cli_env["token"], "--json")
    assert r.exit_code == 0, r.output
    cfg = client_env / "config" / "config.json"
    assert json.loads(cfg.read_text())["token"] == cli_env["token"]
    assert (cfg.stat().st_mode & 0o777) == 0o600
    assert out_json(quiver("whoami", "--json"))["scopes"]
    assert quiver("login", "--token", "wrong").exit_code == 4
    assert quiver("logout").exit_code == 0
    assert quiver("whoami").exit_code == 4


def test_import_hf_and_export_hf_round_trip_loads_in_peft(cli_env, tiny_base, tiny_llama,
                                                          lora_adapter, tmp_path):
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # A Hub-style cache entry, read offline: models--org--name/{refs/main, snapshots/<sha>/}.
    hf_cache = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = hf_cache / "models--someorg--tiny-lora" / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(lora_adapter / name, snap / name)
    (snap / "README.md").write_text("---\nbase_model: tiny-llama\n---\n# Tiny\n\nSays hi.\n")
    (hf_cache / "models--someorg--tiny-lora" / "refs").mkdir()
    (hf_cache / "models--someorg--tiny-lora" / "refs" / "main").write_text(commit)

    r = quiver("import-hf", "someorg/tiny-lora", "--hf-cache-dir", str(hf_cache), "--json")
    assert r.exit_code == 0, r.output
    imported = out_json(r)
    assert imported["ref"] == "someorg/tiny-lora/1" and imported["base_model"] == "tiny-llama"
    assert imported["description"] == "Says hi." and imported["labels"]["source"].startswith("hf:")
    r = quiver("import-hf", str(lora_adapter), "--repo", "local/lora", "--base-model", tiny_base)
    assert r.exit_code == 0 and r.stdout.strip() == "local/lora/1"
    assert quiver("import-hf", "someorg/not-cached", "--hf-cache-dir", str(hf_cache)).exit_code == 3

    out = tmp_path / "exported"
    assert quiver("export-hf", "someorg/tiny-lora/1", "-o", str(out)).exit_code == 0
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json",
                                               "adapter_model.safetensors", "README.md"}
    assert "base_model: tiny-llama" in (out / "README.md").read_text()

    ids = torch.tensor([[1, 5, 9, 12, 40]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        plain = base(ids).logits
        want = PeftModel.from_pretrained(base, lora_adapter).eval()(ids).logits
    base2 = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base2, out).eval()(ids).logits
    assert torch.allclose(got, want) and not torch.allclose(got, plain)


def test_console_script_starts_fast_without_torch():
    code = ("import sys, quiver.client.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub', 'peft') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    r = subprocess.run([sys.executable, "-m", "quiver.client.cli", "--help"],
                       capture_output=True, text=True)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "Exit codes" in text and "7 registry unavailable" in text

