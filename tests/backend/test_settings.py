"""The backend's settings: QUIVER_* variables, derived defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from quiver.backend.settings import BackendSettings


def test_environment_and_derived_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("QUIVER_MAX_SLOTS", "12")
    monkeypatch.setenv("QUIVER_DISK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QUIVER_PORT", "9123")
    s = BackendSettings()
    assert s.max_slots == 12 and s.disk_cache_dir == tmp_path
    assert s.backend_id.endswith("-9123")              # two backends on a host differ by port
    assert s.public_url() == "http://127.0.0.1:9123"
    assert BackendSettings(advertise_url="http://b7:80/").public_url() == "http://b7:80"
    assert not BackendSettings(host="0.0.0.0").public_url().startswith("http://0.0.0.0")
    # Explicit arguments (what serve() passes) win over the environment.
    assert BackendSettings(max_slots=3).max_slots == 3


def test_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("QUIVER_MAX_SLOTS", "0")
    with pytest.raises(ValidationError):
        BackendSettings()
