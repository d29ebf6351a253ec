"""Continuous batching: join/leave, cancellation, KV back-pressure, fairness, sampling, stops,
streaming and the asyncio facade."""

from __future__ import annotations

import asyncio

import pytest
import torch

from quiver.backend.engine import (AsyncEngine, Engine, EngineConfig, SamplingParams,
                                   load_adapter_dir)
from quiver.errors import ContextLengthExceeded, InvalidRequest, Overloaded, Unavailable
from tests.backend.test_engine_support import engine_models, one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(engine_models):
    return engine_models["llama"]


def make_engine(base, adapters=None, **kw) -> Engine:
    cfg = dict(model_dir=base, device="cpu", max_slots=max(4, len(adapters or ())),
               max_rank=16, max_running=8, kv_cache_tokens=1024)
    engine = Engine(EngineConfig(**{**cfg, **kw}))
    for name, path in (adapters or {}).items():
        engine.load_adapter(name, engine.prepare_adapter(*load_adapter_dir(path)))
    return engine


def drain(engine, max_steps=10_000, on_step=None):
    """Run to completion; returns {request_id: [events]} and the number of steps."""
    events: dict[str, list] = {}
    steps = 0
    while engine.has_work():
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
        steps += 1
        if on_step:
            on_step(steps)
        assert steps < max_steps
    return events, steps


def tokens_of(evs):
    return [e.token_id for e in evs if e.token_id is not None]


def prompt(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_requests_joining_and_leaving_mid_batch_get_their_solo_output(llama):
    base, adapters = llama
    engine = make_engine(base, adapters, max_batch_tokens=16)
    jobs = [(prompt(7 + i, i), [None, "qv4", "mlp16", "all8rs"][i % 4],
             SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True))
            for i in range(6)]
    solo = []
    for i, (p, a, sp) in enumerate(jobs):
        engine.add_request(f"solo{i}", p, a, sp)
        solo.append(tokens_of(drain(engine)[0][f"solo{i}"]))
    # Now interleaved: two start, one joins every step, short ones leave early.
    engine.add_request("j0", *jobs[0])
    engine.add_request("j1", *jobs[1])
    later = iter(range(2, 6))

    def join(_steps):
        i = next(later, None)
        if i is not None:
            engine.add_request(f"j{i}", *jobs[i])

    events, _ = drain(engine, on_step=join)
    for i in range(6):
        assert tokens_of(events[f"j{i}"]) == solo[i]
        assert events[f"j{i}"][-1].finish_reason == "length"
        assert events[f"j{i}"][-1].completion_tokens == jobs[i][2].max_tokens
    assert engine.stats()["kv_cache_usage"] == 0.0 and engine.stats()["running"] == 0


def test_prefill_is_chunked_by_the_token_budget(llama):
    base, _ = llama
    engine = make_engine(base, max_batch_tokens=8)
    engine.add_request("long", prompt(30, 1), None, GREEDY)
    engine.add_request("short", prompt(3, 2), None, GREEDY)
    sizes, first_token_step = [], {}
    step = 0
    while engine.has_work():
        step += 1
        for ev in engine.step():
            first_token_step.setdefault(ev.request_id, step)
        sizes.append(engine.stats()["last_step_tokens"])
    assert max(sizes) <= 8
    assert first_token_step["long"] == 4                 # 8 + 8 + 8 + 6 prompt tokens
    assert first_token_step["short"] == 5                # after the long prompt's chunks


def test_cancel_running_and_queued_requests(llama):
    base, adapters = llama
    engine = make_engine(base, adapters, max_running=2)
    long = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    engine.add_request("a", prompt(5, 1), "qv4", long)
    engine.add_request("b", prompt(5, 2), None, long)
    engine.add_request("queued", prompt(5, 3), "qv4", long)
    engine.add_request("solo", prompt(5, 4), None, GREEDY)
    engine.step()
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["queue_depth"] == 2
    engine.cancel("a")
    engine.cancel("queued")
    engine.cancel("unknown")                       # ignored
    events, _ = drain(engine)
    assert events["a"][-1].finish_reason == "cancelled" and events["a"][-1].finished
    assert events["queued"] == [events["queued"][-1]]
    assert events["queued"][-1].finish_reason == "cancelled"
    assert events["b"][-1].finish_reason == "length" and events["b"][-1].completion_tokens == 50
    assert engine.stats()["kv_free_blocks"] == engine.kv.num_blocks
    engine.unload_adapter("qv4")                   # no request holds it any more


def test_kv_budget_exhaustion_queues_then_drains(llama):
    base, _ = llama
    # 64 cache tokens; each request reserves 10 + 22 = 32 tokens → two at a time.
    engine = make_engine(base, kv_cache_tokens=64, max_running=8)
    sp = SamplingParams(max_tokens=22, temperature=0.0, ignore_eos=True)
    for i in range(5):
        engine.add_request(f"r{i}", prompt(10, i), None, sp)
    engine.step()
    s = engine.stats()
    assert s["running"] == 2 and s["queue_depth"] == 3 and s["kv_cache_usage"] == 1.0
    events, _ = drain(engine)
    assert all(events[f"r{i}"][-1].finish_reason == "length" for i in range(5))
    assert engine.stats()["kv_cache_usage"] == 0.0
    with pytest.raises(ContextLengthExceeded):
        engine.add_request("huge", prompt(10, 9), None, SamplingParams(max_tokens=100))


def test_queue_full_is_overloaded_and_bad_requests_are_refused(llama):
    base, _ = llama
    engine = make_engine(base, max_queue=2)
    engine.add_request("a", [1], None, GREEDY)
    engine.add_request("b", [1], None, GREEDY)
    with pytest.raises(Overloaded):
        engine.add_request("c", [1], None, GREEDY)
    with pytest.raises(InvalidRequest):
        engine.add_request("a", [1], None, GREEDY)            # duplicate id
    for bad in ([], [1, 256], [-1]):
        with pytest.raises(InvalidRequest):
            engine.add_request("x", bad, None, GREEDY)
    with pytest.raises(InvalidRequest):
        engine.add_request("x", [1], None, SamplingParams(top_p=0))
    with pytest.raises(ContextLengthExceeded):
        engine.add_request("x", [1] * 256, None, GREEDY)
    assert engine.stats()["queue_depth"] == 2


def test_rare_adapter_is_not_starved_by_a_popular_one(llama):
    base, adapters = llama
    engine = make_engine(base, adapters, max_running=2)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i in range(20):
        engine.add_request(f"pop{i}", prompt(4, i), "qv4", sp)
    engine.add_request("rare", prompt(4, 99), "mlp16", sp)
    order = []
    while engine.has_work():
        order += [e.request_id for e in engine.step() if e.finished]
    assert order.index("rare") <= 3, order


def test_sampling_controls(llama):
    base, _ = llama
    engine = make_engine(base)
    p = prompt(6, 5)

    def run(params, rid, companions=0):
        for c in range(companions):
            engine.add_request(f"{rid}-c{c}", prompt(3 + c, 50 + c), None,
                               SamplingParams(max_tokens=8, temperature=1.0))
        engine.add_request(rid, p, None, params)
        return tokens_of(drain(engine)[0][rid])

    greedy = run(SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "g")
    assert run(SamplingParams(max_tokens=8, temperature=1.5, top_k=1, ignore_eos=True),
               "k1") == greedy
    assert run(SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-6, ignore_eos=True),
               "p0") == greedy
    hot = SamplingParams(max_tokens=8, temperature=5.0, seed=7, ignore_eos=True)
    a = run(hot, "s1")
    assert run(hot, "s2", companions=3) == a      # the seed alone decides, not the batch
    other = SamplingParams(max_tokens=8, temperature=5.0, seed=8, ignore_eos=True)
    assert run(other, "s3") != a
    topk = SamplingParams(max_tokens=30, temperature=5.0, top_k=3, seed=1, ignore_eos=True)
    engine.logits_hook = None
    seen = []
    engine.logits_hook = lambda ids, lg: seen.append(
        torch.topk(lg[ids.index("tk")], 3).indices.tolist() if "tk" in ids else None)
    toks = run(topk, "tk")
    assert all(t in allowed for t, allowed in zip(toks, [s for s in seen if s], strict=True))


def test_stop_strings_eos_and_streamed_text(llama):
    base, _ = llama
    engine = make_engine(base)
    p = prompt(5, 21)
    engine.add_request("free", p, None, SamplingParams(max_tokens=24, temperature=0,
                                                        ignore_eos=True))
    free = drain(engine)[0]["free"]
    ids = tokens_of(free)
    full = engine.tokenizer.decode(ids)
    assert "".join(e.text for e in free) == full
    assert [e.completion_tokens for e in free] == list(range(1, 25))
    # A stop string taken from the middle of the free-running output.
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = full.index(stop)
    engine.add_request("stop", p, None, SamplingParams(max_tokens=24, temperature=0,
                                                        stop=[stop], ignore_eos=True))
    evs = drain(engine)[0]["stop"]
    assert evs[-1].finish_reason == "stop"
    assert "".join(e.text for e in evs) == full[:cut]
    # The same first token as EOS ends the request at once, unless ignore_eos.
    engine.eos_ids = {ids[0]}
    engine.add_request("eos", p, None, SamplingParams(max_tokens=24, temperature=0))
    evs = drain(engine)[0]["eos"]
    assert len(evs) == 1 and evs[0].finish_reason == "stop" and evs[0].text == ""
    engine.add_request("ign", p, None, SamplingParams(max_tokens=3, temperature=0,
                                                       ignore_eos=True))
    assert tokens_of(drain(engine)[0]["ign"]) == ids[:3]


def test_nothing_grows_per_request_once_warm(llama):
    base, adapters = llama
    engine = make_engine(base, adapters)
    report = engine.memory_report()

    def wave(tag):
        for i in range(8):
            engine.add_request(f"{tag}{i}", prompt(6, i), [None, "qv4"][i % 2], GREEDY)
        drain(engine)

    wave("w")
    tensors = (engine.kv.k.data_ptr(), engine._row_table.data_ptr())
    for k in range(3):
        wave(f"x{k}")
    assert engine.memory_report() == report
    assert (engine.kv.k.data_ptr(), engine._row_table.data_ptr()) == tensors
    assert engine.stats()["kv_free_blocks"] == engine.kv.num_blocks
    assert len(engine._detok) == 0 and len(engine._running) == 0


async def test_async_engine_streams_cancels_and_drains(llama):
    base, adapters = llama
    engine = make_engine(base)
    aeng = AsyncEngine(engine)
    await aeng.start()
    prepared = engine.prepare_adapter(*load_adapter_dir(adapters["qv4"]))
    slot = await aeng.load_adapter("qv4", prepared)
    assert engine.slot_info()["loaded"] == {"qv4": slot}

    async def collect(adapter, params):
        return [ev async for ev in aeng.generate(prompt(5, 1), adapter=adapter, params=params)]

    a, b = await asyncio.gather(collect("qv4", GREEDY), collect(None, GREEDY))
    assert a[-1].finished and len(tokens_of(a)) == 8 and tokens_of(a) != tokens_of(b)
    # Closing the iterator early cancels the request in the engine.
    gen = aeng.generate(prompt(5, 2), adapter="qv4",
                        params=SamplingParams(max_tokens=500, ignore_eos=True))
    async for _ in gen:
        break
    await gen.aclose()
    for _ in range(200):
        if engine.stats()["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats()["running"] == 0 and engine.stats()["requests_cancelled"] == 1
    await aeng.unload_adapter("qv4")
    with pytest.raises(InvalidRequest):
        await collect(None, SamplingParams(max_tokens=0))
    # stop(): in-flight requests past the drain deadline are cancelled.
    task = asyncio.create_task(collect(None, SamplingParams(max_tokens=200, ignore_eos=True)))
    await asyncio.sleep(0.05)
    await aeng.stop(drain_timeout=0.0)
    events = await task
    assert events[-1].finish_reason in ("cancelled", "length")
    with pytest.raises(Unavailable):
        await collect(None, GREEDY)
    assert aeng.stats()["running"] == 0


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(llama):
    base, _ = llama
    engine = make_engine(base)
    layer = engine.model.layers[0]
    good = layer.o
    layer.o = good[:, :-1]                       # a corrupt weight: the forward pass raises
    engine.add_request("doomed", prompt(4, 1), None, GREEDY)
    events, _ = drain(engine)
    assert events["doomed"][-1].finish_reason == "error"
    assert engine.stats()["requests_failed"] == 1
    layer.o = good
    engine.add_request("fine", prompt(4, 1), None, GREEDY)
    events, _ = drain(engine)
    assert events["fine"][-1].finish_reason == "length"
    assert engine.stats()["kv_free_blocks"] == engine.kv.num_blocks
