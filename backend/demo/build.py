"""Train the demo: a tiny character-level Llama that copies, and LoRA adapters that transform.

    python -m quiver.backend.demo.build OUT_DIR [--seed 0] [--steps N]

writes ``OUT_DIR/base`` (a Hugging Face ``LlamaForCausalLM`` folder with its tokenizer),
``OUT_DIR/adapters/<name>`` (PEFT LoRA folders) and ``OUT_DIR/manifest.json`` (repos, task
descriptions, router example prompts, held-out test pairs and the exact-match accuracy that
greedy decoding with transformers + peft reached on them).

The base model and the adapters are trained together: every step draws one batch per task, runs
the copy batch with the adapters disabled and each transformation batch through its own adapter,
and updates the base weights and the LoRA weights from the summed loss. The base model alone
therefore copies the payload, and each adapter's weights alone decide its transformation. Then
the adapters named in ``TrainPlan.polish`` are fine-tuned alone with peft, the base frozen,
starting from the saved files.

With the defaults this is how the shipped ``assets/`` were made (one torch thread, seed 0):
about 55 minutes of joint training and 2 of polishing on a 2-core VM shared with other jobs,
so the files are shipped rather than built on demand. Instructions in the training data are
random, so the answer depends on the weights (base or adapter), never on the wording.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quiver.backend.demo.paths import BASE_MODEL_NAME, MANIFEST, DemoPaths, load_demo
from quiver.backend.demo.tasks import (
    COPY, EOS, PAD, TASKS, VOCAB, MAX_INSTRUCTION, MAX_PAYLOAD, Task, random_instruction,
    random_payload, render_prompt,
)
from quiver.backend.demo.tokenizer import write_tokenizer

__all__ = ["MODEL_CONFIG", "ADAPTER_CONFIGS", "TrainPlan", "build_demo", "ensure_demo",
           "evaluate_pairs", "polish_adapter", "main"]

MAX_LENGTH = 256
MODEL_CONFIG: dict[str, Any] = dict(
    vocab_size=len(VOCAB), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
    bos_token_id=VOCAB["<s>"], eos_token_id=VOCAB[EOS], pad_token_id=VOCAB[PAD],
)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Ranks and target sets differ on purpose, so the demo exercises mixed-rank serving.
ADAPTER_CONFIGS: dict[str, dict[str, Any]] = {
    "shout": dict(r=8, lora_alpha=16, target_modules=ATTENTION),
    "reverse": dict(r=16, lora_alpha=32, target_modules=ATTENTION + MLP),
    "json": dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", *MLP]),
    "label": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj",
                                                      "down_proj"]),
}
N_EXAMPLES = 20
N_TEST = 40


@dataclass(frozen=True)
class TrainPlan:
    steps: int = 1600
    batch_per_task: int = 16
    lr: float = 3e-3
    lora_lr: float = 4e-3
    warmup: int = 100
    seed: int = 0
    hidden_size: int = MODEL_CONFIG["hidden_size"]
    num_hidden_layers: int = MODEL_CONFIG["num_hidden_layers"]
    intermediate_size: int = MODEL_CONFIG["intermediate_size"]
    tasks: tuple[str, ...] = ("shout", "reverse", "json")
    # Then each of these adapters alone, base frozen, loaded back from the saved files.
    polish: tuple[str, ...] = ("reverse",)
    polish_steps: int = 400
    polish_lr: float = 1e-3

    def model_config(self) -> dict[str, Any]:
        return {**MODEL_CONFIG, "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers,
                "intermediate_size": self.intermediate_size}


# --- data ------------------------------------------------------------------------------------

def _encode(text: str) -> list[int]:
    unk = VOCAB["<unk>"]
    return [VOCAB.get(c, unk) for c in text]


def _sequence(task: Task, rng: random.Random, tasks: tuple[str, ...]
              ) -> tuple[list[int], list[int]]:
    payload = random_payload(rng)
    instruction = random_instruction(rng, tasks)
    prompt = [VOCAB["<s>"], *_encode(render_prompt(f"{instruction}: {payload}"))]
    answer = [*_encode(task.answer(payload)), VOCAB[EOS]]
    return prompt + answer, [-100] * len(prompt) + answer


def _batch(task: Task, rng: random.Random, size: int, tasks: tuple[str, ...]):
    import torch

    seqs = [_sequence(task, rng, tasks) for _ in range(size)]
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((size, width), VOCAB[PAD], dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    for i, (seq, lab) in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _test_pairs(task: Task, rng: random.Random, n: int) -> list[tuple[str, str]]:
    prompts = [f"{task.test_instructions[0]}: hello world"]
    while len(prompts) < n:
        instruction = task.test_instructions[len(prompts) % len(task.test_instructions)]
        prompt = f"{instruction}: {random_payload(rng, held_out=True)}"
        if prompt not in prompts:
            prompts.append(prompt)
    return [(p, task.answer(p.partition(": ")[2])) for p in prompts]


def _examples(task: Task, rng: random.Random) -> list[str]:
    from quiver.backend.demo.tasks import TRAIN_WORDS

    out = []
    for instruction in task.instructions[:N_EXAMPLES]:
        words = rng.sample(TRAIN_WORDS, rng.randint(1, 3))
        out.append(f"{instruction}: {' '.join(words)}"[: MAX_INSTRUCTION + MAX_PAYLOAD])
    return out


# --- model -----------------------------------------------------------------------------------

def _make_model(plan: TrainPlan):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(plan.seed)
    base = LlamaForCausalLM(LlamaConfig(**plan.model_config()))
    model = None
    for name in plan.tasks:
        cfg = ADAPTER_CONFIGS[name]
        lora = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **cfg)
        if model is None:
            model = get_peft_model(base, lora, adapter_name=name)
        else:
            model.add_adapter(name, lora)
    assert model is not None
    for p in model.parameters():  # the base model trains too
        p.requires_grad_(True)
    return model


def _train(model, plan: TrainPlan, log) -> None:
    import torch

    rng = random.Random(plan.seed)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    opt = torch.optim.AdamW([{"params": base, "lr": plan.lr}, {"params": lora, "lr": plan.lora_lr}],
                            betas=(0.9, 0.98), weight_decay=0.0)
    peak = [g["lr"] for g in opt.param_groups]
    tasks = [COPY, *(TASKS[name] for name in plan.tasks)]
    model.train()
    started = time.monotonic()
    running = {t.name: 0.0 for t in tasks}
    for step in range(plan.steps):
        warm = min(1.0, (step + 1) / plan.warmup)
        decay = 0.5 * (1 + math.cos(math.pi * step / plan.steps))
        for g, lr in zip(opt.param_groups, peak):
            g["lr"] = lr * warm * (0.05 + 0.95 * decay)
        for task in tasks:
            batch = _batch(task, rng, plan.batch_per_task, plan.tasks)
            if task is COPY:
                with model.disable_adapter():
                    loss = model(**batch).loss
            else:
                model.set_adapter(task.name)
                loss = model(**batch).loss
            loss.backward()
            running[task.name] = 0.9 * running[task.name] + 0.1 * loss.item()
        for p in model.parameters():
            p.requires_grad_(True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == plan.steps - 1:
            losses = " ".join(f"{k}={v:.3f}" for k, v in running.items())
            log(f"step {step}/{plan.steps} {losses} ({time.monotonic() - started:.0f}s)")


def polish_adapter(root: Path, manifest: dict, name: str, plan: TrainPlan, log) -> None:
    """Fine-tune one saved adapter with peft on its own task, base frozen; save it in place."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    entry = next(e for e in manifest["adapters"] if e["name"] == name)
    base = AutoModelForCausalLM.from_pretrained(root / manifest["base_dir"])
    model = PeftModel.from_pretrained(base, root / entry["dir"], is_trainable=True)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.AdamW(params, lr=plan.polish_lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(f"{plan.seed}/polish/{name}")
    task = TASKS[name]
    model.train()
    started = time.monotonic()
    running = 0.0
    for step in range(plan.polish_steps):
        for g in opt.param_groups:
            g["lr"] = plan.polish_lr * 0.5 * (1 + math.cos(math.pi * step / plan.polish_steps))
        loss = model(**_batch(task, rng, plan.batch_per_task, plan.tasks)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running = 0.9 * running + 0.1 * loss.item()
        if step % 50 == 0 or step == plan.polish_steps - 1:
            log(f"polish {name} step {step}/{plan.polish_steps} loss={running:.4f} "
                f"({time.monotonic() - started:.0f}s)")
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(Path(tmp) / "adapter_model.safetensors",
                        root / entry["dir"] / "adapter_model.safetensors")
    entry["polish_steps"] = plan.polish_steps


# --- evaluation ------------------------------------------------------------------------------

def evaluate_pairs(model, tokenizer, pairs: list[tuple[str, str]], *, batch: int = 64,
                   max_new_tokens: int = 48) -> tuple[float, list[tuple[str, str, str]]]:
    """Greedy-decode each prompt; return the exact-match rate and the (prompt, want, got) misses.

    ``model`` is a transformers model or a peft model with the adapter to test active.
    """
    import torch

    tokenizer.padding_side = "left"
    misses: list[tuple[str, str, str]] = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        enc = tokenizer([render_prompt(p) for p, _ in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        for (prompt, want), row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            got = tokenizer.decode(row, skip_special_tokens=True)
            if got != want:
                misses.append((prompt, want, got))
    return 1 - len(misses) / max(1, len(pairs)), misses


def _evaluate(root: Path, manifest: dict, log) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / manifest["base_dir"])
    base = AutoModelForCausalLM.from_pretrained(root / manifest["base_dir"]).eval()
    acc, misses = evaluate_pairs(base, tokenizer, manifest["base_test_pairs"])
    manifest["base_accuracy"] = acc
    log(f"base copy: {acc:.3f} exact {misses[:3]}")
    for entry in manifest["adapters"]:
        base = AutoModelForCausalLM.from_pretrained(root / manifest["base_dir"]).eval()
        model = PeftModel.from_pretrained(base, root / entry["dir"]).eval()
        acc, misses = evaluate_pairs(model, tokenizer, entry["test_pairs"])
        entry["accuracy"] = acc
        log(f"{entry['name']}: {acc:.3f} exact {misses[:3]}")


# --- building --------------------------------------------------------------------------------

def _save_adapter(model, name: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
        src = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for fname in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(src / fname, out / fname)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = BASE_MODEL_NAME
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _add_flat_rope_theta(config_path: Path) -> None:
    """Also write ``rope_theta`` at the top level, where transformers 4.x and engines read it."""
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta", MODEL_CONFIG["rope_theta"])
    config.setdefault("rope_theta", theta)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_demo(out_dir: Path, *, plan: TrainPlan = TrainPlan(), log=print) -> DemoPaths:
    """Train and write the whole demo into ``out_dir`` (replaced atomically); return its paths."""
    import torch

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model = _make_model(plan)
        _train(model, plan, log)
        model.eval()
        rng = random.Random(plan.seed + 1)
        entries = []
        for name in plan.tasks:
            task = TASKS[name]
            _save_adapter(model, name, work / "adapters" / name)
            cfg = ADAPTER_CONFIGS[name]
            entries.append({
                "name": name, "repo": task.repo, "dir": f"adapters/{name}",
                "task_description": task.description, "examples": _examples(task, rng),
                "test_pairs": _test_pairs(task, rng, N_TEST), "r": cfg["r"],
                "target_modules": cfg["target_modules"],
            })
        base = model.unload()
        base.config.architectures = ["LlamaForCausalLM"]
        base.to(torch.float32).save_pretrained(work / "base", safe_serialization=True)
        _add_flat_rope_theta(work / "base" / "config.json")
        write_tokenizer(work / "base", max_length=MAX_LENGTH)
        manifest = {
            "format": 1, "base_model": BASE_MODEL_NAME, "base_dir": "base", "seed": plan.seed,
            "train_steps": plan.steps, "tasks": list(plan.tasks),
            "batch_per_task": plan.batch_per_task,
            "model": {k: plan.model_config()[k] for k in ("hidden_size", "num_hidden_layers",
                                                          "intermediate_size")},
            "prompt_format": "<instruction>: <payload>\\n",
            "max_payload": MAX_PAYLOAD, "max_instruction": MAX_INSTRUCTION,
            "base_test_pairs": _test_pairs(COPY, rng, N_TEST), "adapters": entries,
        }
        for name in plan.polish:
            if name in plan.tasks:
                polish_adapter(work, manifest, name, plan, log)
        _evaluate(work, manifest, log)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return load_demo(out_dir)


def ensure_demo(cache_dir: Path, *, plan: TrainPlan = TrainPlan(), log=print) -> DemoPaths:
    """The demo built in ``cache_dir``, building it first if it is not there yet."""
    try:
        return load_demo(Path(cache_dir))
    except FileNotFoundError:
        return build_demo(Path(cache_dir), plan=plan, log=log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quiver.backend.demo.build",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=TrainPlan.seed)
    parser.add_argument("--steps", type=int, default=TrainPlan.steps)
    parser.add_argument("--batch", type=int, default=TrainPlan.batch_per_task)
    parser.add_argument("--tasks", default=",".join(TrainPlan.tasks),
                        help=f"adapters to train, from {','.join(ADAPTER_CONFIGS)}")
    parser.add_argument("--lr", type=float, default=TrainPlan.lr)
    parser.add_argument("--lora-lr", type=float, default=TrainPlan.lora_lr)
    parser.add_argument("--polish", default=",".join(TrainPlan.polish),
                        help="adapters fine-tuned alone afterwards, base frozen")
    parser.add_argument("--polish-steps", type=int, default=TrainPlan.polish_steps)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared machine)")
    parser.add_argument("--hidden", type=int, default=TrainPlan.hidden_size)
    parser.add_argument("--layers", type=int, default=TrainPlan.num_hidden_layers)
    parser.add_argument("--intermediate", type=int, default=TrainPlan.intermediate_size)
    args = parser.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if not tasks or set(tasks) - set(ADAPTER_CONFIGS):
        parser.error(f"--tasks takes names from {','.join(ADAPTER_CONFIGS)}, got {args.tasks!r}")
    import torch

    torch.set_num_threads(args.threads)
    plan = TrainPlan(steps=args.steps, seed=args.seed, batch_per_task=args.batch,
                     hidden_size=args.hidden, num_hidden_layers=args.layers,
                     intermediate_size=args.intermediate, lr=args.lr, lora_lr=args.lora_lr,
                     tasks=tasks, polish=tuple(t for t in args.polish.split(",") if t),
                     polish_steps=args.polish_steps)
    started = time.monotonic()
    paths = build_demo(args.out_dir, plan=plan, log=lambda m: print(m, flush=True))
    print(f"built {paths.root} in {time.monotonic() - started:.0f}s: base copy "
          f"{paths.base_accuracy:.3f}, " + ", ".join(f"{a.name} {a.accuracy:.3f}"
                                                   for a in paths.adapters), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
