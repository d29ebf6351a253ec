"""Moving adapters between Quiver and Hugging Face-style PEFT folders.

``import_hf`` pushes a local PEFT folder, or a Hub repo already in the local Hugging Face cache
(read offline, never downloaded), as a new version. ``export_hf`` writes a folder that
``PeftModel.from_pretrained`` loads: ``adapter_config.json``, ``adapter_model.safetensors`` and
a model card ``README.md``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from quiver.errors import InvalidAdapter, InvalidRequest, NotFound, UnsafeFile
from quiver.refs import parse_repo
from quiver.wire import VersionInfo

__all__ = ["import_hf", "export_hf", "find_hf_folder", "model_card"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PICKLES = ("adapter_model.bin", "pytorch_model.bin")


def find_hf_folder(source: str, revision: str | None = None,
                   hf_cache_dir: str | Path | None = None) -> tuple[Path, str | None]:
    """The adapter folder for ``source`` and its HF repo id (None for a plain folder)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, None
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(source, revision=revision, local_files_only=True,
                                   cache_dir=str(hf_cache_dir) if hf_cache_dir else None)
    except Exception as exc:  # huggingface_hub raises several kinds for "not cached"
        raise NotFound(f"{source!r} is neither a folder nor a repo in the local Hugging Face "
                       f"cache ({type(exc).__name__})", details={"source": source}) from exc
    return Path(folder), source


def _front_matter(readme: str) -> tuple[dict[str, Any], str]:
    if not readme.startswith("---"):
        return {}, readme
    end = readme.find("\n---", 3)
    if end < 0:
        return {}, readme
    meta: dict[str, Any] = {}
    for line in readme[3:end].splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and not key.startswith((" ", "-")):
            meta[key.strip()] = value.strip().strip("'\"")
    return meta, readme[end + 4:]


def _first_paragraph(body: str) -> str | None:
    for block in re.split(r"\n\s*\n", body):
        text = " ".join(line.strip() for line in block.strip().splitlines())
        if text and not text.startswith(("#", "<", "|", "```", "-", "*")):
            return text[:500]
    return None


def _repo_name(text: str) -> str:
    parts = [re.sub(r"[^a-z0-9._-]+", "-", p.lower()).strip("-._") for p in text.split("/")][-2:]
    parts = [p if re.search(r"[a-z]", p) else f"adapter-{p}" for p in parts if p]
    return parse_repo("/".join(parts) or "adapter")


def import_hf(client, source: str, *, repo: str | None = None, base_model: str | None = None,
              revision: str | None = None, description: str | None = None, examples=None,
              aliases: list[str] | None = None, progress: bool = False,
              hf_cache_dir: str | Path | None = None) -> VersionInfo:
    """Push the PEFT adapter at ``source`` (folder or cached HF repo id) as a new version."""
    folder, hub_id = find_hf_folder(source, revision, hf_cache_dir)
    if not (folder / CONFIG).is_file():
        raise InvalidAdapter(f"{folder} has no {CONFIG}", details={"path": str(folder)})
    if not (folder / WEIGHTS).is_file():
        if any((folder / p).exists() for p in _PICKLES):
            raise UnsafeFile(f"{folder} holds pickled weights only; Quiver accepts safetensors. "
                             "Convert them with a trusted tool first.",
                             details={"path": str(folder)})
        raise InvalidAdapter(f"{folder} has no {WEIGHTS}", details={"path": str(folder)})
    try:
        config = json.loads((folder / CONFIG).read_text())
    except ValueError as exc:
        raise InvalidAdapter(f"{folder / CONFIG} is not valid JSON: {exc}") from exc
    card: dict[str, Any] = {}
    body = ""
    if (folder / "README.md").is_file():
        card, body = _front_matter((folder / "README.md").read_text(errors="replace"))
    base = base_model or card.get("base_model") or config.get("base_model_name_or_path")
    if not base:
        raise InvalidRequest("cannot tell the base model: pass --base-model NAME")
    target = repo or _repo_name(hub_id or folder.resolve().name)
    labels = {"source": f"hf:{hub_id}" if hub_id else "folder"}
    with tempfile.TemporaryDirectory(prefix="quiver-import-") as tmp:
        for name in (CONFIG, WEIGHTS):
            shutil.copyfile(folder / name, Path(tmp) / name)
        return client.push(tmp, target, base_model=base, examples=examples,
                           description=description or _first_paragraph(body),
                           aliases=aliases, labels=labels, progress=progress)


def model_card(info: VersionInfo) -> str:
    """A Hugging Face model card for one version."""
    lines = ["---", f"base_model: {info.base_model}", "library_name: peft", "tags:",
             "- lora", "- quiver", "---", "", f"# {info.repo} (version {info.version})", ""]
    if info.description:
        lines += [info.description, ""]
    if info.task_description:
        lines += [f"Task: {info.task_description}", ""]
    lines += [f"Exported from Quiver `{info.ref}`, revision `{info.revision}`.", ""]
    if info.peft:
        lines += [f"LoRA rank {info.peft.r}, alpha {info.peft.lora_alpha}, modules "
                  f"{', '.join(info.peft.target_modules)}.", ""]
    if info.examples:
        lines += ["## Example prompts", ""] + [f"- {e}" for e in info.examples[:20]] + [""]
    return "\n".join(lines)


def export_hf(client, ref: str, out: Path) -> Path:
    """Write version ``ref`` as a folder ``PeftModel.from_pretrained`` loads."""
    info = client.resolve(ref)
    names = {f.path for f in info.files}
    if CONFIG not in names or WEIGHTS not in names:
        raise InvalidAdapter(f"{info.ref} lacks {CONFIG} or {WEIGHTS}; it cannot be exported as "
                             "a PEFT folder", details={"files": sorted(names)})
    out = Path(out)
    client.download_version(info, out)
    cfg_path = out / CONFIG
    cfg = json.loads(cfg_path.read_text())
    if not cfg.get("base_model_name_or_path"):
        cfg["base_model_name_or_path"] = info.base_model
        cfg_path.write_text(json.dumps(cfg, indent=2))
    (out / "README.md").write_text(model_card(info))
    return out
