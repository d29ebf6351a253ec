"""The LoRA paths against the torch reference: Triton BGMV/SGMV kernels and the CPU path.

Without CUDA the kernels run in Triton's interpreter, which must be chosen before triton is
first imported; when something imported triton earlier in this process without it, the
kernel cases re-run in a child pytest with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
_CHILD = not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1" and "triton" in sys.modules
if not HAS_CUDA and not _CHILD:
    os.environ["TRITON_INTERPRET"] = "1"

from quiver.backend.engine.lora import (LoraContext, LoraSlots, lora_reference,  # noqa: E402
                                        prepare_adapter, rank_bucket)
from quiver.backend.engine.model import TARGET_MODULES, ModelArgs  # noqa: E402
from tests.backend.test_engine_support import one_torch_thread  # noqa: E402, F401

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
in_interpreter = pytest.mark.skipif(_CHILD, reason="run by test_kernels_in_a_child_process")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def odd_args(hidden: int = 72, intermediate: int = 200, kv_heads: int = 1) -> ModelArgs:
    """A model shape with sizes that are not powers of two (3 heads of 24, 1 KV head)."""
    return ModelArgs(model_type="llama", hidden_size=hidden, intermediate_size=intermediate,
                     num_layers=1, num_heads=3, num_kv_heads=kv_heads, head_dim=hidden // 3,
                     vocab_size=32, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
                     max_position_embeddings=64, tie_word_embeddings=False, qkv_bias=False,
                     o_bias=False, mlp_bias=False, sliding_window=None)


def peft_tensors(args: ModelArgs, rank: int, modules: list[str], seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        d_in, d_out = args.module_dims()[m]
        sec = "self_attn" if m in TARGET_MODULES[:4] else "mlp"
        p = f"base_model.model.model.layers.0.{sec}.{m}"
        out[f"{p}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.3
        out[f"{p}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.3
    return out


def fill_slots(args, ranks, dtype, max_rank=64):
    """Slots holding one adapter per rank in ``ranks``; returns (slots, true rank per slot)."""
    slots = LoraSlots(args, len(ranks) + 1, max_rank, DEVICE, dtype)
    true = torch.zeros(slots.num_slots, dtype=torch.long)
    for i, r in enumerate(ranks):
        mods = list(TARGET_MODULES) if i % 2 == 0 else ["q_proj", "v_proj", "down_proj"]
        cfg = {"r": r, "lora_alpha": 2 * r, "use_rslora": i % 3 == 1}
        prep = prepare_adapter(cfg, peft_tensors(args, r, mods, seed=i), args, max_rank, dtype)
        s = slots.load(f"a{i}", prep)
        true[s] = r
    return slots, true


TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def check_context(slots, true_ranks, token_slots, dtype, decode_only, use_kernels):
    args = slots.args
    gen = torch.Generator().manual_seed(int(token_slots.sum()) + 7)
    x = torch.randn(token_slots.numel(), args.hidden_size, generator=gen).to(DEVICE, dtype)
    ctx = LoraContext.build(slots, token_slots, decode_only=decode_only,
                            use_kernels=use_kernels)
    assert ctx is not None
    for module in ("q_proj", "k_proj", "gate_proj", "down_proj"):
        d_in, d_out = args.module_dims()[module]
        xm = x if d_in == args.hidden_size else torch.randn(
            x.shape[0], d_in, generator=gen).to(DEVICE, dtype)
        base = torch.randn(x.shape[0], d_out, generator=gen).to(DEVICE, dtype)
        y = base.clone()
        ctx.apply(0, module, xm, y)
        ref = lora_reference(xm, slots.a[module][0], slots.b[module][0],
                             token_slots.to(DEVICE), true_ranks.to(DEVICE))
        want = base.float() + ref
        scale = want.abs().max().item()
        err = (y.float() - want).abs().max().item()
        assert err <= TOL[dtype] * max(1.0, scale), (module, err, scale)
        untouched = (token_slots < 0).to(DEVICE)
        assert torch.equal(y[untouched], base[untouched])


def token_mix(name: str, n_adapters: int) -> tuple[torch.Tensor, bool]:
    if name == "decode-all-distinct":
        return torch.arange(n_adapters), True
    if name == "decode-with-base":
        return torch.tensor([-1, 0, n_adapters - 1, -1, 1 % n_adapters, 0, -1]), True
    return torch.tensor([0] * 5 + [-1] * 3 + [1 % n_adapters] * 2 + [0] * 4
                        + [n_adapters - 1] * 19), False


RANK_SETS = [[4], [8, 4], [16, 8, 4], [64, 16, 4]]


@pytest.mark.parametrize("ranks", RANK_SETS, ids=lambda r: "r" + "-".join(map(str, r)))
@pytest.mark.parametrize("mix", ["decode-all-distinct", "decode-with-base", "prefill-segments"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=["fp32", "bf16"])
def test_cpu_grouped_path_matches_reference(ranks, mix, dtype):
    if HAS_CUDA:
        pytest.skip("the grouped torch path is the CPU path")
    slots, true = fill_slots(odd_args(), ranks, dtype)
    token_slots, decode_only = token_mix(mix, len(ranks))
    check_context(slots, true, token_slots, dtype, decode_only, use_kernels=False)


@pytest.mark.parametrize("token_slots", [[0, 1, 2, 3], [1, 0], [0, 1, 3, -1], [3, 3, 0, 2, 1],
                                         [1, 0, 1, 0, 2, 2], [0, 1], [0, 0, 1, 1]],
                         ids=["distinct", "run-unsorted", "with-base", "repeated", "even-run",
                              "run-in-order", "even-run-in-order"])
@pytest.mark.parametrize("kv_heads", [1, 3], ids=["gqa", "mha"])
def test_cpu_fused_qkv_and_gate_up_match_reference(token_slots, kv_heads):
    """One shrink for q/k/v and one for gate/up, and one expand where their outputs have one
    width (gate/up; q/k/v without GQA), stay exact for every way rows map onto slots."""
    if HAS_CUDA:
        pytest.skip("the fused torch path is the CPU path")
    args = odd_args(kv_heads=kv_heads)
    slots, true = fill_slots(args, [16, 16, 4, 16], torch.float32)
    assert ("qkv" in slots.fused_b) == (kv_heads == 3) and "gate_up" in slots.fused_b
    ts = torch.tensor(token_slots)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(ts.numel(), args.hidden_size, generator=gen)
    ctx = LoraContext.build(slots, ts)
    for apply, modules in ((ctx.apply_qkv, ("q_proj", "k_proj", "v_proj")),
                           (ctx.apply_gate_up, ("gate_proj", "up_proj"))):
        refs = [lora_reference(x, slots.a[m][0], slots.b[m][0], ts, true) for m in modules]
        base = torch.randn(ts.numel(), sum(r.shape[1] for r in refs), generator=gen)
        y = base.clone()
        apply(0, x, y)
        want = base + torch.cat(refs, dim=1)
        assert (y - want).abs().max().item() <= 2e-4 * max(1.0, want.abs().max().item())
        assert torch.equal(y[ts < 0], base[ts < 0])


@in_interpreter
@pytest.mark.parametrize("ranks", RANK_SETS, ids=lambda r: "r" + "-".join(map(str, r)))
@pytest.mark.parametrize("mix", ["decode-all-distinct", "decode-with-base", "prefill-segments"])
def test_triton_kernels_match_reference_fp32(ranks, mix):
    slots, true = fill_slots(odd_args(), ranks, torch.float32)
    token_slots, decode_only = token_mix(mix, len(ranks))
    check_context(slots, true, token_slots, torch.float32, decode_only, use_kernels=True)


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mix", ["decode-with-base", "prefill-segments"])
def test_triton_kernels_match_reference_half(dtype, mix):
    slots, true = fill_slots(odd_args(hidden=48, intermediate=88), [16, 4], dtype)
    token_slots, decode_only = token_mix(mix, 2)
    check_context(slots, true, token_slots, dtype, decode_only, use_kernels=True)


@in_interpreter
def test_kernel_wrappers_check_their_contract():
    from quiver.backend.engine import kernels

    a = torch.zeros(2, 8, 72, device=DEVICE)
    x = torch.zeros(3, 72, device=DEVICE)
    idx = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(AssertionError):
        kernels.bgmv_shrink(x.half(), a, idx, 4)                 # dtype mismatch
    with pytest.raises(AssertionError):
        kernels.bgmv_shrink(x, a, idx, 16)                       # rank above the slots'
    with pytest.raises(AssertionError):
        kernels.bgmv_shrink(torch.zeros(3, 70, device=DEVICE), a, idx, 4)   # wrong d_in
    with pytest.raises(AssertionError):
        kernels.sgmv_shrink(x, a, idx.long(), idx, idx, 4, 1)    # segments must be int32


def test_rank_groups_do_not_pay_for_the_largest_rank():
    slots, _ = fill_slots(odd_args(), [4, 8, 64, 4], torch.float32)
    ctx = LoraContext.build(slots, torch.tensor([0, 1, 2, 3, -1]), decode_only=True)
    assert sorted(g.rank for g in ctx.groups) == [4, 8, 64]
    assert [rank_bucket(r, 64) for r in (1, 4, 5, 12, 16, 17, 64)] == [4, 4, 8, 16, 16, 32, 64]
    assert LoraContext.build(slots, torch.tensor([-1, -1])) is None     # LoRA skipped


@pytest.mark.skipif(not _CHILD, reason="kernels already run in this process")
def test_kernels_in_a_child_process():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-k", "triton", str(Path(__file__))], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
