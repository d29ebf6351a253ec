"""Backend adapter residency: cold-adapter latency, slot moves, and 1,000 adapters cycling.

Three measurements, each against its peer in the same run:

1. Cold time to first token. A registry process on loopback and a backend (in this process)
   serve a 58M-parameter Llama shape (hidden 512, 8 layers, random weights) with rank-16
   adapters on all seven projections. Cold TTFT (adapter in no tier: resolve, pull, verify,
   validate, prepare, slot) minus warm TTFT (adapter in a slot) is compared with the raw
   transfer time of the adapter's bytes (plain HTTP GETs of its blobs) and with PEFT loading
   the same adapter from local disk (``PeftModel.load_adapter``).
   Target: overhead <= 1.5 x raw transfer + 20 ms.
2. Slot move. A host-cached rank-16 adapter for a Llama-3-8B shape (bf16, 84 MB) copied into
   an engine slot, against one flat copy of the same bytes (the memory-bandwidth floor).
   Target on a GPU (--device cuda): < 5 ms.
3. Cycling. N distinct adapters (1,000; 200 with --quick) through 32 slots with a host cache
   and a disk cache smaller than N, under concurrent requests: errors, and process memory
   (RSS, and GPU memory on CUDA) after warm-up versus at the end.

    python bench/backend_adapters.py [--quick] [--json] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = "bench-llama-58m"
BASE_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=512,
                   intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512,
                   rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                   hidden_act="silu", bos_token_id=0, eos_token_id=1, torch_dtype="float32")
LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- fixtures: a model folder, PEFT adapters, a registry process ----------------------------------

def write_model(out: Path) -> Path:
    """config.json (weights are drawn at random by the engine) and a small BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(BASE_CONFIG))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 8,
                            trainers.BpeTrainer(vocab_size=300,
                                                special_tokens=["<s>", "</s>", "<pad>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel
                                                .alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
    return out


def write_adapter(out: Path, *, rank: int, modules: list[str], seed: int,
                  cfg: dict[str, Any] = BASE_CONFIG) -> Path:
    """A PEFT LoRA folder in PEFT's own file layout and tensor names."""
    import torch
    from safetensors.torch import save_file

    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg[
        "num_attention_heads"])
    hd = h // heads
    dims = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
            "o_proj": (heads * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in modules:
            d_in, d_out = dims[m]
            part = "self_attn" if m in MODULES[:4] else "mlp"
            stem = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.02
            tensors[f"{stem}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": BASE, "r": rank, "lora_alpha": 2 * rank,
        "target_modules": modules, "lora_dropout": 0.0, "bias": "none",
        "task_type": "CAUSAL_LM", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None}))
    return out


class Registry:
    def __init__(self, data: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "QUIVER_ANONYMOUS_READ": "true", "QUIVER_ADMIN_TOKEN": "bench"}
        env.pop("QUIVER_REDIS_URL", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "quiver.registry", "--port",
                                      str(self.port), "--data-dir", str(data)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("registry did not start")

    def client(self, cache: Path):
        from quiver.client import Client

        return Client(self.url, "bench", cache_dir=cache)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Backend:
    """The backend app on uvicorn in a thread of this process."""

    def __init__(self, engine: Any, model_dir: Path, registry_url: str, cache: Path,
                 **overrides: Any) -> None:
        import uvicorn

        from quiver.backend.app import create_app
        from quiver.backend.settings import BackendSettings

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = BackendSettings(model_dir=model_dir, base_model_name=BASE,
                                   registry_url=registry_url, port=self.port,
                                   disk_cache_dir=cache, redis_url=None, log_level="WARNING",
                                   **overrides)
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings, engine),
                                                    host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# --- 1. cold vs warm time to first token ----------------------------------------------------------

def raw_transfer_ms(registry_url: str, info: Any, reps: int) -> float:
    """Median time to GET every blob of ``info`` over a fresh connection, bytes into memory."""
    times = []
    for _ in range(reps):
        # verify=False: plain HTTP needs no CA bundle, whose loading costs more than the GET.
        with httpx.Client(base_url=registry_url, verify=False) as c:
            t0 = time.perf_counter()
            for f in info.files:
                r = c.get(f"/api/v1/blobs/{f.sha256}")
                r.raise_for_status()
                assert len(r.content) == f.size
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def ttft_ms(http: httpx.Client, model: str) -> float:
    """Time to the first streamed token over ``http``'s kept-alive connection."""
    body = {"model": model, "prompt": "the quick brown fox", "max_tokens": 1,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: {r.status_code} {r.read()!r}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return (time.perf_counter() - t0) * 1000
    raise RuntimeError("no token")


def peft_load_ms(model_dir: Path, adapter_dirs: list[Path]) -> float:
    """PEFT's load of an adapter from local disk into a model of the same shape (median)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("cpu"):
        base = AutoModelForCausalLM.from_config(cfg)
    model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name="first")
    times = []
    for i, d in enumerate(adapter_dirs[1:]):
        t0 = time.perf_counter()
        model.load_adapter(str(d), adapter_name=f"a{i}")
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# --- 2. slot move for an 8B shape ---------------------------------------------------------------

def slot_move(device: str, reps: int) -> dict[str, float]:
    import torch

    from quiver.backend.engine.lora import LoraSlots, prepare_adapter
    from quiver.backend.engine.model import ModelArgs

    dev = torch.device(device)
    args = ModelArgs.from_config(LLAMA3_8B)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_adapter(Path(tmp) / "a", rank=16, modules=MODULES, seed=0,
                               cfg=LLAMA3_8B)
        from quiver.backend.engine import load_adapter_dir

        config, tensors = load_adapter_dir(folder)
    prepared = prepare_adapter(config, tensors, args, 16, torch.bfloat16,
                               pin=dev.type == "cuda")
    del tensors
    slots = LoraSlots(args, 2, 16, dev, torch.bfloat16)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    moves = []
    for i in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        slots.load(f"k{i}", prepared)
        sync()
        moves.append((time.perf_counter() - t0) * 1000)
        slots.unload(f"k{i}")
    nbytes = prepared.nbytes
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16)
    if dev.type == "cuda":
        src = src.pin_memory()
    dst = torch.empty_like(src, device=dev)
    flat = []
    for _ in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        flat.append((time.perf_counter() - t0) * 1000)
    return {"slot_move_ms": statistics.median(moves[2:]),
            "flat_copy_ms": statistics.median(flat[2:]), "adapter_mb": nbytes / 1e6}


# --- 3. many adapters through 32 slots ----------------------------------------------------------

async def cycle(url: str, models: list[str], concurrency: int,
                on_progress: Any) -> tuple[int, list[str]]:
    errors: list[str] = []
    done = 0
    queue: asyncio.Queue[str] = asyncio.Queue()
    for m in models:
        queue.put_nowait(m)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                m = queue.get_nowait()
                try:
                    r = await client.post(f"{url}/v1/completions", json={
                        "model": m, "prompt": "the quick brown fox", "max_tokens": 2,
                        "temperature": 0})
                    if r.status_code != 200:
                        errors.append(f"{m}: {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(f"{m}: {exc!r}")
                done += 1
                on_progress(done)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, errors


def _histogram(text: str, name: str, label: str) -> float:
    """The mean of a Prometheus histogram series in exposition ``text``."""
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_sum{{") and label in line:
            total = float(line.split()[-1])
        elif line.startswith(f"{name}_count{{") and label in line:
            count = float(line.split()[-1])
    return total / count if count else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--adapters", type=int, default=None, help="adapters to cycle")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT peer")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1 avoids spinning threads on a busy CPU)")
    ap.add_argument("--parts", default="cold,slot,cycle",
                    help="comma-separated subset of cold,slot,cycle")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, a.threads))
    parts = set(a.parts.split(","))
    n_cycle = (a.adapters or (200 if a.quick else 1000)) if "cycle" in parts else 0
    reps = 5 if a.quick else 9
    out: dict[str, Any] = {"device": a.device, "quick": a.quick, "threads": a.threads,
                           "load_average_1m": round(os.getloadavg()[0], 2)}

    from quiver.backend.engine import Engine, EngineConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        model_dir = write_model(tmp_p / "model")
        reg = Registry(tmp_p / "registry")
        try:
            with reg.client(tmp_p / "client-cache") as c:
                c.add_base_model(BASE_CONFIG, BASE)
                log("pushing cold-start adapters")
                cold_dirs = [write_adapter(tmp_p / f"cold{i}", rank=16, modules=MODULES,
                                           seed=i) for i in range(reps + 1)]
                cold = [c.push(d, f"bench/cold{i}", base_model=BASE)
                        for i, d in enumerate(cold_dirs)]
                log(f"pushing {n_cycle} small adapters")
                small_dir = tmp_p / "small"
                t0 = time.perf_counter()
                for i in range(n_cycle):
                    write_adapter(small_dir, rank=4, modules=["q_proj"], seed=1000 + i)
                    c.push(small_dir, f"bench/many-{i}", base_model=BASE)
                log(f"pushed in {time.perf_counter() - t0:.1f}s")
            engine = Engine(EngineConfig(model_dir=model_dir, device=a.device, dtype="float32"
                                         if a.device == "cpu" else "bfloat16", max_slots=32,
                                         max_rank=16, max_running=32, max_batch_tokens=1024,
                                         kv_cache_tokens=32 * 64, max_context=512,
                                         random_weights=True))
            if "cold" in parts:
                cold_part(a, out, engine, model_dir, reg, tmp_p, cold, cold_dirs, reps)
            if "slot" in parts:
                slot_part(a, out, reps)
            if "cycle" in parts:
                cycle_part(a, out, engine, model_dir, reg, tmp_p, n_cycle)
        finally:
            reg.stop()
    if not a.json:
        for k, v in out.items():
            print(f"{k:>34}: {v}")
    print(json.dumps(out))


def cold_part(a, out, engine, model_dir, reg, tmp_p, cold, cold_dirs, reps) -> None:
    one = cold[0].size_bytes
    backend = Backend(engine, model_dir, reg.url, tmp_p / "cache1")
    # One client for every timed request: a client per request would put its own set-up (a
    # CA bundle loaded, 17 ms here) into each time, and its teardown into the collector's next
    # pass, which the backend in this process then pays for mid-request.
    http = httpx.Client(base_url=backend.url)
    try:
        ttft_ms(http, BASE)
        raw = raw_transfer_ms(reg.url, cold[0], reps)
        gc.collect()
        colds, warms = [], []
        for info in cold[1:]:
            colds.append(ttft_ms(http, info.ref))
            warms.append(statistics.median(ttft_ms(http, info.ref) for _ in range(3)))
        load = _histogram(httpx.get(f"{backend.url}/metrics").text,
                          "quiver_backend_adapter_load_seconds", 'source="registry"')
    finally:
        http.close()
        backend.stop()
    overhead = statistics.median(c - w for c, w in zip(colds, warms))
    target = 1.5 * raw + 20.0
    out.update(adapter_bytes=one, raw_transfer_ms=round(raw, 2),
               cold_ttft_ms=round(statistics.median(colds), 2),
               warm_ttft_ms=round(statistics.median(warms), 2),
               cold_ttft_overhead_ms=round(overhead, 2),
               cold_adapter_load_ms=round(load * 1000, 2),
               cold_target_ms=round(target, 2),
               cold_overhead_vs_target=round(overhead / target, 3))
    log(f"cold overhead {overhead:.1f} ms vs target {target:.1f} ms "
        f"(raw transfer {raw:.1f} ms of {one / 1e6:.1f} MB)")
    if not a.no_peft:
        peft = peft_load_ms(model_dir, cold_dirs[:reps + 1])
        out.update(peft_local_load_ms=round(peft, 2),
                   cold_overhead_vs_peft_local_load=round(overhead / peft, 3))
        log(f"PEFT load_adapter from local disk {peft:.1f} ms")


def slot_part(a, out, reps) -> None:
    move = slot_move(a.device, reps)
    out.update({k: round(v, 3) for k, v in move.items()})
    out["slot_move_vs_flat_copy"] = round(move["slot_move_ms"] / move["flat_copy_ms"], 3)
    log(f"slot move {move['slot_move_ms']:.2f} ms vs flat copy "
        f"{move['flat_copy_ms']:.2f} ms ({move['adapter_mb']:.0f} MB, {a.device})")


def cycle_part(a, out, engine, model_dir, reg, tmp_p, n_cycle) -> None:
    import torch

    small = 8 * 4 * (512 + 512) * 4          # bytes of one cycled adapter's weights
    backend = Backend(engine, model_dir, reg.url, tmp_p / "cache2",
                      host_cache_bytes=64 * small, disk_cache_bytes=128 * small)
    try:
        models = [f"bench/many-{i}/1" for i in range(n_cycle)]
        warm_at = max(1, len(models) // 4)
        marks: dict[str, float] = {}

        def progress(done: int) -> None:
            if done == warm_at:
                marks["rss_warm"] = rss_mb()
                if a.device.startswith("cuda"):
                    marks["gpu_warm"] = torch.cuda.memory_allocated() / 2**20

        t0 = time.perf_counter()
        done, errors = asyncio.run(cycle(backend.url, models, 16, progress))
        elapsed = time.perf_counter() - t0
        metrics = httpx.get(f"{backend.url}/metrics").text
    finally:
        backend.stop()
    evictions = sum(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("quiver_backend_evictions_total{"))
    rss_end = rss_mb()
    out.update(cycled_adapters=n_cycle, requests=done, errors=len(errors),
               cycle_seconds=round(elapsed, 2),
               cycle_requests_per_s=round(done / elapsed, 2), evictions=int(evictions),
               rss_warm_mb=round(marks.get("rss_warm", 0.0), 1),
               rss_end_mb=round(rss_end, 1),
               rss_growth_mb=round(rss_end - marks.get("rss_warm", rss_end), 1))
    if a.device.startswith("cuda"):
        gpu_end = torch.cuda.memory_allocated() / 2**20
        out.update(gpu_growth_mb=round(gpu_end - marks.get("gpu_warm", gpu_end), 1))
    for e in errors[:5]:
        log(f"error: {e}")
    log(f"cycled {n_cycle} adapters: {done} requests, {len(errors)} errors, "
        f"RSS growth after warm-up {out['rss_growth_mb']} MB")


if __name__ == "__main__":
    main()
