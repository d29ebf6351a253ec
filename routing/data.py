"""Routing inputs: labelled example files and the text of a chat that gets embedded.

Labelled files are JSONL (one object per line) or CSV with a header; the text column is
``text`` (or ``prompt``), the label column ``label`` (or ``category``, ``intent``, ``adapter``).
A label of ``oos`` (case-insensitive) marks an out-of-scope example.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from quiver.errors import InvalidRequest

__all__ = ["LabelledExample", "OOS_LABEL", "EmbedPart", "load_labelled", "prompt_text"]

OOS_LABEL = "oos"
EmbedPart = Literal["last_user", "system_and_last_user", "system", "all"]

_TEXT_KEYS = ("text", "prompt", "query", "utterance")
_LABEL_KEYS = ("label", "category", "intent", "adapter")


@dataclass(frozen=True, slots=True)
class LabelledExample:
    text: str
    label: str

    @property
    def out_of_scope(self) -> bool:
        return self.label.lower() == OOS_LABEL


def _pick(row: dict, keys: Sequence[str], what: str, where: str) -> str:
    for key in keys:
        if key in row and row[key] is not None:
            return str(row[key])
    raise InvalidRequest(f"{where}: no {what} column (one of {', '.join(keys)})",
                         details={"columns": sorted(row)})


def load_labelled(path: str | Path) -> list[LabelledExample]:
    """Read a labelled ``.jsonl`` or ``.csv`` file; blank texts are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"no such file: {path}", details={"path": str(path)})
    rows: list[dict] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise InvalidRequest(f"{path}:{n}: not JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise InvalidRequest(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    else:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{path} row {n}"
        text = _pick(row, _TEXT_KEYS, "text", where).strip()
        label = _pick(row, _LABEL_KEYS, "label", where).strip()
        if text and label:
            out.append(LabelledExample(text, label))
    if not out:
        raise InvalidRequest(f"{path}: no labelled examples", details={"path": str(path)})
    return out


def prompt_text(prompt: str | None = None, messages: Sequence[dict] | None = None,
                part: EmbedPart = "last_user", max_chars: int = 4000) -> str:
    """The text a router embeds for a prompt or a chat, cut to ``max_chars`` characters.

    ``last_user`` (the default) is the last user turn, which carries the request;
    ``system_and_last_user`` prefixes the system prompt; ``system`` is the system prompt alone
    (falling back to the last user turn); ``all`` joins every turn.
    """
    if prompt is not None and messages:
        raise InvalidRequest("give either prompt or messages, not both")
    if prompt is not None:
        text = prompt
    elif messages:
        turns = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # OpenAI content parts
                content = " ".join(p.get("text", "") for p in content
                                   if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                content = "" if content is None else None
            if content is None:
                raise InvalidRequest(f"messages[{i}].content must be text",
                                     details={"param": f"messages[{i}].content"})
            turns.append((str(m.get("role", "user")), content))
        system = " ".join(c for r, c in turns if r in ("system", "developer") and c.strip())
        users = [c for r, c in turns if r == "user" and c.strip()]
        last_user = users[-1] if users else ""
        if part == "last_user":
            text = last_user
        elif part == "system":
            text = system or last_user
        elif part == "system_and_last_user":
            text = f"{system}\n{last_user}" if system else last_user
        else:
            text = "\n".join(c for _, c in turns if c.strip())
    else:
        raise InvalidRequest("a prompt or messages is required", details={"param": "prompt"})
    text = text.strip()
    if not text:
        raise InvalidRequest("the prompt is empty", details={"param": "prompt"})
    return text[:max_chars]
