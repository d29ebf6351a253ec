"""Helpers for the engine tests: a byte-level tokenizer and tiny checkpoints with adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._models import make_peft_adapter, make_tiny_base


def add_byte_tokenizer(model_dir: Path) -> None:
    """A real fast tokenizer with one token per byte (256 tokens), saved into ``model_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # The GPT-2 byte-to-unicode table, ordered by byte value.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, (chr(c) for c in cs), strict=True))
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(model_dir)


def make_base_with_tokenizer(out: Path, family: str = "llama", eos: int | None = None,
                             **overrides) -> Path:
    make_tiny_base(out, family=family, **overrides)
    add_byte_tokenizer(out)
    if eos is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg["eos_token_id"] = eos
        (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture
def one_torch_thread():
    """Run a test's tiny tensor ops on one thread: on a busy 2-core machine a parallel pool
    waiting on descheduled workers costs far more than these ops themselves."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Adapter recipes for the peer comparison: several ranks, module sets, rsLoRA, patterns.
ADAPTER_RECIPES = {
    "qv4": dict(r=4, target_modules=["q_proj", "v_proj"], seed=11),
    "all8rs": dict(r=8, target_modules="all-linear", use_rslora=True, seed=12),
    "mlp16": dict(r=16, target_modules=["gate_proj", "up_proj", "down_proj"], seed=13),
    "attn8pat": dict(r=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                     rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3}, seed=14),
    "kv4l1": dict(r=4, target_modules=["k_proj", "v_proj", "up_proj"], layers_to_transform=[1],
                  seed=15),
}


class _LazyModels(dict):
    """{family: (base dir with tokenizer, {adapter name: PEFT folder})}, built on first use."""

    def __init__(self, factory) -> None:
        super().__init__()
        self._factory = factory

    def __missing__(self, family: str) -> tuple[Path, dict[str, Path]]:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            root = self._factory.mktemp(f"engine-{family}")
            base = make_base_with_tokenizer(root / "base", family=family)
            adapters = {name: make_peft_adapter(base, root / name, **recipe)
                        for name, recipe in ADAPTER_RECIPES.items()}
        finally:
            torch.set_num_threads(before)
        self[family] = (base, adapters)
        return self[family]


@pytest.fixture(scope="session")
def engine_models(tmp_path_factory) -> _LazyModels:
    """Tiny llama / qwen2 checkpoints with a tokenizer and PEFT adapters, per family."""
    return _LazyModels(tmp_path_factory)
