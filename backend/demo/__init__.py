"""The tiny demo: a character-level Llama that copies text, and LoRA adapters that transform it.

    from quiver.backend.demo import demo_paths, render_prompt

    demo = demo_paths()
    demo.base_dir                      # Hugging Face LlamaForCausalLM folder with its tokenizer
    demo.adapter("demo/shout").dir     # PEFT LoRA folder
    render_prompt("shout it: hello")   # "shout it: hello\\n", the text the model completes

The base model repeats the payload after ``": "``; ``demo/shout`` upper-cases it,
``demo/reverse`` reverses it and ``demo/json`` answers ``{"words": N, "first": "<word>"}``,
whatever the instruction's wording. The files ship under ``assets/``; they are rebuilt with
``python -m quiver.backend.demo.build OUT_DIR`` (see :mod:`quiver.backend.demo.build`).
Importing this package needs no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quiver.backend.demo.paths import BASE_MODEL_NAME, DemoAdapter, DemoPaths, load_demo
from quiver.backend.demo.tasks import TASKS, render_prompt, split_prompt

if TYPE_CHECKING:
    from quiver.backend.demo.build import build_demo, ensure_demo

__all__ = ["ASSETS", "BASE_MODEL_NAME", "DemoAdapter", "DemoPaths", "TASKS", "build_demo",
           "demo_paths", "ensure_demo", "load_demo", "render_prompt", "split_prompt"]

ASSETS = Path(__file__).resolve().parent / "assets"


def demo_paths(cache_dir: Path | None = None) -> DemoPaths:
    """The shipped demo files; without them, the demo built once into ``cache_dir``.

    ``cache_dir`` defaults to ``~/.cache/quiver/demo``; building takes CPU minutes.
    """
    try:
        return load_demo(ASSETS)
    except FileNotFoundError:
        from quiver.backend.demo.build import ensure_demo

        return ensure_demo(cache_dir or Path.home() / ".cache" / "quiver" / "demo")


def __getattr__(name: str) -> Any:
    if name in ("build_demo", "ensure_demo"):
        from quiver.backend.demo import build

        return getattr(build, name)
    raise AttributeError(name)
