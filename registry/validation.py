"""What the registry accepts in a push, checked before a version exists.

Two layers: :func:`check_manifest` looks only at names and sizes (path traversal, pickles by
extension, size limits, the files an adapter needs); :func:`inspect_adapter` reads the bytes it
needs through a :class:`FileSource` (safetensors headers, JSON files, pickle magic) and checks the
adapter against its base model, returning the facts stored with the version.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from quiver.errors import InvalidAdapter, InvalidRequest, PayloadTooLarge, UnsafeFile
from quiver.registry.compat import (adapter_stats, check_adapter_against_base,
                                    validate_adapter_config)
from quiver.registry.models import ManifestFile, PushMetadata
from quiver.registry.safetensors_check import (HEADER_CAP, TensorMeta, check_file_name,
                                               header_length, is_pickle,
                                               parse_safetensors_header)
from quiver.wire import BaseModelInfo

__all__ = ["FileSource", "check_manifest", "inspect_adapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True, slots=True)
class FileSource:
    """How to read the start of one pushed file, wherever it is held."""

    path: str
    size: int
    read_prefix: Callable[[int], Awaitable[bytes]]


def check_manifest(meta: PushMetadata, files: list[ManifestFile], *, max_file_bytes: int,
                   max_push_bytes: int) -> list[ManifestFile]:
    """Check names, kinds and sizes of the files of a push, before any byte is read; returns
    the files with normalised paths."""
    seen: set[str] = set()
    out = []
    for f in files:
        f = f.model_copy(update={"path": check_file_name(f.path)})
        out.append(f)
        if f.path in seen:
            raise InvalidRequest(f"file {f.path!r} listed twice", details={"path": f.path})
        seen.add(f.path)
        if f.size > max_file_bytes:
            raise PayloadTooLarge(f"{f.path!r} is {f.size} bytes; the limit is {max_file_bytes}",
                                  details={"path": f.path, "size": f.size, "limit": max_file_bytes})
    total = sum(f.size for f in files)
    if total > max_push_bytes:
        raise PayloadTooLarge(f"the push holds {total} bytes; the limit is {max_push_bytes}",
                              details={"size": total, "limit": max_push_bytes})
    required = [ADAPTER_WEIGHTS] + ([ADAPTER_CONFIG] if meta.adapter_type != "turbo" else [])
    missing = [name for name in required if name not in seen]
    if missing:
        raise InvalidAdapter(f"an adapter needs {', '.join(missing)}",
                             details={"missing": missing})
    return out


_FIRST_READ = 256 * 1024      # holds the whole header of most adapters: one read, not two


async def _safetensors_tensors(src: FileSource) -> dict[str, TensorMeta]:
    """The tensor table of a safetensors file, read with one ranged read (two for a header
    longer than ``_FIRST_READ``)."""
    prefix = await src.read_prefix(min(_FIRST_READ, src.size))
    n = header_length(prefix) if src.size >= 8 else 0
    if src.size < 8 or n > HEADER_CAP or 8 + n > src.size:
        return parse_safetensors_header(prefix, src.size, file_name=src.path)  # raises
    if 8 + n > len(prefix):
        prefix = await src.read_prefix(8 + n)
    return parse_safetensors_header(prefix, src.size, file_name=src.path)


async def _json(src: FileSource, max_json_bytes: int) -> Any:
    if src.size > max_json_bytes:
        raise PayloadTooLarge(f"{src.path!r} is larger than {max_json_bytes} bytes",
                              details={"path": src.path, "limit": max_json_bytes})
    raw = await src.read_prefix(src.size)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{src.path!r} is not valid JSON: {exc}",
                             details={"path": src.path}) from None


async def inspect_adapter(meta: PushMetadata, sources: Mapping[str, FileSource],
                          base: BaseModelInfo, *, max_json_bytes: int) -> dict[str, Any]:
    """Check every file's content and the adapter against ``base``; return the version facts.

    Raises InvalidAdapter, UnsafeFile or ONE IncompatibleAdapter listing every problem.
    """
    tensors: dict[str, TensorMeta] = {}
    config: Any = None
    for path, src in sources.items():
        lower = path.lower()
        if lower.endswith(".safetensors"):
            found = await _safetensors_tensors(src)
            if path == ADAPTER_WEIGHTS:
                tensors = found
        elif lower.endswith(".json"):
            parsed = await _json(src, max_json_bytes)
            if path == ADAPTER_CONFIG:
                config = parsed
        elif src.size and is_pickle(await src.read_prefix(min(src.size, 64))):
            raise UnsafeFile(f"refused {path!r}: it is a pickle", details={"path": path})
    facts: dict[str, Any] = {"base_model_revision": base.revision}
    if tensors:
        facts["parameter_count"], facts["dtype"] = adapter_stats(tensors)
    if meta.adapter_type == "turbo":
        return facts
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{ADAPTER_CONFIG} must hold a JSON object",
                             details={"path": ADAPTER_CONFIG})
    peft = validate_adapter_config(config)
    check_adapter_against_base(peft, tensors, base)
    facts["peft"] = peft.model_dump()
    if config.get("revision") and not base.revision:
        facts["base_model_revision"] = str(config["revision"])
    return facts
