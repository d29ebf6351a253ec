"""``quiver up``: a local Quiver on embedded defaults, checked by a round trip.

Starts the registry as a child process on a free port with its data under ``--data-dir``,
registers a tiny Llama-shaped base model, builds a small LoRA adapter for it (numpy and
safetensors only), pushes it, pulls it back through the verified cache, prints what happened,
then exits (``--once``) or keeps the registry serving until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
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


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def run_up(*, data_dir: Path, host: str = "127.0.0.1", port: int = 0, once: bool = False,
           as_json: bool = False) -> dict[str, Any]:
    from quiver.client import Client

    data_dir = Path(data_dir).resolve()
    token = secrets.token_urlsafe(24)
    proc, url = start_registry(data_dir / "registry", host, port, admin_token=token)
    report: dict[str, Any] = {"registry_url": url, "data_dir": str(data_dir),
                              "admin_token": token}
    say = (lambda msg: None) if as_json else print
    try:
        say(f"registry listening on {url} (data in {data_dir / 'registry'})")
        say(f"admin token for this run: {token}")
        with Client(url, token, cache_dir=data_dir / "cache") as client, \
                tempfile.TemporaryDirectory(prefix="quiver-up-") as tmp:
            base = client.add_base_model(TINY_BASE_CONFIG, "quiver-demo/tiny-llama")
            say(f"base model {base.name}: {base.architecture}, {base.num_layers} layers")
            adapter = write_demo_adapter(Path(tmp) / "adapter")
            t0 = time.perf_counter()
            info = client.push(adapter, "demo/hello", base_model=base.name,
                               description="a tiny demo adapter", aliases=["prod"],
                               examples=["say hello", "greet the user"])
            push_ms = (time.perf_counter() - t0) * 1000
            say(f"pushed {info.ref} ({info.size_bytes} bytes, revision {info.revision[:12]}) "
                f"in {push_ms:.0f} ms")
            t0 = time.perf_counter()
            path = client.pull("demo/hello@prod")
            pull_ms = (time.perf_counter() - t0) * 1000
            same = all((path / f.path).read_bytes() == (adapter / f.path).read_bytes()
                       for f in info.files if (adapter / f.path).exists())
            say(f"pulled demo/hello@prod into {path} in {pull_ms:.0f} ms; "
                f"files identical: {same}")
            report.update(base_model=base.name, pushed=info.ref, revision=info.revision,
                          pulled_to=str(path), identical=same, push_ms=round(push_ms, 1),
                          pull_ms=round(pull_ms, 1))
        if as_json:
            print(json.dumps(report))
        if not once:
            say("serving; Ctrl-C to stop")
            signal.signal(signal.SIGTERM, _interrupt)
            try:
                proc.wait()
            except KeyboardInterrupt:
                pass
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return report
