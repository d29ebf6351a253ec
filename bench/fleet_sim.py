"""Fleet simulation: the gateway's backend choice at scale, against two simpler policies.

A discrete-event simulation of one gateway in front of many multi-LoRA backends. Requests
arrive as a Poisson stream with bursts; each names one of many adapters with Zipf popularity,
and during a burst a few cold adapters suddenly become hot. Each backend runs up to
``--running`` requests at once and holds ``--slots`` adapters in engine slots (LRU, never
evicting one in use); a request whose adapter is not resident pays a cold load first.

The gateway sees what a real one sees: each backend's heartbeat (slots, queue depth), refreshed
every ``--heartbeat`` seconds, plus its own exact in-flight counts. Policies compared:

- ``round_robin``: the next backend in turn;
- ``resident``: a backend that holds the adapter (least loaded among them), else the least
  loaded backend: pure "prefer where resident";
- ``quiver``: :func:`quiver.gateway.balancer.choose_backends`, the gateway's own code, with
  its bounded-load cap (swept over ``--caps`` in a full run).

Reported per policy: adapter hit rate, cold loads per second, load imbalance (max/mean of
requests served per backend), and queueing delay percentiles.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_args, percentile, ratio, report  # noqa: E402

from quiver.gateway.balancer import choose_backends  # noqa: E402
from quiver.wire import BackendHeartbeat  # noqa: E402


@dataclass
class Request:
    adapter: str
    arrival: float
    start: float = 0.0
    cold: bool = False


@dataclass
class Backend:
    index: int
    slots: int
    max_running: int
    hb: BackendHeartbeat
    resident: OrderedDict = field(default_factory=OrderedDict)  # adapter -> requests using it
    waiting: deque = field(default_factory=deque)
    running: int = 0
    served: int = 0


def zipf_sampler(n: int, s: float, rng: random.Random):
    weights = [1.0 / (k ** s) for k in range(1, n + 1)]
    cum = list(itertools.accumulate(weights))
    total = cum[-1]
    return lambda: bisect.bisect_left(cum, rng.random() * total)


def simulate(policy: str, *, backends: int, slots: int, running: int, adapters: int,
             zipf_s: float, load: float, duration: float, service_s: float, cold_s: float,
             heartbeat_s: float, burst_every: float, burst_len: float, burst_factor: float,
             cap: float = 1.25, seed: int = 0) -> dict:
    rng = random.Random(seed)
    choice_rng = random.Random(seed + 1)
    fleet = [Backend(i, slots, running, BackendHeartbeat(
        backend_id=f"b{i:04d}", url=f"http://b{i}", base_model="base", total_slots=slots,
        free_slots=slots, max_running=running, ts=0.0)) for i in range(backends)]
    by_id = {b.hb.backend_id: b for b in fleet}
    heartbeats = [b.hb for b in fleet]
    inflight: dict[str, int] = {}
    capacity = backends * running / service_s
    base_rate = load * capacity
    sample = zipf_sampler(adapters, zipf_s, rng)
    rr = itertools.count()

    waits: list[float] = []
    latencies: list[float] = []
    cold_loads = 0
    hits = 0
    events: list = []
    seq = itertools.count()

    def refresh_heartbeats(now: float) -> None:
        for b in fleet:
            b.hb.gpu = list(b.resident)
            b.hb.free_slots = b.slots - len(b.resident)
            b.hb.queue_depth = len(b.waiting)
            b.hb.running = b.running
            b.hb.ts = now

    def pick(adapter: str) -> Backend:
        if policy == "round_robin":
            return fleet[next(rr) % backends]
        if policy == "resident":
            holders = [b for b in fleet if adapter in b.hb.gpu]
            pool = holders or fleet
            return min(pool, key=lambda b: (inflight.get(b.hb.backend_id, 0) + b.hb.queue_depth,
                                            b.index))
        order = choose_backends(base_model="base", adapter=adapter, backends=heartbeats,
                                inflight=inflight, load_cap=cap, rng=choice_rng)
        return by_id[order[0].backend_id]

    def try_start(b: Backend, now: float) -> None:
        nonlocal cold_loads, hits
        while b.running < b.max_running and b.waiting:
            req: Request = b.waiting[0]
            extra = 0.0
            if req.adapter in b.resident:
                b.resident.move_to_end(req.adapter)
                hits += 1
            else:
                if len(b.resident) >= b.slots:
                    victim = next((a for a, users in b.resident.items() if users == 0), None)
                    if victim is None:
                        return  # every slot is in use: the request waits
                    del b.resident[victim]
                b.resident[req.adapter] = 0
                cold_loads += 1
                req.cold = True
                extra = cold_s
            b.waiting.popleft()
            b.resident[req.adapter] += 1
            b.running += 1
            req.start = now
            waits.append(now - req.arrival)
            service = rng.expovariate(1.0 / service_s)
            heapq.heappush(events, (now + extra + service, next(seq), "done", b, req))

    hot: list[str] = []
    t = 0.0
    heapq.heappush(events, (0.0, next(seq), "heartbeat", None, None))
    heapq.heappush(events, (rng.expovariate(base_rate), next(seq), "arrive", None, None))
    warmup = min(5.0, duration / 4)
    while events:
        t, _, kind, b, req = heapq.heappop(events)
        if t > duration:
            break
        if kind == "heartbeat":
            refresh_heartbeats(t)
            heapq.heappush(events, (t + heartbeat_s, next(seq), "heartbeat", None, None))
        elif kind == "arrive":
            in_burst = burst_every > 0 and (t % burst_every) < burst_len
            if in_burst and not hot:
                hot = [f"a{rng.randrange(adapters // 2, adapters)}" for _ in range(3)]
            elif not in_burst:
                hot = []
            rate = base_rate * (burst_factor if in_burst else 1.0)
            if hot and rng.random() < 0.3:
                adapter = rng.choice(hot)
            else:
                adapter = f"a{sample()}"
            target = pick(adapter)
            inflight[target.hb.backend_id] = inflight.get(target.hb.backend_id, 0) + 1
            target.waiting.append(Request(adapter, t))
            try_start(target, t)
            heapq.heappush(events, (t + rng.expovariate(rate), next(seq), "arrive", None, None))
        else:  # done
            b.running -= 1
            b.served += 1
            b.resident[req.adapter] -= 1
            inflight[b.hb.backend_id] -= 1
            if req.arrival >= warmup:
                latencies.append(t - req.arrival)
            try_start(b, t)

    served = [b.served for b in fleet]
    mean_served = sum(served) / len(served)
    measured = max(duration - warmup, 1e-9)
    return {
        "policy": policy if policy != "quiver" else f"quiver(cap={cap})",
        "requests": sum(served),
        "hit_rate": round(hits / max(1, hits + cold_loads), 4),
        "cold_loads_per_s": round(cold_loads / duration, 1),
        "imbalance": round(max(served) / mean_served, 3) if mean_served else 0.0,
        "wait_p50_ms": round(percentile(waits, 50) * 1000, 1) if waits else 0.0,
        "wait_p99_ms": round(percentile(waits, 99) * 1000, 1) if waits else 0.0,
        "latency_p99_ms": round(percentile(latencies, 99) * 1000, 1) if latencies else 0.0,
        "measured_s": round(measured, 1),
    }


def main() -> None:
    def extra(p):
        p.add_argument("--backends", type=int, default=None)
        p.add_argument("--slots", type=int, default=32)
        p.add_argument("--running", type=int, default=16)
        p.add_argument("--adapters", type=int, default=None)
        p.add_argument("--zipf", type=float, default=1.1)
        p.add_argument("--load", type=float, default=0.7, help="offered load / fleet capacity")
        p.add_argument("--duration", type=float, default=None, help="simulated seconds")
        p.add_argument("--service-ms", type=float, default=400.0)
        p.add_argument("--cold-ms", type=float, default=150.0)
        p.add_argument("--heartbeat", type=float, default=1.0)
        p.add_argument("--caps", type=str, default=None, help="comma-separated load caps")
        p.add_argument("--seed", type=int, default=0)

    args = bench_args("Fleet simulation of the gateway's backend choice", extra)
    backends = args.backends or (40 if args.quick else 200)
    adapters = args.adapters or (4_000 if args.quick else 20_000)
    duration = args.duration or (10.0 if args.quick else 20.0)
    caps = [float(c) for c in (args.caps or ("1.25" if args.quick else "1.1,1.25,1.5,2.0")
                               ).split(",")]
    common = dict(backends=backends, slots=args.slots, running=args.running, adapters=adapters,
                  zipf_s=args.zipf, load=args.load, duration=duration,
                  service_s=args.service_ms / 1000, cold_s=args.cold_ms / 1000,
                  heartbeat_s=args.heartbeat, burst_every=10.0, burst_len=2.0,
                  burst_factor=1.3, seed=args.seed)
    results = []
    lines = [f"fleet: {backends} backends x {args.slots} slots, {adapters} adapters "
             f"(Zipf s={args.zipf}), load {args.load:.0%}, {duration:.0f} simulated s"]
    header = (f"{'policy':<18}{'requests':>9}{'hit rate':>10}{'cold/s':>9}{'imbalance':>11}"
              f"{'wait p50':>10}{'wait p99':>10}{'lat p99':>10}{'wall s':>8}")
    lines.append(header)
    for policy, cap in [("round_robin", None), ("resident", None)] + [("quiver", c) for c in caps]:
        t0 = time.perf_counter()
        r = simulate(policy, cap=cap or 1.25, **common)
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        lines.append(f"{r['policy']:<18}{r['requests']:>9}{r['hit_rate']:>10.3f}"
                     f"{r['cold_loads_per_s']:>9.1f}{r['imbalance']:>11.2f}"
                     f"{r['wait_p50_ms']:>10.1f}{r['wait_p99_ms']:>10.1f}"
                     f"{r['latency_p99_ms']:>10.1f}{r['wall_s']:>8.1f}")
    rr, res = results[0], results[1]
    quiver_runs = results[2:]
    best = min(quiver_runs, key=lambda r: (r["latency_p99_ms"], -r["hit_rate"]))
    default = next(r for r in quiver_runs if r["policy"] == "quiver(cap=1.25)") \
        if any(r["policy"] == "quiver(cap=1.25)" for r in quiver_runs) else best
    lines.append(f"quiver(cap=1.25) vs round-robin: hit rate {default['hit_rate']:.3f} vs "
                 f"{rr['hit_rate']:.3f}, cold loads/s x{ratio(default['cold_loads_per_s'], rr['cold_loads_per_s'])}")
    lines.append(f"quiver(cap=1.25) vs resident: imbalance {default['imbalance']:.2f} vs "
                 f"{res['imbalance']:.2f}, latency p99 x{ratio(default['latency_p99_ms'], res['latency_p99_ms'])}")
    lines.append(f"lowest p99 latency among the caps: {best['policy']}")
    report(args, {
        "backends": backends, "slots": args.slots, "adapters": adapters,
        "policies": results,
        "quiver_hit_rate": default["hit_rate"], "round_robin_hit_rate": rr["hit_rate"],
        "resident_hit_rate": res["hit_rate"],
        "quiver_imbalance": default["imbalance"], "resident_imbalance": res["imbalance"],
        "quiver_p99_ms": default["latency_p99_ms"], "resident_p99_ms": res["latency_p99_ms"],
        "round_robin_p99_ms": rr["latency_p99_ms"],
        "cold_loads_vs_round_robin": ratio(default["cold_loads_per_s"], rr["cold_loads_per_s"]),
        "best_cap": best["policy"],
    }, lines)


if __name__ == "__main__":
    main()
