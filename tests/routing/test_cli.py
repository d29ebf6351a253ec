"""The ``quiver route`` commands, run in-process through the real ``quiver`` app."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quiver.client.cli import app
from tests.routing.conftest import COOKING, MATH, TRANSLATE


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("route-data")
    train = folder / "train.csv"
    rows = ["text,category"] + [f'"{t}",math' for t in MATH[:5]] + \
        [f'"{t}",cooking' for t in COOKING[:5]] + [f'"{t}",translate' for t in TRANSLATE[:5]]
    train.write_text("\n".join(rows) + "\n")
    test = folder / "test.jsonl"
    test.write_text("\n".join(json.dumps(r) for r in [
        {"text": MATH[5], "label": "math"}, {"text": COOKING[5], "label": "cooking"},
        {"text": TRANSLATE[5], "label": "translate"},
        {"text": "Who painted the Mona Lisa?", "label": "oos"},
        {"text": "What is the tallest mountain on Earth?", "label": "oos"}]) + "\n")
    return train, test


def test_eval_json(files):
    train, test = files
    r = CliRunner().invoke(app, ["route", "eval", "--train", str(train), "--test", str(test),
                                 "--threshold", "0.3", "--latency-samples", "5", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("accuracy", "oos_recall", "p50_ms", "p99_ms", "encoder_p50_ms"):
        assert key in res
    assert res["accuracy"] == 1.0 and res["oos_recall"] == 1.0
    assert res["in_scope"] == 3 and res["out_of_scope"] == 2
    assert set(res["per_class"]) == {"math", "cooking", "translate"}


def test_eval_human_and_fit(files):
    train, test = files
    r = CliRunner().invoke(app, ["route", "eval", "--train", str(train), "--test", str(test),
                                 "--latency-samples", "3"])
    assert r.exit_code == 0, r.output
    assert "in-scope accuracy" in r.output and "bare encoder" in r.output
    r = CliRunner().invoke(app, ["route", "fit", "--train", str(train), "--heldout", str(test),
                                 "--target-precision", "0.99", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["precision"] >= 0.99 and res["oos_recall"] == 1.0


def test_eval_bad_file(tmp_path, files):
    r = CliRunner().invoke(app, ["route", "eval", "--train", str(tmp_path / "none.csv"),
                                 "--test", str(files[1])])
    assert r.exit_code != 0 and "no such file" in r.output


def test_route_prompt_against_a_registry(hub):
    hub.push("math", MATH, "Solve mathematics problems")
    hub.push("cooking", COOKING, "Answer cooking questions")
    r = CliRunner().invoke(app, ["--registry", hub.url, "route", "What is 12 squared?",
                                 "--json"])
    assert r.exit_code == 0, r.output
    decision = json.loads(r.stdout.strip().splitlines()[-1])
    assert decision["candidates"][0]["adapter"] == "math/1"
    r = CliRunner().invoke(app, ["--registry", hub.url, "route", "How do I fry an egg?"])
    assert r.exit_code == 0 and "cooking/1" in r.output
