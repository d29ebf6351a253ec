"""Where the demo's files are, and what its manifest says about them (no torch needed)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BASE_MODEL_NAME", "MANIFEST", "DemoAdapter", "DemoPaths", "load_demo"]

BASE_MODEL_NAME = "quiver-demo/char-llama"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DemoAdapter:
    """One demo adapter: a PEFT LoRA folder plus what the router and the tests need to know."""

    name: str
    repo: str
    dir: Path
    task_description: str
    examples: list[str]
    test_pairs: list[tuple[str, str]]
    accuracy: float | None = None


@dataclass(frozen=True)
class DemoPaths:
    """The demo's base model folder, its adapters and the base model's own test pairs."""

    root: Path
    base_model: str
    base_dir: Path
    adapters: list[DemoAdapter]
    base_test_pairs: list[tuple[str, str]]
    base_accuracy: float | None = None
    extra: dict = field(default_factory=dict)

    def adapter(self, name_or_repo: str) -> DemoAdapter:
        """The adapter called ``name_or_repo`` (``"shout"`` or ``"demo/shout"``)."""
        for a in self.adapters:
            if name_or_repo in (a.name, a.repo):
                return a
        raise KeyError(f"no demo adapter {name_or_repo!r}; have {[a.name for a in self.adapters]}")


def _pairs(raw: list) -> list[tuple[str, str]]:
    return [(str(p), str(a)) for p, a in raw]


def load_demo(root: Path) -> DemoPaths:
    """Read ``root/manifest.json``; raise FileNotFoundError when the demo is not built there."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text())
    adapters = [
        DemoAdapter(name=a["name"], repo=a["repo"], dir=root / a["dir"],
                    task_description=a["task_description"], examples=list(a["examples"]),
                    test_pairs=_pairs(a["test_pairs"]), accuracy=a.get("accuracy"))
        for a in manifest["adapters"]
    ]
    known = {"base_model", "base_dir", "adapters", "base_test_pairs", "base_accuracy"}
    return DemoPaths(root=root, base_model=manifest["base_model"],
                     base_dir=root / manifest["base_dir"], adapters=adapters,
                     base_test_pairs=_pairs(manifest["base_test_pairs"]),
                     base_accuracy=manifest.get("base_accuracy"),
                     extra={k: v for k, v in manifest.items() if k not in known})
