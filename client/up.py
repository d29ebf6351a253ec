"""``quiver up``: the whole Quiver on one machine, on embedded defaults, with the demo routed.

:func:`run_up` starts the registry (SQLite, local blobs), a CPU backend serving the tiny demo
model, the router and the gateway as child processes (see :mod:`quiver.client.stack`), pushes
the demo adapters, routes a handful of prompts with ``model="auto"`` and prints a table; then
keeps serving until Ctrl-C, or exits with ``--once``.

The helpers kept here serve tests and benchmarks that need just a registry and a tiny adapter:
:func:`start_registry` and :func:`write_demo_adapter` (numpy and safetensors only).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["run_up", "TINY_BASE_CONFIG", "write_demo_adapter", "start_registry"]

TINY_BASE_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_demo_adapter(out: Path, config: dict[str, Any] = TINY_BASE_CONFIG, *, r: int = 4,
                       modules: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0) -> Path:
    """A PEFT-layout LoRA adapter for a Llama ``config`` (random weights, float32)."""
    import numpy as np
    from safetensors.numpy import save_file

    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    out_features = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for m in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((r, hidden)) * 0.05) \
                .astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out_features[m], r))
                                                  * 0.05).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
        "lora_dropout": 0.0, "target_modules": list(modules), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "base_model_name_or_path": "quiver-demo/tiny-llama"}, indent=2))
    return out


def start_registry(data_dir: Path, host: str, port: int, admin_token: str | None = None,
                   timeout: float = 30.0, extra_env: dict[str, str] | None = None
                   ) -> tuple[subprocess.Popen, str]:
    """Run ``quiver serve registry`` as a child process and wait until it answers.

    The child inherits this process's environment plus ``QUIVER_ADMIN_TOKEN`` and ``extra_env``.
    """
    import httpx

    port = port or _free_port(host)
    env = {**os.environ, **(extra_env or {})}
    if admin_token:
        env["QUIVER_ADMIN_TOKEN"] = admin_token
    proc = subprocess.Popen([sys.executable, "-m", "quiver.client.cli", "serve", "registry",
                             "--host", host, "--port", str(port), "--data-dir", str(data_dir)],
                            env=env)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the registry exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"the registry did not answer on {url} within {timeout:.0f}s")


def run_up(*, data_dir: Path, host: str = "127.0.0.1", port: int = 0, once: bool = False,
           as_json: bool = False, port_offset: int = 0, demo_dir: Path | None = None) -> None:
    """Run ``quiver up``; ``port`` (0: 8080 plus ``port_offset``, or a free one) is the gateway's.

    Exits the process with code 1 when a component cannot start (its log tail is printed).
    """
    from quiver.client.stack import StackError, run_demo

    try:
        code = run_demo(Path(data_dir), host=host, port_offset=port_offset, once=once,
                        as_json=as_json, demo_dir=demo_dir, gateway_port=port or None)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if code:
        raise SystemExit(code)
