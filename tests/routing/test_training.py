"""From registry versions to training sets: candidate choice, texts, versions."""

from __future__ import annotations

from quiver.routing.classifier import ClassifierConfig
from quiver.routing.data import LabelledExample
from quiver.routing.training import build_training_sets, select_candidates
from quiver.wire import VersionInfo


def _v(repo: str, n: int, *, base: str = "llama", status: str = "ready", aliases=(),
       examples=("an example",), task: str | None = None) -> VersionInfo:
    return VersionInfo(repo=repo, version=n, ref=f"{repo}/{n}", revision=f"{n:040x}",
                       status=status, base_model=base, aliases=list(aliases),
                       examples=list(examples), task_description=task)


def test_alias_wins_then_latest_ready():
    vs = [_v("a", 1), _v("a", 2), _v("a", 3, status="archived"),
          _v("b", 1, aliases=["prod"]), _v("b", 2), _v("org/c", 4, status="failed")]
    assert [v.ref for v in select_candidates(vs)] == ["a/2", "b/1"]
    assert [v.ref for v in select_candidates(vs, alias="staging")] == ["a/2", "b/2"]
    assert [v.ref for v in select_candidates(vs, repos=["b"])] == ["b/1"]
    vs.append(_v("org/d", 1))
    assert [v.ref for v in select_candidates(vs, namespaces=["org"])] == ["org/d/1"]


def test_training_sets_per_base_model_with_extra_data():
    vs = [_v("math", 1, task="Solve maths", examples=["2+2?", " 2+2? ", ""]),
          _v("chef", 1, examples=["soup?"]), _v("empty", 1, examples=()),
          _v("qwen-only", 1, base="qwen")]
    extra = [LabelledExample("integrate x", "math"), LabelledExample("weather?", "oos"),
             LabelledExample("bake a cake", "chef/1")]
    sets = build_training_sets(vs, extra=extra)
    assert sorted(sets) == ["llama", "qwen"]
    llama = sets["llama"]
    texts = {c.ref: c.texts for c in llama.candidates}
    assert texts == {"chef/1": ("soup?", "bake a cake"),
                     "math/1": ("Solve maths", "2+2?", "integrate x")}
    assert llama.skipped == ("empty/1",) and llama.oos == ("weather?",)
    assert [c.ref for c in sets["qwen"].candidates] == ["qwen-only/1"]


def test_versions_follow_the_training_data_only():
    cfg = ClassifierConfig()
    one = build_training_sets([_v("a", 1), _v("b", 1)])["llama"]
    same = build_training_sets([_v("b", 1), _v("a", 1)])["llama"]
    other = build_training_sets([_v("a", 1), _v("b", 1, examples=["changed"])])["llama"]
    assert one.version("enc", cfg) == same.version("enc", cfg)
    assert one.version("enc", cfg) != other.version("enc", cfg)
    assert one.version("enc", cfg) != one.version("other-encoder", cfg)
