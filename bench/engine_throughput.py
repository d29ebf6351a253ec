"""Engine decode throughput with many distinct adapters vs no adapters vs HF PEFT, in one run.

For 1, 8, 32 and 128 distinct rank-16 LoRA adapters on all seven projections, a batch of
``max(32, adapters)`` requests (32-token prompts, greedy, fixed output length, request ``i``
on adapter ``i mod n``) is decoded by:

- Quiver's engine with the adapters (every step mixes them),
- the same engine and batch with no adapters (the ceiling),
- Hugging Face PEFT's mixed-adapter batch generation (``generate(adapter_names=...)``) on the
  same model weights, batch and lengths.

Decode throughput counts only decode steps: for PEFT, (time for N new tokens − time for 1) per
(N − 1) tokens per row. The three systems run interleaved ``--repeat`` times. The engine's
headline figures are the median over every decode step of every repeat (tokens of the step per
second of the step), which a busy spell on a shared host moves far less than a whole run's
total; the fastest run's figures, by wall clock and by process CPU time, are reported beside
them (``*_best``, ``*_cpu``). PEFT, which runs whole ``generate`` calls, counts its fastest run,
which favours the peer.

On CUDA (``--device cuda``) ``--shape 8b`` builds a Llama-3-8B-shaped model with random weights
(add ``--no-peft`` to skip the peer, which needs the weights on disk), and ``--kernels`` times
the Triton LoRA kernels alone and reports the fraction of memory bandwidth they reach.

    python bench/engine_throughput.py [--quick] [--json] [--device cpu|cuda] [--shape small|8b]
        [--threads N] [--batch N] [--adapters 1 8 32 128] [--repeat N] [--kernels]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import bench_args, ratio, report  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="small", choices=list(SHAPES))
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT peer")
    p.add_argument("--kernels", action="store_true", help="LoRA kernel micro-benchmark (CUDA)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=None,
                   help="requests per batch (default: max(32, adapters))")
    p.add_argument("--adapters", type=int, nargs="+", default=None,
                   help="distinct-adapter counts to measure (default 1 8 32 128; quick 1 8 32)")


def make_base(out: Path, shape: str, materialise: bool) -> Path:
    """config.json (and, for PEFT, random weights saved by transformers) in ``out``."""
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama",
               max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, hidden_act="silu", **SHAPES[shape])
    out.mkdir(parents=True, exist_ok=True)
    if materialise:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(out, safe_serialization=True)
    else:
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def make_adapters(base_cfg: dict[str, Any], root: Path, n: int, rank: int,
                  dtype: torch.dtype = torch.float32) -> list[Path]:
    """``n`` PEFT-format LoRA folders with random non-zero weights on all seven projections."""
    from safetensors.torch import save_file

    h, i = base_cfg["hidden_size"], base_cfg["intermediate_size"]
    hd = h // base_cfg["num_attention_heads"]
    kv = base_cfg["num_key_value_heads"] * hd
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    sections = {m: "self_attn" if m in MODULES[:4] else "mlp" for m in MODULES}
    paths = []
    gen = torch.Generator().manual_seed(1)
    for k in range(n):
        d = root / f"adapter-{k}"
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(base_cfg["num_hidden_layers"]):
            for m, (d_in, d_out) in dims.items():
                p = f"base_model.model.model.layers.{layer}.{sections[m]}.{m}"
                tensors[f"{p}.lora_A.weight"] = (torch.randn(rank, d_in, generator=gen)
                                                 * 0.02).to(dtype)
                tensors[f"{p}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen)
                                                 * 0.02).to(dtype)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(dict(
            peft_type="LORA", r=rank, lora_alpha=2 * rank, target_modules=MODULES,
            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path="")))
        paths.append(d)
    return paths


def engine_decode(engine: Any, batch: int, n_adapters: int, prompt_len: int,
                  new_tokens: int, step_rates: list[float] | None = None
                  ) -> tuple[int, float, float]:
    """(decode tokens, wall seconds, CPU seconds) of one batch on ``engine``; adapters are
    keyed ``a0..a{n-1}`` and only steps without prefill count. Each decode step's tokens per
    second are appended to ``step_rates``."""
    from quiver.backend.engine import SamplingParams

    gen = torch.Generator().manual_seed(2)
    vocab = engine.args.vocab_size
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for r in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        adapter = f"a{r % n_adapters}" if n_adapters else None
        engine.add_request(f"r{r}-{time.monotonic_ns()}", prompt, adapter, params)
    wall, cpu, tokens = 0.0, 0.0, 0
    while engine.has_work():
        st = engine.stats()
        prefilling = st["queue_depth"] > 0 or st["prefilling"] > 0
        t0, c0 = time.perf_counter(), time.process_time()
        events = engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        if not prefilling:
            dt = time.perf_counter() - t0
            n = sum(1 for e in events if e.token_id is not None)
            wall += dt
            cpu += time.process_time() - c0
            tokens += n
            if step_rates is not None and dt > 0:
                step_rates.append(n / dt)
    return tokens, wall, cpu


class PeftPeer:
    """HF PEFT with ``n`` adapters loaded, generating mixed batches via ``adapter_names``."""

    def __init__(self, base_dir: Path, adapters: list[Path], device: str):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0").to(device)
        for k, p in enumerate(adapters[1:], start=1):
            model.load_adapter(p, adapter_name=f"a{k}")
        model.eval()
        model.generation_config.eos_token_id = None
        self.model, self.device = model, device

    def decode(self, batch: int, n_adapters: int, prompt_len: int,
               new_tokens: int) -> tuple[int, float, float]:
        """(decode tokens, wall, CPU): generating N tokens minus generating 1."""
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(0, self.model.config.vocab_size, (batch, prompt_len),
                            generator=gen).to(self.device)
        names = [f"a{r % n_adapters}" for r in range(batch)]

        def run(n: int) -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, adapter_names=names,
                                    pad_token_id=0)
            if self.device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0, time.process_time() - c0

        w1, c1 = run(1)
        wn, cn = run(new_tokens)
        return batch * (new_tokens - 1), wn - w1, cn - c1


def best(samples: list[tuple[int, float, float]]) -> dict[str, float]:
    """Tokens/s from the fastest of repeated runs, by wall clock and by CPU time."""
    return {"wall": max(t / w for t, w, _ in samples),
            "cpu": max(t / c for t, _, c in samples)}


def kernel_bench(device: str, shape: str, rank: int) -> dict[str, Any]:
    """Time BGMV shrink+expand over 32 distinct slots; report achieved memory bandwidth."""
    from quiver.backend.engine import kernels

    cfg = SHAPES[shape]
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    dtype = torch.bfloat16
    out: dict[str, Any] = {}
    peak = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        peak = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 \
            if hasattr(props, "memory_clock_rate") else None
    for name, (d_in, d_out) in {"qo": (h, h), "gate_up": (h, i), "down": (i, h)}.items():
        a = torch.randn(64, rank, d_in, device=device, dtype=dtype)
        b = torch.randn(64, rank, d_out, device=device, dtype=dtype)
        x = torch.randn(32, d_in, device=device, dtype=dtype)
        idx = torch.arange(32, device=device, dtype=torch.int32)
        for _ in range(3):
            kernels.bgmv_expand(kernels.bgmv_shrink(x, a, idx, rank), b, idx, rank)
        if device == "cuda":
            torch.cuda.synchronize()
        reps = 50
        t0 = time.perf_counter()
        for _ in range(reps):
            kernels.bgmv_expand(kernels.bgmv_shrink(x, a, idx, rank), b, idx, rank)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / reps
        moved = 32 * rank * (d_in + d_out) * 2 + 32 * (d_in + d_out) * 2
        out[f"{name}_GBps"] = round(moved / dt / 1e9, 1)
        if peak:
            out[f"{name}_bw_fraction"] = round(moved / dt / peak, 3)
    return out


def main() -> None:
    args = bench_args(__doc__.splitlines()[0], _extra)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        res = kernel_bench(args.device, args.shape, args.rank)
        report(args, {"device": args.device, "kernels": res}, [json.dumps(res)])
        return
    counts = args.adapters or ([1, 8, 32] if args.quick else [1, 8, 32, 128])
    root = Path(tempfile.mkdtemp(prefix="quiver-engine-bench-"))
    try:
        run(args, counts, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, counts: list[int], root: Path) -> None:
    from quiver.backend.engine import Engine, EngineConfig, load_adapter_dir

    prompt_len, new_tokens = 32, (16 if args.quick else 32)
    peft = not args.no_peft
    base = make_base(root / "base", args.shape, materialise=peft)
    base_cfg = json.loads((base / "config.json").read_text())
    adapter_dirs = make_adapters(base_cfg, root / "adapters", max(counts), args.rank,
                                 torch.bfloat16 if args.device == "cuda" else torch.float32)
    max_batch = args.batch or max(32, max(counts))
    engine = Engine(EngineConfig(model_dir=base, device=args.device, max_slots=max(counts),
                                 max_rank=args.rank, max_running=max_batch,
                                 kv_cache_tokens=max_batch * (prompt_len + new_tokens + 16),
                                 random_weights=not peft))
    for k, d in enumerate(adapter_dirs):
        engine.load_adapter(f"a{k}", engine.prepare_adapter(*load_adapter_dir(d)))
    for n in (0, max(counts)):                          # warm-up: a full batch each way
        engine_decode(engine, max_batch, n, prompt_len, 4)
    peer = PeftPeer(base, adapter_dirs, args.device) if peft else None
    repeats = args.repeat or 3
    lines = [f"device={engine.device} dtype={engine.dtype} shape={args.shape} rank={args.rank} "
             f"threads={torch.get_num_threads()} repeats={repeats}",
             f"memory: {engine.memory_report()}"]
    for line in lines:
        print(line, flush=True)
    lines = []
    result: dict[str, Any] = {"device": str(engine.device), "shape": args.shape,
                              "threads": torch.get_num_threads(), "repeats": repeats,
                              "memory": engine.memory_report()}
    for n in counts:
        batch = args.batch or max(32, n)
        runs: dict[str, list[tuple[int, float, float]]] = {"base": [], "lora": [], "peft": []}
        steps: dict[str, list[float]] = {"base": [], "lora": []}
        for rep in range(repeats):        # interleaved, so a busy spell hits every system
            for name in (("base", "lora") if rep % 2 == 0 else ("lora", "base")):
                runs[name].append(engine_decode(engine, batch, n if name == "lora" else 0,
                                                prompt_len, new_tokens, steps[name]))
            if peer is not None:
                runs["peft"].append(peer.decode(batch, n, prompt_len, new_tokens))
        b, lo = best(runs["base"]), best(runs["lora"])
        b_med, lo_med = statistics.median(steps["base"]), statistics.median(steps["lora"])
        row = {"batch": batch, "engine_tok_s": round(lo_med, 1),
               "engine_no_adapter_tok_s": round(b_med, 1),
               "ratio_vs_base": ratio(lo_med, b_med),
               "engine_tok_s_best": round(lo["wall"], 1),
               "engine_no_adapter_tok_s_best": round(b["wall"], 1),
               "ratio_vs_base_best": ratio(lo["wall"], b["wall"]),
               "ratio_vs_base_cpu": ratio(lo["cpu"], b["cpu"])}
        if peer is not None:
            p = best(runs["peft"])
            row.update(peft_mixed_tok_s=round(p["wall"], 1),
                       speedup_vs_peft=ratio(lo_med, p["wall"]),
                       speedup_vs_peft_best=ratio(lo["wall"], p["wall"]),
                       speedup_vs_peft_cpu=ratio(lo["cpu"], p["cpu"]))
        result[f"adapters_{n}"] = row
        print(f"{n:>4} adapters, batch {batch}: {row}", flush=True)
    r32 = result.get("adapters_32") or {}
    result["ratio_vs_base_32"] = r32.get("ratio_vs_base")
    result["speedup_vs_peft_32"] = r32.get("speedup_vs_peft")
    lines.append(f"ratio_vs_base_32={result['ratio_vs_base_32']} "
                 f"speedup_vs_peft_32={result['speedup_vs_peft_32']}")
    report(args, result, lines)


if __name__ == "__main__":
    main()
