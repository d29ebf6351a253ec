"""Backend selection: which backends to try, in order, for one request. Pure, no I/O.

Adapter requests use consistent hashing with bounded loads over rendezvous (highest random
weight) ranks, scored by residency:

1. Only backends that serve the request's base model and are not draining are eligible;
   ejected backends (repeated failures) are eligible only when nothing else is.
2. ``load = in-flight requests from this gateway + the backend's reported queue depth``.
   The cap is ``ceil(load_cap × (Σ load + 1) / n)``, and never more than the backend's
   reported ``max_running`` (past it a backend only queues): a backend at its cap takes no
   more of this adapter's traffic while others are below it, so no adapter creates a hotspot.
3. Backends under the cap come first, best residency first (engine slot 1.0, loading 0.9,
   host cache 0.7, disk cache 0.6, not resident with a free slot 0.5, not resident and full
   0.3). Among backends that hold the adapter in a slot (or are loading it) the least loaded
   comes first; elsewhere the adapter's rendezvous rank decides, so a cold adapter lands on
   the same small set of backends every time instead of being loaded everywhere.
4. Backends at or over the cap follow, least loaded first: they are the retries.

The defaults (``load_cap=1.25``) come from ``bench/fleet_sim.py``; docs/benchmarks.md has
the figures.

Base-model requests (no adapter) use the power of two choices: two random eligible backends,
the less loaded first, then the rest by load.

:func:`choose_backends` is the exact code the gateway runs and ``bench/fleet_sim.py`` calls.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Mapping, Sequence
from functools import lru_cache

from quiver.wire import BackendHeartbeat

__all__ = ["choose_backends", "residency_score", "rendezvous_weight", "backend_load"]

_RNG = random.Random()
_TIER_SCORES = (("gpu", 1.0), ("loading", 0.9), ("host", 0.7), ("disk", 0.6))


def residency_score(hb: BackendHeartbeat, adapter: str) -> float:
    """How cheaply ``hb`` can serve ``adapter`` right now (1.0 = already in an engine slot)."""
    for tier, score in _TIER_SCORES:
        if adapter in getattr(hb, tier):
            return score
    if hb.total_slots and hb.free_slots <= 0:
        return 0.3
    return 0.5


@lru_cache(maxsize=1 << 16)
def rendezvous_weight(adapter: str, backend_id: str) -> int:
    """The stable pseudo-random weight of ``backend_id`` for ``adapter`` (higher ranks first)."""
    digest = hashlib.blake2b(f"{adapter}\x00{backend_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def backend_load(hb: BackendHeartbeat, inflight: Mapping[str, int]) -> int:
    return inflight.get(hb.backend_id, 0) + max(hb.queue_depth, 0)


def _eligible(base_model: str, backends: Sequence[BackendHeartbeat],
              excluded: Collection[str]) -> list[BackendHeartbeat]:
    serving = [hb for hb in backends if hb.base_model == base_model and not hb.draining]
    healthy = [hb for hb in serving if hb.backend_id not in excluded]
    return healthy or serving


def choose_backends(*, base_model: str, adapter: str | None,
                    backends: Sequence[BackendHeartbeat], inflight: Mapping[str, int],
                    excluded: Collection[str] = (), load_cap: float = 1.25,
                    rng: random.Random | None = None) -> list[BackendHeartbeat]:
    """Order the backends to try for a request; empty when none serves ``base_model``.

    ``adapter`` is the canonical ``repo/N`` ref or None for the base model alone;
    ``inflight`` maps backend ids to requests this caller has in flight there;
    ``excluded`` lists ejected backend ids, used only when no other backend is eligible.
    """
    eligible = _eligible(base_model, backends, excluded)
    if len(eligible) <= 1:
        return eligible
    loads = {hb.backend_id: backend_load(hb, inflight) for hb in eligible}
    if adapter is None:
        return _two_choices(eligible, loads, rng or _RNG)

    ranks = {hb.backend_id: rendezvous_weight(adapter, hb.backend_id) for hb in eligible}
    cap = max(1, math.ceil(load_cap * (sum(loads.values()) + 1) / len(eligible)))
    def limit(hb: BackendHeartbeat) -> int:
        # Past its engine's concurrency a backend only queues, whatever the fleet's mean load.
        return min(cap, hb.max_running) if hb.max_running > 0 else cap

    under = [hb for hb in eligible if loads[hb.backend_id] + 1 <= limit(hb)]
    over = [hb for hb in eligible if loads[hb.backend_id] + 1 > limit(hb)]
    def key(hb: BackendHeartbeat):
        score = residency_score(hb, adapter)
        # Where the adapter is already resident, the least loaded such backend; elsewhere the
        # adapter's own rendezvous order, so cold loads land on a small, stable set.
        return (-score, loads[hb.backend_id] if score >= 0.9 else 0, -ranks[hb.backend_id])

    under.sort(key=key)
    over.sort(key=lambda hb: (loads[hb.backend_id], -ranks[hb.backend_id]))
    return under + over


def _two_choices(eligible: list[BackendHeartbeat], loads: Mapping[str, int],
                 rng: random.Random) -> list[BackendHeartbeat]:
    if len(eligible) == 1:
        return list(eligible)
    first, second = rng.sample(eligible, 2)
    if loads[second.backend_id] < loads[first.backend_id]:
        first, second = second, first
    rest = [hb for hb in eligible if hb is not first and hb is not second]
    rest.sort(key=lambda hb: loads[hb.backend_id])
    return [first, second, *rest]
