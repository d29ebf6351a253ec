"""Reading example prompts for ``push --examples FILE``.

Accepted: JSONL (``{"text": ...}`` objects, or JSON strings, one per line), a JSON array of the
same, CSV with a ``text`` column (or ``prompt``/``example``/``query``), or plain text with one
prompt per line. Blank lines are skipped.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from quiver.errors import InvalidRequest

__all__ = ["read_examples", "TEXT_KEYS"]

TEXT_KEYS = ("text", "prompt", "example", "query", "input")


def _text_of(item: object, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in TEXT_KEYS:
            if isinstance(item.get(key), str):
                return item[key]
    raise InvalidRequest(f"{where}: expected a string or an object with a 'text' field",
                         details={"where": where})


def read_examples(path: str | Path) -> list[str]:
    """The example prompts in ``path``, in file order."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InvalidRequest(f"cannot read examples file {path}: {exc.strerror}",
                             details={"path": str(path)}) from exc
    suffix = path.suffix.lower()
    stripped = raw.lstrip()
    if suffix == ".csv":
        out = _from_csv(raw, path)
    elif suffix == ".json" or (suffix != ".jsonl" and stripped.startswith("[")):
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequest(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, list):
            raise InvalidRequest(f"{path}: expected a JSON array of examples")
        out = [_text_of(item, f"{path} item {i}") for i, item in enumerate(data)]
    elif suffix == ".jsonl" or stripped.startswith("{"):
        out = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise InvalidRequest(f"{path}:{n}: not valid JSON ({exc})",
                                     details={"line": n}) from exc
            out.append(_text_of(item, f"{path}:{n}"))
    else:
        out = [line.strip() for line in raw.splitlines()]
    return [t for t in (s.strip() for s in out) if t]


def _from_csv(raw: str, path: Path) -> list[str]:
    reader = csv.DictReader(io.StringIO(raw))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    column = next((reader.fieldnames[fields.index(k)] for k in TEXT_KEYS if k in fields), None)
    if column is None:
        raise InvalidRequest(f"{path}: a CSV of examples needs a 'text' column "
                             f"(found {reader.fieldnames})", details={"columns": reader.fieldnames})
    return [row.get(column) or "" for row in reader]
