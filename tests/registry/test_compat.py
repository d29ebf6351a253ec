"""Base-model descriptions from real transformers configs, and adapters checked against them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quiver.errors import IncompatibleAdapter, InvalidAdapter, InvalidRequest
from quiver.registry.compat import (
    LINEAR_MODULES, adapter_stats, base_model_info_from_config, check_adapter_against_base,
    expected_lora_tensors, targeted_modules, validate_adapter_config,
)
from quiver.registry.safetensors_check import TensorMeta, parse_safetensors_header
from quiver.wire import BaseModelInfo, PeftEssentials

P = "base_model.model.model.layers"


def read_adapter(folder: Path) -> tuple[PeftEssentials, dict[str, TensorMeta]]:
    blob = (folder / "adapter_model.safetensors").read_bytes()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    return validate_adapter_config(cfg), parse_safetensors_header(blob, len(blob))


def base_of(folder: Path, name: str = "tiny") -> BaseModelInfo:
    return base_model_info_from_config(name, json.loads((folder / "config.json").read_text()))


def problems(exc: pytest.ExceptionInfo) -> list[dict]:
    assert exc.value.code == "incompatible_adapter"
    for p in exc.value.details:
        assert {"tensor", "expected", "found", "problem"} <= set(p)
    return exc.value.details


@pytest.fixture(scope="module")
def adapters(tiny_llama, tiny_qwen2, tmp_path_factory) -> dict[str, Path]:
    from tests._models import make_peft_adapter, make_tiny_base

    root = tmp_path_factory.mktemp("compat")
    wide = make_tiny_base(root / "wide-llama", family="llama", hidden_size=96,
                          num_hidden_layers=3, intermediate_size=128)
    return {
        "qwen2": make_peft_adapter(tiny_qwen2, root / "qwen2", r=4,
                                   target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
        "all_linear": make_peft_adapter(tiny_llama, root / "all", r=4, target_modules="all-linear",
                                        rank_pattern={"k_proj": 2,
                                                      "model.layers.1.mlp.up_proj": 6}),
        "regex": make_peft_adapter(tiny_llama, root / "regex", r=4,
                                   target_modules=r".*\.(q|v)_proj"),
        "dora": make_peft_adapter(tiny_llama, root / "dora", r=4,
                                  target_modules=["q_proj", "down_proj"], use_dora=True),
        "embedding": make_peft_adapter(tiny_llama, root / "emb", r=4,
                                       target_modules=["embed_tokens", "lm_head", "v_proj"]),
        "saved_head": make_peft_adapter(tiny_llama, root / "mts", r=4, target_modules=["q_proj"],
                                        modules_to_save=["lm_head"]),
        "wide": make_peft_adapter(wide, root / "wide", r=8, target_modules=["q_proj", "o_proj"]),
    }


# --- base models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_module_shapes_match_the_real_model(request, fixture):
    import torch
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(fixture)
    info = base_of(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and short in LINEAR_MODULES:
            assert info.modules[short] == [module.in_features, module.out_features], name
    assert info.num_layers == model.config.num_hidden_layers
    assert info.vocab_size == model.get_input_embeddings().num_embeddings
    assert info.family == model.config.model_type


@pytest.mark.parametrize("family, sizes, expect", [
    ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32768),
     dict(head_dim=128, q=[4096, 4096], k=[4096, 1024], down=[14336, 4096],
          arch="MistralForCausalLM")),
    ("mistral", dict(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=131072),
     dict(head_dim=128, q=[5120, 4096], k=[5120, 1024], down=[14336, 5120],
          arch="MistralForCausalLM")),
    ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
     dict(head_dim=64, q=[896, 896], k=[896, 128], down=[4864, 896],
          arch="Qwen2ForCausalLM")),
    ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
     dict(head_dim=64, q=[2048, 2048], k=[2048, 512], down=[8192, 2048],
          arch="LlamaForCausalLM")),
])
def test_configs_from_transformers(family, sizes, expect):
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, **sizes).to_dict()
    info = base_model_info_from_config(f"{family}-test", config, revision="a" * 40)
    assert info.family == family and info.revision == "a" * 40
    assert info.head_dim == expect["head_dim"]
    assert info.modules["q_proj"] == expect["q"]
    assert info.modules["k_proj"] == info.modules["v_proj"] == expect["k"]
    assert info.modules["o_proj"] == expect["q"][::-1]
    assert info.modules["down_proj"] == expect["down"]
    assert info.modules["gate_proj"] == info.modules["up_proj"] == expect["down"][::-1]
    assert info.num_kv_heads == sizes["num_key_value_heads"]
    assert info.architecture == expect["arch"]


@pytest.mark.parametrize("model_type", ["gpt2", "bert", None, "mixtral"])
def test_unsupported_families_are_refused(model_type):
    with pytest.raises(InvalidRequest) as info:
        base_model_info_from_config("x", {"model_type": model_type, "hidden_size": 8})
    assert info.value.code == "invalid_request"
    assert info.value.details[0]["field"] == "model_type"


def test_malformed_config_lists_every_problem():
    config = {"model_type": "llama", "hidden_size": 30, "intermediate_size": -1,
              "num_hidden_layers": True, "num_attention_heads": 4, "num_key_value_heads": 3,
              "vocab_size": "32000"}
    with pytest.raises(InvalidRequest) as info:
        base_model_info_from_config("x", config)
    fields = {p["field"] for p in info.value.details}
    assert fields == {"intermediate_size", "num_hidden_layers", "vocab_size", "head_dim",
                      "num_key_value_heads"}
    assert info.value.code == "invalid_request"


# --- adapter configs ----------------------------------------------------------------------

def test_real_config_is_kept(lora_adapter):
    peft, _ = read_adapter(lora_adapter)
    assert peft.r == 8 and peft.lora_alpha == 16.0
    assert sorted(peft.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert not peft.use_dora and not peft.use_rslora and peft.bias == "none"


def test_pattern_targets_are_kept_as_given(adapters):
    peft, _ = read_adapter(adapters["regex"])
    assert peft.target_modules == [r".*\.(q|v)_proj"]
    assert validate_adapter_config({"peft_type": "LORA", "r": 4, "target_modules": "all-linear"}
                                   ).target_modules == ["all-linear"]


def test_other_peft_types_are_refused(tmp_path):
    from peft import LoHaConfig

    LoHaConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    with pytest.raises(InvalidAdapter) as info:
        validate_adapter_config(cfg)
    assert "LOHA" in info.value.message and info.value.code == "invalid_adapter"


def test_bad_config_lists_every_problem():
    cfg = {"peft_type": "LORA", "r": 0, "lora_alpha": "16", "target_modules": [],
           "use_dora": "yes", "rank_pattern": {"q_proj": -2, "(": 4},
           "alpha_pattern": {"v_proj": float("inf")}, "bias": "some",
           "modules_to_save": [3], "layer_replication": [[0, 2]]}
    with pytest.raises(InvalidAdapter) as info:
        validate_adapter_config(cfg)
    fields = [p["field"] for p in info.value.details]
    assert set(fields) == {"r", "lora_alpha", "target_modules", "use_dora", "rank_pattern",
                           "alpha_pattern", "bias", "modules_to_save", "layer_replication"}
    assert fields.count("rank_pattern") == 2


@pytest.mark.parametrize("cfg", [[], "LORA", {"r": 8, "target_modules": ["q_proj"]},
                                 {"peft_type": "LORA", "r": 8, "target_modules": "("}])
def test_malformed_configs(cfg):
    with pytest.raises(InvalidAdapter):
        validate_adapter_config(cfg)


# --- adapters against bases --------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2", "all_linear", "regex", "dora", "embedding",
                                  "saved_head"])
def test_real_adapters_pass_and_match_expectations(adapters, tiny_llama, tiny_qwen2, name):
    base = base_of(tiny_qwen2 if name == "qwen2" else tiny_llama)
    peft, tensors = read_adapter(adapters[name])
    check_adapter_against_base(peft, tensors, base)
    expected = expected_lora_tensors(peft, base)
    lora = {k: v.shape for k, v in tensors.items() if ".lora_" in k}
    assert lora == {k: v for k, v in expected.items() if k in lora}
    assert {k for k in expected if ".lora_" in k} == set(lora)


def test_the_fixture_adapter_passes(lora_adapter, tiny_llama):
    peft, tensors = read_adapter(lora_adapter)
    check_adapter_against_base(peft, tensors, base_of(tiny_llama))
    count, dtype = adapter_stats(tensors)
    assert count == sum(m.numel for m in tensors.values()) and dtype == "float32"


def test_rank_pattern_resolution(adapters, tiny_llama):
    peft, tensors = read_adapter(adapters["all_linear"])
    expected = expected_lora_tensors(peft, base_of(tiny_llama))
    assert expected[f"{P}.0.self_attn.k_proj.lora_A.weight"] == (2, 64)
    assert expected[f"{P}.1.mlp.up_proj.lora_B.weight"] == (160, 6)
    assert expected[f"{P}.0.mlp.up_proj.lora_B.weight"] == (160, 4)
    assert tensors[f"{P}.1.mlp.up_proj.lora_B.weight"].shape == (160, 6)
    assert len(targeted_modules(peft, base_of(tiny_llama))) == 14


def test_adapter_for_another_base_lists_every_tensor(adapters, tiny_llama):
    """Made by peft for a wider, deeper Llama: every tensor is wrong, layer 2 does not exist."""
    peft, tensors = read_adapter(adapters["wide"])
    with pytest.raises(IncompatibleAdapter) as info:
        check_adapter_against_base(peft, tensors, base_of(tiny_llama))
    found = problems(info)
    by_tensor = {p["tensor"]: p for p in found}
    assert set(by_tensor) == set(tensors)
    assert by_tensor[f"{P}.0.self_attn.q_proj.lora_A.weight"]["expected"] == [8, 64]
    assert by_tensor[f"{P}.0.self_attn.q_proj.lora_A.weight"]["found"] == [8, 96]
    assert by_tensor[f"{P}.2.self_attn.o_proj.lora_B.weight"]["problem"] == \
        "layer index out of range"
    assert "incompatible with base model tiny" in info.value.message


def test_qwen2_adapter_on_llama_with_other_sizes(adapters, tiny_llama):
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, vocab_size=256).to_dict()
    peft, tensors = read_adapter(adapters["qwen2"])
    with pytest.raises(IncompatibleAdapter) as info:
        check_adapter_against_base(peft, tensors, base_model_info_from_config("other", config))
    wrong = {(p["tensor"], tuple(p["expected"]), tuple(p["found"])) for p in problems(info)}
    assert (f"{P}.0.self_attn.v_proj.lora_B.weight", (64, 4), (32, 4)) in wrong
    assert (f"{P}.1.mlp.gate_proj.lora_B.weight", (128, 4), (160, 4)) in wrong
    assert (f"{P}.0.mlp.down_proj.lora_A.weight", (4, 128), (4, 160)) in wrong
    assert not any("q_proj" in p["tensor"] for p in problems(info))


def test_rank_disagreeing_with_the_config(lora_adapter, tiny_llama):
    peft, tensors = read_adapter(lora_adapter)
    lying = peft.model_copy(update={"r": 4})
    with pytest.raises(IncompatibleAdapter) as info:
        check_adapter_against_base(lying, tensors, base_of(tiny_llama))
    assert len(problems(info)) == len(tensors)
    assert {p["problem"] for p in problems(info)} == {"wrong lora_A shape", "wrong lora_B shape"}


def test_handmade_problems_are_all_listed(lora_adapter, tiny_llama):
    peft, real = read_adapter(lora_adapter)
    tensors = dict(real)
    f32 = lambda *shape: TensorMeta("F32", shape, 4)  # noqa: E731
    del tensors[f"{P}.1.self_attn.v_proj.lora_B.weight"]
    tensors[f"{P}.0.self_attn.q_proj.lora_A.weight"] = TensorMeta("F64", (8, 64), 4096)
    tensors[f"{P}.0.self_attn.qkv_proj.lora_A.weight"] = f32(8, 64)
    tensors[f"{P}.0.mlp.gate_proj.lora_A.weight"] = f32(8, 64)
    tensors[f"{P}.0.mlp.gate_proj.lora_B.weight"] = f32(160, 8)
    tensors[f"{P}.7.self_attn.q_proj.lora_A.weight"] = f32(8, 64)
    tensors[f"{P}.0.self_attn.k_proj.lora_magnitude_vector"] = f32(32)
    tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = f32(8, 64)
    tensors[f"{P}.0.self_attn.o_proj.lora_A.extra"] = f32(1)
    tensors["base_model.model.lm_head.weight"] = f32(256, 64)
    with pytest.raises(IncompatibleAdapter) as info:
        check_adapter_against_base(peft.model_copy(update={
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "c_attn"]}),
            tensors, base_of(tiny_llama))
    got = {(p["tensor"], p["problem"]) for p in problems(info)}
    assert got == {
        (f"{P}.1.self_attn.v_proj.lora_B.weight", "missing lora_B for lora_A"),
        (f"{P}.0.self_attn.q_proj.lora_A.weight", "dtype not allowed"),
        (f"{P}.0.self_attn.qkv_proj.lora_A.weight", "unknown module"),
        (f"{P}.0.mlp.gate_proj.lora_A.weight", "module is not in target_modules"),
        (f"{P}.0.mlp.gate_proj.lora_B.weight", "module is not in target_modules"),
        (f"{P}.7.self_attn.q_proj.lora_A.weight", "layer index out of range"),
        (f"{P}.0.self_attn.k_proj.lora_magnitude_vector",
         "DoRA magnitude vector but use_dora is false"),
        ("model.layers.0.self_attn.q_proj.lora_A.weight",
         "tensor name does not start with 'base_model.model.'"),
        (f"{P}.0.self_attn.o_proj.lora_A.extra", "not a LoRA tensor name"),
        ("base_model.model.lm_head.weight", "full weight of a module not in modules_to_save"),
        (None, "target module not in LlamaForCausalLM"),
    }
    absent = next(p for p in problems(info) if p["tensor"] is None)
    assert absent["module"] == "c_attn" and "q_proj" in absent["expected"]


def test_dora_without_magnitudes(adapters, tiny_llama):
    peft, real = read_adapter(adapters["dora"])
    tensors = {k: v for k, v in real.items() if "magnitude" not in k}
    with pytest.raises(IncompatibleAdapter) as info:
        check_adapter_against_base(peft, tensors, base_of(tiny_llama))
    assert {p["problem"] for p in problems(info)} == {"missing DoRA magnitude vector"}
    assert len(problems(info)) == 4
    bad = dict(real)
    bad[f"{P}.0.mlp.down_proj.lora_magnitude_vector"] = TensorMeta("F32", (160,), 640)
    with pytest.raises(IncompatibleAdapter) as info:
        check_adapter_against_base(peft, bad, base_of(tiny_llama))
    assert problems(info)[0]["expected"] == [64] and problems(info)[0]["found"] == [160]


def test_embedding_lora_shapes_are_checked(adapters, tiny_llama):
    peft, real = read_adapter(adapters["embedding"])
    tensors = dict(real)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = TensorMeta(
        "F32", (4, 300), 4800)
    with pytest.raises(IncompatibleAdapter) as info:
        check_adapter_against_base(peft, tensors, base_of(tiny_llama))
    [p] = problems(info)
    assert p["expected"] == [4, 256] and p["found"] == [4, 300]


def test_regex_matching_nothing(adapters, tiny_llama):
    peft, tensors = read_adapter(adapters["regex"])
    with pytest.raises(IncompatibleAdapter) as info:
        check_adapter_against_base(peft.model_copy(update={"target_modules": [r".*\.c_attn"]}),
                                   tensors, base_of(tiny_llama))
    kinds = {p["problem"] for p in problems(info)}
    assert "target_modules matches no module of LlamaForCausalLM" in kinds
    assert "module is not in target_modules" in kinds


def test_no_lora_tensors_at_all(lora_adapter, tiny_llama):
    peft, _ = read_adapter(lora_adapter)
    with pytest.raises(IncompatibleAdapter) as info:
        check_adapter_against_base(peft, {}, base_of(tiny_llama))
    assert "adapter has no LoRA tensors" in {p["problem"] for p in problems(info)}


def test_allowed_dtypes_are_configurable(lora_adapter, tiny_llama):
    peft, tensors = read_adapter(lora_adapter)
    with pytest.raises(IncompatibleAdapter) as info:
        check_adapter_against_base(peft, tensors, base_of(tiny_llama),
                                   allowed_dtypes=("F16", "BF16"))
    assert len(problems(info)) == len(tensors)


def test_adapter_stats_picks_the_dominant_dtype():
    tensors = {"a": TensorMeta("F16", (10, 10), 200), "b": TensorMeta("F32", (10,), 40),
               "c": TensorMeta("BF16", (3,), 6)}
    assert adapter_stats(tensors) == (113, "float16")
    assert adapter_stats({}) == (0, None)


def test_target_module_without_tensors(lora_adapter, tiny_llama):
    peft, tensors = read_adapter(lora_adapter)
    narrowed = peft.model_copy(update={"target_modules": ["q_proj", "gate_proj"]})
    with pytest.raises(IncompatibleAdapter) as info:
        check_adapter_against_base(narrowed, tensors, base_of(tiny_llama))
    found = problems(info)
    empty = [p for p in found if p["tensor"] is None]
    assert [(p["module"], p["problem"]) for p in empty] == [
        ("gate_proj", "target module has no LoRA tensors")]
    outside = {p["tensor"] for p in found if p["problem"] == "module is not in target_modules"}
    assert outside == {k for k in tensors if "q_proj" not in k}
