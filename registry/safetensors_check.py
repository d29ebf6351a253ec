"""Strict checks on uploaded files before anything is stored: safetensors headers, pickles, names.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON, then the
raw tensor data. :func:`parse_safetensors_header` needs only the first ``8 + N`` bytes and the
file size, and is stricter than the reference reader: besides everything it refuses (header over
the cap, offsets past the data, gaps, overlaps, sizes that disagree with dtype × shape, trailing
bytes, non-string metadata, unknown dtypes) it also refuses whitespace before the JSON object,
duplicate keys and unknown fields, which the reference reader lets through.

Pickled checkpoints (``.bin``, ``.pt``, ...) are never accepted: loading one runs arbitrary code.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from quiver.errors import InvalidAdapter, UnsafeFile

__all__ = [
    "TensorMeta", "HEADER_CAP", "DTYPE_BITS", "parse_safetensors_header", "header_length",
    "is_pickle", "check_file_name", "ALLOWED_SUFFIXES", "PICKLE_SUFFIXES",
]

HEADER_CAP = 100 * 1024 * 1024
"""Largest header accepted, in bytes (the reference reader's limit is 100 MB)."""

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
"""Bits per element of every dtype a safetensors file may declare."""

_MAX_RANK = 16
_MAX_PROBLEMS = 1000
_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """One tensor as its header declares it."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = field(default=0, compare=False)   # where its bytes start in the data section

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _refuse(problem: str, file_name: str | None, tensor: str | None = None,
            problems: list[dict[str, Any]] | None = None) -> InvalidAdapter:
    listed = problems if problems is not None else [{"tensor": tensor, "problem": problem}]
    where = f"{file_name}: " if file_name else ""
    head = listed[0]["problem"]
    more = f" (and {len(listed) - 1} more problem(s))" if len(listed) > 1 else ""
    return InvalidAdapter(f"{where}invalid safetensors file: {head}{more}",
                          details={"file": file_name, "problems": listed})


def header_length(prefix8: bytes) -> int:
    """The JSON header length ``N`` a safetensors file declares in its first 8 bytes."""
    if len(prefix8) < 8:
        raise _refuse(f"file is {len(prefix8)} bytes, shorter than the 8-byte header length",
                      None)
    return struct.unpack("<Q", prefix8[:8])[0]


def parse_safetensors_header(data_prefix: bytes, file_size: int, *, max_header: int = HEADER_CAP,
                             file_name: str | None = None) -> dict[str, TensorMeta]:
    """Validate a safetensors header and return its tensors, in file order.

    ``data_prefix`` holds at least the first ``8 + N`` bytes of the file, ``file_size`` is the
    whole file's size. Raises InvalidAdapter whose ``details`` is ``{"file", "problems": [
    {"tensor", "problem"}, ...]}``, listing every problem found in the tensor table.
    """
    if file_size < 8:
        raise _refuse(f"file is {file_size} bytes, shorter than the 8-byte header length",
                      file_name)
    n = header_length(data_prefix)
    if n > max_header:
        raise _refuse(f"header of {n} bytes is over the {max_header}-byte cap", file_name)
    if 8 + n > file_size:
        raise _refuse(f"header of {n} bytes runs past the end of a {file_size}-byte file",
                      file_name)
    if len(data_prefix) < 8 + n:
        raise ValueError(f"need the first {8 + n} bytes of the file, got {len(data_prefix)}")
    raw = bytes(data_prefix[8:8 + n])
    if n > _MEMO_MAX_HEADER:
        return dict(_parse_table(raw, file_size, file_name))
    return dict(_parse_table_memo(raw, file_size, file_name))


def _parse_table(raw: bytes, file_size: int,
                 file_name: str | None) -> tuple[tuple[str, TensorMeta], ...]:
    """The tensor table of header JSON ``raw`` in a ``file_size``-byte file, in file order."""
    n = len(raw)
    if not raw.startswith(b"{"):
        raise _refuse("header must start with '{' (no leading whitespace)", file_name)
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise _refuse("header is not valid UTF-8", file_name) from None
    except _DuplicateKey as exc:
        raise _refuse(f"duplicate key {exc.args[0]!r} in header", file_name,
                      tensor=exc.args[0]) from None
    except (ValueError, RecursionError) as exc:
        raise _refuse(f"header is not valid JSON: {exc}", file_name) from None
    if not isinstance(header, dict):
        raise _refuse("header must be a JSON object", file_name)

    problems: list[dict[str, Any]] = []

    def problem(tensor: str | None, text: str) -> None:
        if len(problems) < _MAX_PROBLEMS:
            problems.append({"tensor": tensor, "problem": text})

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        problem("__metadata__", "__metadata__ must be an object of strings")
    else:
        for key, value in metadata.items():
            if not isinstance(value, str):
                problem("__metadata__", f"metadata value for {key!r} is not a string")

    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorMeta] = {}
    for name, entry in header.items():
        if not name:
            problem(name, "empty tensor name")
            continue
        if not isinstance(entry, dict):
            problem(name, "tensor entry must be an object")
            continue
        if entry.keys() != _TENSOR_FIELDS:
            extra = sorted(set(entry) - _TENSOR_FIELDS)
            missing = sorted(_TENSOR_FIELDS - set(entry))
            if extra:
                problem(name, f"unknown field(s) {extra}")
            if missing:
                problem(name, f"missing field(s) {missing}")
                continue
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        ok = True
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            problem(name, f"unknown dtype {dtype!r}")
            ok = False
        if (type(shape) is not list or len(shape) > _MAX_RANK
                or not all(type(d) is int and d >= 0 for d in shape)):   # bool is no int here
            problem(name, f"shape must be a list of at most {_MAX_RANK} non-negative integers, "
                          f"got {shape!r}")
            ok = False
        if (type(offsets) is not list or len(offsets) != 2
                or not (type(offsets[0]) is int and type(offsets[1]) is int)
                or not 0 <= offsets[0] <= offsets[1]):
            problem(name, f"data_offsets must be [begin, end] with 0 <= begin <= end, "
                          f"got {offsets!r}")
            ok = False
        if not ok:
            continue
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8:
            problem(name, f"{dtype} × {shape} is not a whole number of bytes")
            continue
        nbytes = bits // 8
        begin, end = offsets
        if end - begin != nbytes:
            problem(name, f"holds {end - begin} bytes, {dtype} × {shape} needs {nbytes}")
        spans.append((begin, end, name))
        tensors[name] = TensorMeta(dtype, tuple(shape), nbytes, begin)

    data_size = file_size - 8 - n
    cursor = 0
    for begin, end, name in sorted(spans):
        if begin > cursor:
            problem(name, f"gap of {begin - cursor} bytes before this tensor (at {cursor})")
        elif begin < cursor:
            problem(name, f"overlaps the previous tensor (starts at {begin}, previous ends at "
                          f"{cursor})")
        cursor = max(cursor, end)
    if cursor > data_size:
        problem(None, f"tensor data ends at {cursor}, past the {data_size}-byte data section")
    elif cursor < data_size:
        problem(None, f"{data_size - cursor} trailing bytes after the last tensor")

    if problems:
        raise _refuse(problems[0]["problem"], file_name, problems=problems)
    order = {name: begin for begin, _, name in spans}
    return tuple(sorted(tensors.items(), key=lambda item: order[item[0]]))


# The registry parses a weights file's header when its first part arrives and again when the
# push is committed: the table of the same bytes is kept for the second look (headers up to
# 1 MiB, the last few files; a refused header is parsed again, and refused again, each time).
_MEMO_MAX_HEADER = 1 << 20
_parse_table_memo = functools.lru_cache(maxsize=8)(_parse_table)


# --- pickles -----------------------------------------------------------------------------------

_PICKLE_PROTO0 = re.compile(rb"^(\((dp|lp|tp)\d*\n|c[\w.]+\n[\w.]+\n|\(c[\w.]+\n)")


def is_pickle(prefix: bytes) -> bool:
    """True if ``prefix`` (the first bytes of a file) looks like a pickle or a torch checkpoint.

    Recognises pickle protocols 2–5 (``\\x80`` + protocol byte), protocol 0/1 openings, and the
    zip container ``torch.save`` writes (``PK\\x03\\x04``; also empty/spanned zip markers).
    """
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return True
    if prefix[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return True
    if prefix[:2] in (b"}q", b"]q", b"}(", b"](") and len(prefix) > 2:
        return True
    return bool(_PICKLE_PROTO0.match(prefix))


# --- file names --------------------------------------------------------------------------------

ALLOWED_SUFFIXES = frozenset({".safetensors", ".json", ".txt", ".md", ".model", ".tiktoken",
                              ".jinja", ".yaml", ".yml"})
"""Suffixes an adapter repository may hold (weights, configs, docs, tokenizer files)."""

ALLOWED_NAMES = frozenset({".gitattributes", "LICENSE", "NOTICE", "merges.txt", "vocab.txt",
                           "tokenizer.model", "spiece.model"})

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib",
                             ".npy", ".npz", ".dill", ".mar", ".h5", ".keras", ".onnx"})
"""Suffixes refused outright: formats whose loaders can run code or that are not weights for
PEFT (the error names safetensors as the accepted format)."""

_MAX_PATH = 512
_MAX_PART = 255
_MAX_DEPTH = 8
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.IGNORECASE)


def _unsafe(path: str, why: str) -> UnsafeFile:
    return UnsafeFile(f"refused file name {path!r}: {why}", details={"path": path, "problem": why})


def check_file_name(path: str) -> str:
    """Return ``path`` as a normalised relative POSIX path, or raise UnsafeFile.

    Refuses absolute paths, drive letters, ``..``, backslashes, control and invisible
    format characters (NUL, bidi overrides, zero-width), hidden files, names with leading or
    trailing spaces or dots, Windows device names, and any suffix outside
    :data:`ALLOWED_SUFFIXES`; pickle-style weights (``.bin``, ``.pt``, ...) get their own message.
    """
    if not isinstance(path, str) or not path:
        raise _unsafe(str(path), "empty file name")
    if len(path) > _MAX_PATH:
        raise _unsafe(path[:64] + "...", f"longer than {_MAX_PATH} characters")
    for ch in path:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            raise _unsafe(path, f"contains the invisible or control character U+{ord(ch):04X}")
    if "\\" in path:
        raise _unsafe(path, "backslashes are not path separators here")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise _unsafe(path, "absolute paths are not allowed")
    normal = unicodedata.normalize("NFC", path)
    parts = [p for p in normal.split("/") if p not in ("", ".")]
    if not parts:
        raise _unsafe(path, "no file name")
    if len(parts) > _MAX_DEPTH:
        raise _unsafe(path, f"nested deeper than {_MAX_DEPTH} folders")
    for part in parts:
        if part == "..":
            raise _unsafe(path, "'..' leaves the repository")
        if len(part.encode()) > _MAX_PART:
            raise _unsafe(path, f"a path component is longer than {_MAX_PART} bytes")
        if part != part.strip() or part.endswith("."):
            raise _unsafe(path, "a path component starts or ends with a space or ends with a dot")
        if part.startswith(".") and part not in ALLOWED_NAMES:
            raise _unsafe(path, "hidden files and folders are not allowed")
        if _WINDOWS_RESERVED.match(part):
            raise _unsafe(path, f"{part!r} is a reserved device name on Windows")
    name = parts[-1]
    lower = name.lower()
    suffix = lower[lower.rfind("."):] if "." in lower[1:] else ""
    if suffix in PICKLE_SUFFIXES:
        raise _unsafe(path, f"{suffix or name} files are refused (pickled weights run code when "
                            "loaded); upload safetensors")
    if name not in ALLOWED_NAMES and suffix not in ALLOWED_SUFFIXES:
        allowed = ", ".join(sorted(ALLOWED_SUFFIXES))
        raise _unsafe(path, f"file type {suffix or '(none)'} is not allowed; allowed: {allowed}")
    return "/".join(parts)
