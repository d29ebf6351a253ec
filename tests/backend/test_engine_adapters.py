"""Adapter validation and refusal, and the slot lifecycle (no reallocation, exact memory)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from quiver.backend.engine import Engine, EngineConfig, SamplingParams, load_adapter_dir
from quiver.backend.engine.lora import read_safetensors
from quiver.errors import (Conflict, IncompatibleAdapter, InvalidAdapter, ModelNotFound,
                           Overloaded, UnsafeFile, UnservableAdapter)
from tests._models import make_peft_adapter, make_tiny_base
from tests.backend.test_engine_support import engine_models, one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama(engine_models):
    return engine_models["llama"]


@pytest.fixture
def engine(llama):
    base, _ = llama
    return Engine(EngineConfig(model_dir=base, device="cpu", max_slots=2, max_rank=16,
                               max_running=4, kv_cache_tokens=256))


def _refusal(engine, path) -> UnservableAdapter:
    with pytest.raises(UnservableAdapter) as info:
        engine.prepare_adapter(*load_adapter_dir(path))
    assert info.value.code == "unservable_adapter" and info.value.status == 422
    return info.value


def _fields(exc) -> set[str]:
    return {d.get("field") for d in exc.details}


@pytest.mark.parametrize("recipe, field", [
    (dict(use_dora=True), "use_dora"),
    (dict(bias="all"), "bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(target_modules=["embed_tokens"]), "target_modules"),
    (dict(target_modules=["q_proj", "lm_head"]), "target_modules"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(r=32), "r"),
])
def test_unservable_features_are_refused_with_a_reason(llama, engine, tmp_path, recipe, field):
    base, _ = llama
    kwargs = {"target_modules": ["q_proj", "v_proj"], **recipe}
    path = make_peft_adapter(base, tmp_path / "a", **kwargs)
    exc = _refusal(engine, path)
    assert field in _fields(exc), exc.details
    assert all(d["problem"] for d in exc.details)
    assert engine.slot_info()["free"] == 2          # nothing moved into a slot


def test_every_reason_is_listed_at_once(llama, engine, tmp_path):
    base, _ = llama
    path = make_peft_adapter(base, tmp_path / "a", target_modules=["q_proj", "embed_tokens"],
                             use_dora=True, modules_to_save=["lm_head"])
    exc = _refusal(engine, path)
    assert {"use_dora", "modules_to_save", "target_modules"} <= _fields(exc)


def test_adapter_for_another_shape_is_incompatible(llama, engine, tmp_path):
    other = make_tiny_base(tmp_path / "other", family="llama", hidden_size=96,
                           num_hidden_layers=3)
    path = make_peft_adapter(other, tmp_path / "a", target_modules=["q_proj", "down_proj"])
    with pytest.raises(IncompatibleAdapter) as info:
        engine.prepare_adapter(*load_adapter_dir(path))
    problems = {d["problem"] for d in info.value.details}
    assert "lora_A shape mismatch" in problems and "layer index out of range" in problems
    modules = {d.get("module") for d in info.value.details}
    assert {"layers.0.q_proj", "layers.1.down_proj"} <= modules


def test_broken_and_empty_adapters(engine, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text("{}")
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsafeFile):
        load_adapter_dir(tmp_path / "bin")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    save_file({"unrelated": torch.zeros(1)}, str(tmp_path / "empty" /
                                                 "adapter_model.safetensors"))
    with pytest.raises(UnservableAdapter):
        engine.prepare_adapter(*load_adapter_dir(tmp_path / "empty"))
    with pytest.raises(InvalidAdapter):
        engine.prepare_adapter({"r": 4}, {})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(InvalidAdapter):
        load_adapter_dir(tmp_path / "bad")


def test_slots_load_unload_without_reallocation(llama, engine):
    _, adapters = llama
    prepared = {k: engine.prepare_adapter(*load_adapter_dir(p)) for k, p in adapters.items()}
    ptrs = {m: t.data_ptr() for m, t in engine.slots.a.items()}
    nbytes = engine.slot_info()["slot_bytes"]
    s0 = engine.load_adapter("x", prepared["qv4"])
    assert engine.load_adapter("x", prepared["qv4"]) == s0          # idempotent per key
    s1 = engine.load_adapter("y", prepared["mlp16"])
    assert s0 != s1 and engine.slot_info()["free"] == 0
    with pytest.raises(Overloaded):
        engine.load_adapter("z", prepared["all8rs"])
    engine.unload_adapter("x")
    engine.unload_adapter("x")                                        # idempotent
    assert engine.load_adapter("z", prepared["all8rs"]) == s0        # the freed slot
    assert {m: t.data_ptr() for m, t in engine.slots.a.items()} == ptrs
    assert engine.slot_info()["slot_bytes"] == nbytes
    assert engine.slot_info()["loaded"] == {"y": s1, "z": s0}


def test_unload_refused_while_a_request_uses_the_adapter(llama, engine):
    _, adapters = llama
    engine.load_adapter("x", engine.prepare_adapter(*load_adapter_dir(adapters["qv4"])))
    engine.add_request("r", [1, 2, 3], "x", SamplingParams(max_tokens=2))
    with pytest.raises(Conflict):
        engine.unload_adapter("x")
    while engine.has_work():
        engine.step()
    engine.unload_adapter("x")
    assert engine.slot_info()["loaded"] == {}
    with pytest.raises(ModelNotFound):
        engine.add_request("r2", [1, 2, 3], "x", SamplingParams(max_tokens=2))


def _greedy_logits(engine, adapter):
    seen = []
    engine.logits_hook = lambda ids, lg: seen.append(lg[0].clone())
    engine.add_request("probe", [5, 6, 7, 8], adapter, SamplingParams(max_tokens=3,
                                                                        temperature=0))
    while engine.has_work():
        engine.step()
    return torch.stack(seen)


def test_a_reused_slot_keeps_nothing_of_its_previous_adapter(llama, engine):
    base, adapters = llama
    big = engine.prepare_adapter(*load_adapter_dir(adapters["all8rs"]))
    small = engine.prepare_adapter(*load_adapter_dir(adapters["qv4"]))
    slot = engine.load_adapter("big", big)
    engine.unload_adapter("big")
    assert engine.load_adapter("small", small) == slot
    fresh = Engine(EngineConfig(model_dir=base, device="cpu", max_slots=2, max_rank=16,
                                kv_cache_tokens=256))
    fresh.load_adapter("small", fresh.prepare_adapter(*load_adapter_dir(adapters["qv4"])))
    torch.testing.assert_close(_greedy_logits(engine, "small"), _greedy_logits(fresh, "small"),
                               rtol=0, atol=1e-6)


def _write_safetensors(path, header: dict, data: bytes, pad_to: int = 8) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % pad_to)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_safetensors_reader_matches_the_library(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(4, 2).to(torch.bfloat16),
               "f16": torch.randn(7).to(torch.float16), "empty": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    got = read_safetensors(tmp_path / "a.safetensors")
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_safetensors_reader_copies_a_misaligned_tensor(tmp_path):
    """A writer that does not pad its header leaves fp32 data at an odd offset."""
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    header = {"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    _write_safetensors(tmp_path / "odd.safetensors", header, t.numpy().tobytes(), pad_to=1)
    assert (8 + len(json.dumps(header))) % 4        # really misaligned
    assert torch.equal(read_safetensors(tmp_path / "odd.safetensors")["x"], t)


@pytest.mark.parametrize("header, data, problem", [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, "holds 16 bytes"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "holds 8 bytes"),
    ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape must"),
    ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
    ({"x": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "missing field"),
    ([1, 2], b"", "start with '{'"),
])
def test_safetensors_reader_refuses_broken_files(tmp_path, header, data, problem):
    path = tmp_path / "bad.safetensors"
    _write_safetensors(path, header, data)
    with pytest.raises(InvalidAdapter) as info:
        read_safetensors(path)
    assert info.value.code == "invalid_adapter" and problem in info.value.message


def test_safetensors_reader_refuses_a_bad_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10 ** 6).to_bytes(8, "little") + b"{}")
    with pytest.raises(InvalidAdapter, match="runs past the end"):
        read_safetensors(path)
    path.write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        read_safetensors(path)
    path.write_bytes(b"\x01\x00")
    with pytest.raises(InvalidAdapter, match="8-byte"):
        read_safetensors(path)


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_prepared_layout_is_every_layer_stacked_with_zero_padding(llama, engine, tmp_path,
                                                                  source_dtype):
    """A module on every layer at one rank, one on some layers, one with a smaller rank: each
    stacked over layers as A and scale·Bᵀ, zero where a layer has less, in one buffer."""
    base, _ = llama
    path = make_peft_adapter(base, tmp_path / "a", r=8, target_modules=["q_proj", "up_proj",
                             "o_proj"], rank_pattern={"o_proj": 4},
                             alpha_pattern={"up_proj": 5})
    config, tensors = load_adapter_dir(path)
    tensors = {k: v.to(source_dtype) for k, v in tensors.items()}
    tensors = {k: v for k, v in tensors.items() if not ("layers.0." in k and "up_proj" in k)}
    prep = engine.prepare_adapter(config, tensors)
    layers = engine.args.num_layers
    assert prep.modules == ("q_proj", "o_proj", "up_proj") and prep.rank == 8
    assert prep.nbytes == sum(t.numel() * 4 for t in (*prep.a.values(), *prep.b.values()))
    for m, r in (("q_proj", 8), ("o_proj", 4), ("up_proj", 8)):
        assert prep.a[m].shape[:2] == prep.b[m].shape[:2] == (layers, r)
        assert prep.a[m].untyped_storage().data_ptr() == prep.buffer.untyped_storage().data_ptr()
        scale = {"q_proj": 16 / 8, "o_proj": 16 / 4, "up_proj": 5 / 8}[m]   # lora_alpha 16
        sec = "mlp" if m == "up_proj" else "self_attn"
        for layer in range(layers):
            key = f"base_model.model.model.layers.{layer}.{sec}.{m}"
            if f"{key}.lora_A.weight" not in tensors:
                assert not prep.a[m][layer].any() and not prep.b[m][layer].any()
                continue
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            assert torch.equal(prep.a[m][layer], a.float())
            assert torch.equal(prep.b[m][layer], b.float().t() * scale)
