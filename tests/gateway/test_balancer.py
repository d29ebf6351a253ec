"""The backend-selection policy, exercised directly (it is pure)."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter

from quiver.gateway.balancer import choose_backends, rendezvous_weight, residency_score
from quiver.wire import BackendHeartbeat


def hb(backend_id: str, base: str = "llama", **fields) -> BackendHeartbeat:
    fields = {"total_slots": 4, "free_slots": 4, **fields}
    return BackendHeartbeat(backend_id=backend_id, url=f"http://{backend_id}", base_model=base,
                            ts=time.time(), **fields)


def ids(order: list[BackendHeartbeat]) -> list[str]:
    return [b.backend_id for b in order]


def test_only_backends_of_the_base_model_that_are_not_draining():
    fleet = [hb("a"), hb("b", base="qwen"), hb("c", draining=True), hb("d")]
    order = choose_backends(base_model="llama", adapter="x/1", backends=fleet, inflight={})
    assert sorted(ids(order)) == ["a", "d"]
    assert choose_backends(base_model="mistral", adapter="x/1", backends=fleet, inflight={}) == []
    base_only = choose_backends(base_model="qwen", adapter=None, backends=fleet, inflight={})
    assert ids(base_only) == ["b"]


def test_ejected_backends_are_used_only_when_nothing_else_is_left():
    fleet = [hb("a"), hb("b")]
    order = choose_backends(base_model="llama", adapter="x/1", backends=fleet, inflight={},
                            excluded={"a"})
    assert ids(order) == ["b"]
    order = choose_backends(base_model="llama", adapter="x/1", backends=fleet, inflight={},
                            excluded={"a", "b"})
    assert sorted(ids(order)) == ["a", "b"]


def test_residency_wins_while_under_the_load_cap():
    fleet = [hb("a"), hb("b", host=["x/1"]), hb("c", gpu=["x/1"])]
    order = choose_backends(base_model="llama", adapter="x/1", backends=fleet, inflight={})
    assert ids(order)[:2] == ["c", "b"]
    assert residency_score(fleet[2], "x/1") == 1.0
    assert residency_score(hb("full", free_slots=0), "x/1") < residency_score(fleet[0], "x/1")


def test_a_loaded_resident_backend_gives_way_instead_of_becoming_a_hotspot():
    fleet = [hb("a"), hb("b"), hb("c", gpu=["x/1"])]
    # c holds 10 requests, the others none: c is past 1.25x the mean and is tried last.
    order = choose_backends(base_model="llama", adapter="x/1", backends=fleet,
                            inflight={"c": 10})
    assert ids(order)[-1] == "c"
    # Reported queue depth counts as load too.
    fleet[2] = hb("c", gpu=["x/1"], queue_depth=10)
    order = choose_backends(base_model="llama", adapter="x/1", backends=fleet, inflight={})
    assert ids(order)[-1] == "c"


def test_cold_adapters_stick_to_their_rendezvous_home_and_spread_over_the_fleet():
    fleet = [hb(f"b{i}") for i in range(8)]
    homes = Counter()
    for n in range(800):
        adapter = f"repo-{n}/1"
        first = choose_backends(base_model="llama", adapter=adapter, backends=fleet,
                                inflight={})[0].backend_id
        again = choose_backends(base_model="llama", adapter=adapter, backends=list(reversed(fleet)),
                                inflight={})[0].backend_id
        assert first == again
        home = max(fleet, key=lambda b: rendezvous_weight(adapter, b.backend_id))
        assert first == home.backend_id
        homes[first] += 1
    assert len(homes) == 8 and min(homes.values()) > 50  # about 100 each


def test_a_hot_adapter_is_bounded_to_about_the_cap_on_any_backend():
    fleet = [hb(f"b{i}") for i in range(5)]
    inflight: dict[str, int] = {}
    for _ in range(200):  # 200 concurrent requests of one adapter, none finishing
        chosen = choose_backends(base_model="llama", adapter="hot/1", backends=fleet,
                                 inflight=inflight, load_cap=1.25)[0]
        inflight[chosen.backend_id] = inflight.get(chosen.backend_id, 0) + 1
    assert sum(inflight.values()) == 200
    assert max(inflight.values()) <= 1.25 * 200 / 5 + 1
    assert len(inflight) >= 4  # spread as soon as the home backend reached the cap


def test_the_cap_keeps_a_few_backends_per_adapter_at_moderate_load():
    fleet = [hb(f"b{i}") for i in range(8)]
    inflight = {b.backend_id: 2 for b in fleet}  # background load from other adapters
    used = set()
    for _ in range(4):
        chosen = choose_backends(base_model="llama", adapter="warm/1", backends=fleet,
                                 inflight=inflight)[0]
        inflight[chosen.backend_id] += 1
        used.add(chosen.backend_id)
    assert len(used) <= 3  # stays on its home backends instead of touching all 8


def test_base_model_requests_use_two_random_choices_less_loaded_first():
    fleet = [hb(f"b{i}") for i in range(6)]
    inflight = {"b0": 9, "b1": 0, "b2": 5, "b3": 5, "b4": 5, "b5": 5}
    rng = random.Random(7)
    firsts = Counter()
    for _ in range(300):
        order = choose_backends(base_model="llama", adapter=None, backends=fleet,
                                inflight=inflight, rng=rng)
        assert len(order) == 6
        a, b = order[0], order[1]
        assert inflight[a.backend_id] <= inflight[b.backend_id]
        firsts[a.backend_id] += 1
    assert firsts["b0"] == 0  # the most loaded backend never wins a pair
    assert firsts["b1"] > firsts["b2"]


def test_the_gateway_never_imports_torch():
    code = "import sys, quiver.gateway.server; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_a_backend_at_its_engine_concurrency_is_not_preferred_even_if_resident():
    from quiver.gateway.balancer import choose_backends
    from quiver.wire import BackendHeartbeat

    def hb(i, gpu, running_cap):
        return BackendHeartbeat(backend_id=f"b{i}", url=f"http://b{i}", base_model="m",
                                gpu=gpu, total_slots=4, free_slots=2, max_running=running_cap,
                                ts=0.0)

    busy = hb(0, ["a/1"], 2)
    idle = hb(1, [], 2)
    order = choose_backends(base_model="m", adapter="a/1", backends=[busy, idle],
                            inflight={"b0": 2, "b1": 0})
    assert [b.backend_id for b in order] == ["b1", "b0"]
    # With room left, residency wins.
    order = choose_backends(base_model="m", adapter="a/1", backends=[busy, idle],
                            inflight={"b0": 1, "b1": 0})
    assert order[0].backend_id == "b0"


def test_among_resident_backends_the_least_loaded_comes_first():
    from quiver.gateway.balancer import choose_backends
    from quiver.wire import BackendHeartbeat

    fleet = [BackendHeartbeat(backend_id=f"b{i}", url=f"http://b{i}", base_model="m",
                              gpu=["a/1"], total_slots=4, free_slots=3, ts=0.0) for i in range(3)]
    order = choose_backends(base_model="m", adapter="a/1", backends=fleet,
                            inflight={"b0": 3, "b1": 1, "b2": 2})
    assert [b.backend_id for b in order][:2] == ["b1", "b2"]
