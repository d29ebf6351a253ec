"""The strict safetensors header check, pickle sniffing and file-name policy."""

from __future__ import annotations

import io
import json
import pickle
import struct
from collections import OrderedDict

import pytest

from quiver.errors import InvalidAdapter, UnsafeFile
from quiver.registry.safetensors_check import (
    HEADER_CAP, TensorMeta, check_file_name, header_length, is_pickle, parse_safetensors_header,
)


def build(header: dict | bytes, data: bytes = b"", *, declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared is None else declared
    return struct.pack("<Q", n) + raw + data


def parse(blob: bytes, **kwargs) -> dict[str, TensorMeta]:
    return parse_safetensors_header(blob, len(blob), **kwargs)


def problems_of(blob: bytes, **kwargs) -> list[str]:
    with pytest.raises(InvalidAdapter) as info:
        parse(blob, **kwargs)
    assert info.value.code == "invalid_adapter"
    return [p["problem"] for p in info.value.details["problems"]]


def t(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = {"a": t("F32", [2, 2], 0, 16), "b": t("F16", [4], 16, 24),
        "__metadata__": {"format": "pt"}}


def test_handmade_good_file():
    blob = build(GOOD, bytes(24))
    assert parse(blob) == {"a": TensorMeta("F32", (2, 2), 16), "b": TensorMeta("F16", (4,), 8)}


def test_a_header_parsed_again_gives_a_table_of_its_own():
    blob = build(GOOD, bytes(24))
    first = parse(blob)
    first.pop("a")
    assert parse(bytearray(blob)) == {"a": TensorMeta("F32", (2, 2), 16),
                                      "b": TensorMeta("F16", (4,), 8)}
    # Same header bytes in a file of another size: checked against that size, not remembered.
    assert problems_of(blob + bytes(8)) == ["8 trailing bytes after the last tensor"]


def test_files_written_by_the_safetensors_library():
    import torch
    from safetensors.torch import load, save

    tensors = {
        "w": torch.randn(3, 5), "h": torch.randn(7).half(), "b": torch.randn(2, 2).bfloat16(),
        "i": torch.arange(6).reshape(2, 3), "mask": torch.ones(4, dtype=torch.bool),
        "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 8),
    }
    blob = save(tensors, metadata={"format": "pt", "note": "x"})
    metas = parse(blob)
    assert set(metas) == set(tensors) == set(load(blob))
    for name, tensor in tensors.items():
        assert metas[name].shape == tuple(tensor.shape)
        assert metas[name].nbytes == tensor.numel() * tensor.element_size()
    # the header alone is enough
    n = header_length(blob[:8])
    assert parse_safetensors_header(blob[:8 + n], len(blob)) == metas


def test_real_peft_adapter_passes(lora_adapter):
    from safetensors import safe_open

    path = lora_adapter / "adapter_model.safetensors"
    blob = path.read_bytes()
    metas = parse(blob)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(metas)
        for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
            assert list(metas[k].shape) == f.get_slice(k).get_shape()
    assert any(k.endswith("q_proj.lora_A.weight") for k in metas)


def test_file_shorter_than_eight_bytes():
    assert "shorter than the 8-byte" in problems_of(b"\x01\x00")[0]


def test_header_over_the_cap():
    blob = build(GOOD, bytes(24))
    assert "over the" in problems_of(blob, max_header=16)[0]
    huge = struct.pack("<Q", HEADER_CAP + 1) + b"{}"
    assert "over the" in problems_of(huge)[0]


def test_header_length_past_end_of_file():
    assert "past the end" in problems_of(build(b'{"a":1}', declared=1000))[0]


def test_leading_whitespace_is_refused():
    raw = b' {"__metadata__": {"format": "pt"}}'
    assert "leading whitespace" in problems_of(build(raw))[0]


def test_trailing_space_padding_is_accepted():
    raw = json.dumps(GOOD).encode() + b"    "
    assert set(parse(build(raw, bytes(24)))) == {"a", "b"}


@pytest.mark.parametrize("raw", [
    b" " + json.dumps({"a": t("F32", [1], 0, 4)}).encode(),
    b'{"a": ' + json.dumps(t("F32", [1], 0, 4)).encode() + b', "a": '
    + json.dumps(t("F32", [1], 0, 4)).encode() + b"}",
    json.dumps({"a": {**t("F32", [1], 0, 4), "extra": 1}}).encode(),
])
def test_stricter_than_the_reference_reader(raw):
    from safetensors.torch import load

    blob = build(raw, bytes(4))
    assert set(load(blob)) == {"a"}
    with pytest.raises(InvalidAdapter):
        parse(blob)


@pytest.mark.parametrize("raw", [
    b'{"a": ' + json.dumps(t("F32", [1], 0, 4)).encode() + b', "a": '
    + json.dumps(t("F32", [1], 4, 8)).encode() + b"}",
    b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}',
])
def test_duplicate_keys_are_refused(raw):
    assert "duplicate key" in problems_of(build(raw, bytes(8)))[0]


@pytest.mark.parametrize("raw, words", [
    (b"{not json", "not valid JSON"),
    (b"{\xff\xfe}", "UTF-8"),
    (b"[]", "start with '{'"),
    (b'{"a": 1}', "must be an object"),
])
def test_malformed_json(raw, words):
    assert words in problems_of(build(raw))[0]


@pytest.mark.parametrize("entry, words", [
    (t("F33", [1], 0, 4), "unknown dtype"),
    (t("F32", [-1], 0, 4), "non-negative"),
    (t("F32", [True], 0, 4), "non-negative"),
    (t("F32", [1.0], 0, 4), "non-negative"),
    (t("F32", "1", 0, 4), "non-negative"),
    (t("F32", [1], 4, 0), "data_offsets"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [1]}, "missing field"),
    ({**t("F32", [1], 0, 4), "device": "cuda"}, "unknown field"),
    (t("F32", [3], 0, 4), "needs 12"),
    (t("F4", [3], 0, 2), "whole number of bytes"),
])
def test_bad_tensor_entries(entry, words):
    probs = problems_of(build({"x": entry}, bytes(4)))
    assert any(words in p for p in probs), probs


def test_gap_between_tensors():
    header = {"a": t("F32", [1], 0, 4), "b": t("F32", [1], 8, 12)}
    assert any("gap of 4 bytes" in p for p in problems_of(build(header, bytes(12))))


def test_overlapping_tensors():
    header = {"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}
    assert any("overlaps" in p for p in problems_of(build(header, bytes(12))))


def test_tensor_not_starting_at_zero():
    assert any("gap" in p for p in problems_of(build({"a": t("F32", [1], 4, 8)}, bytes(8))))


def test_trailing_bytes():
    assert any("trailing bytes" in p for p in problems_of(build(GOOD, bytes(25))))


def test_truncated_data():
    assert any("past the" in p for p in problems_of(build(GOOD, bytes(23))))


@pytest.mark.parametrize("metadata", [{"format": 1}, {"nested": {"a": "b"}}, ["x"], "pt"])
def test_metadata_must_be_strings(metadata):
    header = {**GOOD, "__metadata__": metadata}
    assert any("metadata" in p for p in problems_of(build(header, bytes(24))))


def test_every_problem_is_listed():
    header = {"a": t("F64", [2], 0, 8), "b": t("Q8", [1], 8, 9), "c": t("F32", [1], 20, 24),
              "__metadata__": {"k": 3}}
    with pytest.raises(InvalidAdapter) as info:
        parse(build(header, bytes(30)), file_name="adapter_model.safetensors")
    details = info.value.details
    assert details["file"] == "adapter_model.safetensors"
    tensors = {p["tensor"] for p in details["problems"]}
    assert {"a", "b", "c", "__metadata__", None} <= tensors
    assert "adapter_model.safetensors" in info.value.message


def test_caller_must_pass_the_whole_header():
    blob = build(GOOD, bytes(24))
    with pytest.raises(ValueError):
        parse_safetensors_header(blob[:12], len(blob))


# --- pickles ------------------------------------------------------------------------------------

def test_torch_checkpoints_are_pickles(tmp_path):
    import torch

    state = OrderedDict(w=torch.randn(2, 2))
    buf = io.BytesIO()
    torch.save(state, buf)
    assert is_pickle(buf.getvalue()[:16])
    legacy = io.BytesIO()
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert is_pickle(legacy.getvalue()[:16])


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("obj", [{"w": [1.0]}, [1, 2], OrderedDict(a=1)])
def test_plain_pickles(protocol, obj):
    assert is_pickle(pickle.dumps(obj, protocol=protocol)[:32])


@pytest.mark.parametrize("data", [
    build(GOOD, bytes(24)), b'{"peft_type": "LORA"}', b"# My adapter\n", b"(a note)\n",
    b"", b"PK", b"\x80",
])
def test_non_pickles(data):
    assert not is_pickle(data)


# --- file names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, normal", [
    ("adapter_model.safetensors", "adapter_model.safetensors"),
    ("./adapter_config.json", "adapter_config.json"),
    ("sub//dir/./README.md", "sub/dir/README.md"),
    ("tokenizer.model", "tokenizer.model"),
    ("tokenizer.json", "tokenizer.json"),
    ("chat_template.jinja", "chat_template.jinja"),
    (".gitattributes", ".gitattributes"),
    ("ÜBER.md", "ÜBER.md"),
    ("checkpoint/Model.SafeTensors", "checkpoint/Model.SafeTensors"),
])
def test_good_names(name, normal):
    assert check_file_name(name) == normal


@pytest.mark.parametrize("name", [
    "adapter_model.bin", "pytorch_model.BIN", "model.pt", "weights.pth", "x.pkl", "m.ckpt",
    "arr.npy", "data.pickle",
])
def test_pickle_suffixes_are_refused(name):
    with pytest.raises(UnsafeFile) as info:
        check_file_name(name)
    assert "safetensors" in info.value.message
    assert info.value.code == "unsafe_file"


@pytest.mark.parametrize("name", [
    "", "/etc/passwd", "../secret.json", "a/../../b.json", "a\\b.json", "C:evil.json",
    "c:/x.json", "nul\x00.json", "evil\u202egpj.json", "zero\u200bwidth.json", ".env",
    ".git/config", "a/.hidden/b.json", " lead.json", "trail.json ", "dots.json.",
    "con.json", "LPT1.txt", "run.sh", "lib.so", "noext", "a/" * 9 + "x.json", "x" * 600,
    "line\nbreak.json",
])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafeFile):
        check_file_name(name)
