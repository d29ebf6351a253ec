"""The shipped demo: file formats and sizes, tokenizer, chat template, and what each model says."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import peft
import pytest
import torch
import transformers

from quiver.backend.demo import (
    ASSETS, BASE_MODEL_NAME, TASKS, demo_paths, ensure_demo, load_demo, render_prompt,
    split_prompt,
)
from quiver.backend.demo.tasks import MAX_PAYLOAD, random_instruction, random_payload

PROBE = "Please shout this: hello world"
SHIPPED = [a.name for a in load_demo(ASSETS).adapters] if (ASSETS / "manifest.json").exists() \
    else sorted(TASKS)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # A model this small decodes fastest on one thread, and much faster on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo():
    return demo_paths()


@pytest.fixture(scope="module")
def tokenizer(demo):
    return transformers.AutoTokenizer.from_pretrained(demo.base_dir)


def _safetensors_header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    end = max(t["data_offsets"][1] for t in header.values())
    assert 8 + n + end == len(raw), f"{path} has trailing or missing bytes"
    return header


def _greedy(model, tokenizer, prompts: list[str]) -> list[str]:
    tokenizer.padding_side = "left"
    enc = tokenizer([render_prompt(p) for p in prompts], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=40,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _load(demo, adapter_dir: Path | None = None):
    model = transformers.AutoModelForCausalLM.from_pretrained(demo.base_dir).eval()
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    return model


# --- files ------------------------------------------------------------------------------------

def test_shipped_files_are_small_safetensors_only(demo):
    files = [p for p in demo.root.rglob("*") if p.is_file()]
    assert demo.root == ASSETS
    assert sum(p.stat().st_size for p in files) < 20 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    config = json.loads((demo.base_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] <= 128 and config["hidden_size"] <= 256
    header = _safetensors_header(demo.base_dir / "model.safetensors")
    assert header["model.embed_tokens.weight"]["shape"] == [config["vocab_size"],
                                                             config["hidden_size"]]
    assert {t["dtype"] for t in header.values()} <= {"F32", "F16"}


def test_adapters_are_peft_lora_folders_with_mixed_ranks(demo):
    assert len(demo.adapters) >= 3
    assert len({a.repo for a in demo.adapters}) == len(demo.adapters)
    ranks = set()
    hidden = json.loads((demo.base_dir / "config.json").read_text())["hidden_size"]
    for a in demo.adapters:
        assert sorted(p.name for p in a.dir.iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors"]
        cfg = json.loads((a.dir / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == BASE_MODEL_NAME
        ranks.add(cfg["r"])
        header = _safetensors_header(a.dir / "adapter_model.safetensors")
        q_a = header["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        q_b = header["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        assert q_a["shape"] == [cfg["r"], hidden] and q_b["shape"][1] == cfg["r"]
        assert all(".lora_A." in n or ".lora_B." in n for n in header)
    assert len(ranks) >= 2


def test_manifest_lists_examples_and_held_out_test_pairs(demo):
    for a in demo.adapters:
        assert a.task_description and len(a.examples) >= 20
        assert len(set(a.examples)) == len(a.examples)
        assert len(a.test_pairs) >= 20 and a.accuracy is not None and a.accuracy >= 0.95
        task = TASKS[a.name]
        # Test prompts use wordings the examples never show.
        example_wordings = {split_prompt(e)[0] for e in a.examples}
        assert not {split_prompt(p)[0] for p, _ in a.test_pairs} & example_wordings
        for prompt, answer in a.test_pairs:
            assert task.answer(split_prompt(prompt)[1]) == answer
    assert demo.base_accuracy is not None and demo.base_accuracy >= 0.95


def test_ensure_demo_reuses_a_built_folder(demo, tmp_path):
    target = tmp_path / "demo"
    shutil.copytree(demo.root, target)
    again = ensure_demo(target)
    assert again.root == target and again.base_dir == target / "base"
    assert [a.repo for a in again.adapters] == [a.repo for a in demo.adapters]
    with pytest.raises(FileNotFoundError):
        load_demo(tmp_path / "missing")


# --- prompt format and tokenizer --------------------------------------------------------------

def test_render_and_split_prompt():
    assert render_prompt("shout it: hello") == "shout it: hello\n"
    assert render_prompt("shout it: hello\n") == "shout it: hello\n"
    assert split_prompt("Summarize as JSON: a b: c") == ("Summarize as JSON", "a b: c")
    with pytest.raises(ValueError):
        split_prompt("no separator here")


def test_tokenizer_is_character_level_and_round_trips(demo, tokenizer):
    import random

    rng = random.Random(7)
    config = json.loads((demo.base_dir / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"]
    for _ in range(50):
        text = render_prompt(f"{random_instruction(rng)}: {random_payload(rng)}")
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer("~ {x}!").input_ids[1:]) == "~ {x}!"
    assert tokenizer("é").input_ids[1:] == [tokenizer.unk_token_id]
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_chat_template_renders_the_prompt_format(tokenizer):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "Reverse this: hello world"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s>Reverse this: hello world\n"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tokenizer(render_prompt("Reverse this: hello world")).input_ids


# --- behaviour --------------------------------------------------------------------------------

def test_base_model_copies_whatever_the_instruction(demo, tokenizer):
    pairs = demo.base_test_pairs[:8]
    got = _greedy(_load(demo), tokenizer, [p for p, _ in pairs] + [PROBE])
    assert got[-1] == "hello world"
    assert sum(g == want for g, (_, want) in zip(got, pairs)) >= len(pairs) - 1


@pytest.mark.parametrize("name", SHIPPED)
def test_adapter_transforms_held_out_prompts(demo, tokenizer, name):
    adapter = demo.adapter(name)
    pairs = adapter.test_pairs[:8]
    got = _greedy(_load(demo, adapter.dir), tokenizer, [p for p, _ in pairs])
    assert got[0] == pairs[0][1]  # "<instruction>: hello world"
    assert sum(g == want for g, (_, want) in zip(got, pairs)) >= len(pairs) - 1


def test_the_adapter_weights_not_the_wording_decide_the_answer(demo, tokenizer):
    """One prompt worded for `shout`, four different answers: base and every adapter."""
    answers = {"base": _greedy(_load(demo), tokenizer, [PROBE])[0]}
    for a in demo.adapters:
        answers[a.name] = _greedy(_load(demo, a.dir), tokenizer, [PROBE])[0]
    assert answers["base"] == "hello world"
    for a in demo.adapters:
        assert answers[a.name] == TASKS[a.name].answer("hello world"), answers
    assert len(set(answers.values())) == len(answers)


def test_payload_limit_is_what_the_build_trained_on(demo):
    assert demo.extra["max_payload"] == MAX_PAYLOAD


def test_build_writes_a_loadable_demo(tmp_path):
    """The build pipeline end to end on a toy plan: folders, manifest, peft round trip."""
    from quiver.backend.demo.build import TrainPlan, build_demo

    plan = TrainPlan(steps=2, batch_per_task=2, hidden_size=32, num_hidden_layers=1,
                     intermediate_size=64, tasks=("shout", "reverse"), polish_steps=2)
    lines: list[str] = []
    built = build_demo(tmp_path / "toy", plan=plan, log=lines.append)
    assert [a.repo for a in built.adapters] == ["demo/shout", "demo/reverse"]
    assert built.adapter("reverse").accuracy is not None and built.base_accuracy is not None
    assert any(line.startswith("polish reverse") for line in lines)
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["toy"]  # no work dir left behind
    config = json.loads((built.base_dir / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["rope_theta"] == 10000.0
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(built.base_dir),
        built.adapter("shout").dir)
    assert model.peft_config["default"].r == 8
    assert ensure_demo(tmp_path / "toy").root == built.root
