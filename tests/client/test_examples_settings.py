"""Example files for --examples, and where the client's settings come from."""

from __future__ import annotations

import json
import stat

import pytest

from quiver.client import ClientSettings
from quiver.client.examples import read_examples
from quiver.client.settings import write_config_file
from quiver.errors import InvalidRequest


@pytest.mark.parametrize("name,content", [
    ("ex.jsonl", '{"text": "book a flight"}\n\n"cancel my order"\n{"prompt": "weather?"}\n'),
    ("ex.json", '[{"text": "book a flight"}, "cancel my order", {"text": "weather?"}]'),
    ("ex.csv", 'id,Text\n1,book a flight\n2,"cancel my order"\n3,weather?\n'),
    ("ex.txt", "book a flight\n\ncancel my order\n  weather?  \n"),
])
def test_example_formats(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert read_examples(path) == ["book a flight", "cancel my order", "weather?"]


@pytest.mark.parametrize("name,content", [
    ("bad.jsonl", '{"text": "ok"}\n{"oops": 1}\n'),
    ("bad.csv", "id,label\n1,x\n"),
    ("bad.jsonl", '{"text": "ok"\n'),
])
def test_bad_example_files_are_clear_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InvalidRequest):
        read_examples(path)


def test_missing_examples_file(tmp_path):
    with pytest.raises(InvalidRequest, match="cannot read"):
        read_examples(tmp_path / "nope.txt")


def test_settings_precedence(client_env, monkeypatch):
    cfg = client_env / "config" / "config.json"
    assert ClientSettings().registry_url == "http://127.0.0.1:8700"
    assert ClientSettings().token is None
    write_config_file(cfg, {"token": "from-file", "registry_url": "http://file:1"})
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    s = ClientSettings()
    assert (s.token, s.registry_url) == ("from-file", "http://file:1")
    monkeypatch.setenv("QUIVER_TOKEN", "from-env")
    assert ClientSettings().token == "from-env"
    assert ClientSettings(token="explicit").token == "explicit"
    write_config_file(cfg, {"token": None})
    monkeypatch.delenv("QUIVER_TOKEN")
    assert ClientSettings().token is None
    assert json.loads(cfg.read_text()) == {"registry_url": "http://file:1"}
