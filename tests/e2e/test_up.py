"""``quiver up``: the README's first command, run twice on one data directory."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from quiver.client.stack import port_is_free

pytestmark = pytest.mark.slow


def _args(data_dir, offset: int, demo_dir, once: bool = True) -> list[str]:
    return [sys.executable, "-m", "quiver.client.cli", "up", "--json", "--data-dir",
            str(data_dir), "--port-offset", str(offset), "--demo-dir", str(demo_dir),
            *(["--once"] if once else [])]


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")},
            "HF_HUB_OFFLINE": "1"}


def _up(data_dir, offset: int, demo_dir) -> dict:
    r = subprocess.run(_args(data_dir, offset, demo_dir), capture_output=True, text=True,
                       timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_up_once_routes_the_demo_and_a_second_run_reuses_everything(tmp_path, demo):
    # Below the ephemeral range (32768+), where other processes' free ports come from.
    offset = random.randrange(10000, 23000, 100)
    first = _up(tmp_path / "q", offset, demo.root)
    assert sorted(first["pushed"]) == sorted(f"{a.repo}/1" for a in demo.adapters)
    assert set(first["urls"]) == {"registry", "backend", "router", "gateway"}
    rows = first["rows"]
    assert len(rows) == 2 * len(demo.adapters) + 1
    for row in rows:
        if row["expected_adapter"]:
            assert row["adapter"].startswith(row["expected_adapter"] + "/"), row
        assert row["confidence"] is None or 0.0 <= row["confidence"] <= 1.0
    # Different adapters give visibly different answers.
    assert len({r["answer"] for r in rows}) > len(demo.adapters)
    right = sum(r["answer"] == r["expected_answer"] for r in rows if r["expected_adapter"])
    assert right >= len(rows) - 2, rows

    # The second run keeps serving: Ctrl-C (SIGINT) then stops every part.
    proc = subprocess.Popen(_args(tmp_path / "q", offset, demo.root, once=False),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=_env())
    try:
        second = json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for url in second["urls"].values():
        assert port_is_free(int(url.rsplit(":", 1)[1])), url
    assert second["pushed"] == []
    assert [(r["prompt"], r["adapter"], r["answer"]) for r in second["rows"]] == \
        [(r["prompt"], r["adapter"], r["answer"]) for r in rows]
    log = (tmp_path / "q" / "logs" / "backend.log").read_text()
    # The second backend found the adapters in its disk cache: nothing pulled again.
    second_start = log.rsplit("--- start", 1)[1]
    assert "source=registry" not in second_start and "source=disk" in second_start
