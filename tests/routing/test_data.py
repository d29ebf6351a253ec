"""Labelled files and the part of a chat that gets embedded."""

from __future__ import annotations

import json

import pytest

from quiver.errors import InvalidRequest
from quiver.routing.data import load_labelled, prompt_text


def test_load_jsonl_and_csv(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in [
        {"text": "hello", "label": "greet"}, {"prompt": "bye", "category": "OOS"},
        {"text": "  ", "label": "greet"}]) + "\n")
    rows = load_labelled(j)
    assert [(r.text, r.label, r.out_of_scope) for r in rows] == [
        ("hello", "greet", False), ("bye", "OOS", True)]
    c = tmp_path / "d.csv"
    c.write_text("text,category\nI lost my card,lost_card\nweather?,oos\n")
    assert [(r.text, r.out_of_scope) for r in load_labelled(c)] == [
        ("I lost my card", False), ("weather?", True)]


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(InvalidRequest, match="no such file"):
        load_labelled(tmp_path / "missing.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(InvalidRequest, match="no label column"):
        load_labelled(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(InvalidRequest, match="not JSON"):
        load_labelled(broken)


CHAT = [{"role": "system", "content": "You are a chef."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "how do I poach an egg?"}]}]


def test_embed_parts():
    assert prompt_text(messages=CHAT) == "how do I poach an egg?"
    assert prompt_text(messages=CHAT, part="system") == "You are a chef."
    assert prompt_text(messages=CHAT, part="system_and_last_user") == \
        "You are a chef.\nhow do I poach an egg?"
    assert "an answer" in prompt_text(messages=CHAT, part="all")
    assert prompt_text(messages=CHAT[1:], part="system") == "how do I poach an egg?"


def test_empty_both_and_huge_prompts():
    with pytest.raises(InvalidRequest):
        prompt_text("   ")
    with pytest.raises(InvalidRequest):
        prompt_text()
    with pytest.raises(InvalidRequest):
        prompt_text("a", [{"role": "user", "content": "b"}])
    with pytest.raises(InvalidRequest):
        prompt_text(messages=[{"role": "user", "content": 5}])
    assert len(prompt_text("word " * 100_000, max_chars=4000)) == 4000
