"""The supervisor behind ``quiver up`` and the e2e suite, on a real registry process."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from quiver.backend.demo import DemoAdapter
from quiver.client import Client
from quiver.client.stack import (DemoRow, Stack, StackError, demo_prompts, format_table,
                                 port_is_free, push_demo_adapters)

pytestmark = pytest.mark.slow

ADMIN = "qv_admin_stack_test_token"
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 4, "vocab_size": 100, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32"}


def _adapter(folder: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for m in ("q_proj", "v_proj"):
            p = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{p}.lora_A.weight"] = rng.standard_normal((4, 32)).astype(np.float32)
            tensors[f"{p}.lora_B.weight"] = rng.standard_normal((32, 4)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "lora_dropout": 0.0}))
    return folder


class _Demo:
    """The parts of DemoPaths that pushing needs."""

    def __init__(self, root: Path) -> None:
        self.base_model = "test/tiny-llama"
        self.base_dir = root / "base"
        self.base_dir.mkdir(parents=True)
        (self.base_dir / "config.json").write_text(json.dumps(CONFIG))
        self.adapters = [
            DemoAdapter(name=n, repo=f"demo/{n}", dir=_adapter(root / "adapters" / n, i),
                        task_description=f"does {n}", examples=[f"{n} this: a", f"{n} it: b"],
                        test_pairs=[(f"{n} this: hello", n.upper()), (f"{n} it: x", "X")])
            for i, n in enumerate(("up", "down"))]
        self.base_test_pairs = [("tell me something: sky", "sky")]


@pytest.fixture
def registry_stack(tmp_path):
    stack = Stack(tmp_path / "data", env={"QUIVER_ADMIN_TOKEN": ADMIN},
                  inherit_quiver_env=False, stop_timeout=10)
    stack.start("registry", ["registry", "--data-dir", str(tmp_path / "data" / "registry")],
                ready_path="/api/v1/health", timeout=60)
    yield stack
    stack.stop_all()


def test_push_skips_what_the_registry_already_holds(registry_stack, tmp_path):
    demo = _Demo(tmp_path / "demo")
    url = registry_stack.url("registry")
    with Client(url, ADMIN) as client:
        assert push_demo_adapters(client, demo, log=lambda m: None) == ["demo/up/1", "demo/down/1"]
        assert client.resolve("demo/up@prod").examples
        assert push_demo_adapters(client, demo, log=lambda m: None) == []
        _adapter(demo.adapters[1].dir, 99)  # the local files change: only that one is pushed
        assert push_demo_adapters(client, demo, log=lambda m: None) == ["demo/down/2"]
        assert client.resolve("demo/down@prod").version == 2


def test_restart_keeps_data_and_port_and_kill_is_immediate(registry_stack, tmp_path):
    demo = _Demo(tmp_path / "demo")
    comp = registry_stack.components["registry"]
    with Client(comp.url, ADMIN) as client:
        push_demo_adapters(client, demo, log=lambda m: None)
    port, first_pid = comp.port, comp.proc.pid
    registry_stack.restart("registry")
    assert comp.port == port and comp.proc.pid != first_pid and comp.restarts == 1
    with Client(comp.url, ADMIN) as client:
        assert [v.ref for v in client.list_versions("demo/up")] == ["demo/up/1"]
    registry_stack.kill("registry")
    assert comp.proc.returncode == -signal.SIGKILL
    with pytest.raises(StackError, match="registry exited"):
        registry_stack.check_alive()
    registry_stack.restart("registry")
    assert httpx.get(comp.url + "/api/v1/health").status_code == 200
    registry_stack.stop("registry")
    assert not comp.alive and port_is_free(port)
    assert "start" in comp.log_path.read_text()


def test_a_component_that_cannot_start_is_reported_with_its_log(tmp_path):
    with Stack(tmp_path, inherit_quiver_env=False) as stack:
        with pytest.raises(StackError, match="backend exited") as err:
            stack.start("backend", ["backend", "--model", str(tmp_path / "missing")],
                        ready_path="/ready", timeout=60)
        assert str(stack.components["backend"].log_path) in str(err.value)


def test_table_and_prompts(tmp_path):
    demo = _Demo(tmp_path)
    prompts = demo_prompts(demo, per_adapter=1)
    assert prompts == [("up this: hello", "demo/up", "UP"), ("down this: hello", "demo/down",
                                                             "DOWN"),
                       ("tell me something: sky", None, "sky")]
    table = format_table([DemoRow("up this: hello", "demo/up/1", 0.93, "UP"),
                          DemoRow("tell me something: sky", "(base)", None, "sky")])
    lines = table.splitlines()
    assert lines[0].split("|")[0].strip() == "prompt" and len({len(l) for l in lines}) == 1
    assert "0.93" in lines[2] and lines[3].split("|")[2].strip() == "-"
