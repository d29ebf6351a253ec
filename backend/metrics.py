"""Prometheus metrics of one backend process, on a registry of its own (``GET /metrics``)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["BackendMetrics", "LiveState", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 30.0, 60.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class LiveState:
    """The values read at scrape time rather than counted as they happen."""

    queue_depth: int
    running: int
    tiers: dict[str, int]         # tier name -> adapters resident there
    free_slots: int


class BackendMetrics:
    """Counters, gauges and histograms of the backend; ``render`` gives the exposition text."""

    def __init__(self, tokens_window_s: float = 10.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("quiver_backend_requests", "Generation requests answered.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("quiver_backend_prompt_tokens", "Prompt tokens processed.",
                                     registry=r)
        self.generated_tokens = Counter("quiver_backend_generated_tokens",
                                        "Completion tokens generated.", registry=r)
        self.tokens_per_second = Gauge("quiver_backend_tokens_per_second",
                                       "Completion tokens per second over the last window.",
                                       registry=r)
        self.queue_depth = Gauge("quiver_backend_queue_depth",
                                 "Requests waiting for an adapter or for the engine.", registry=r)
        self.running = Gauge("quiver_backend_running_requests", "Requests being generated.",
                             registry=r)
        self.adapters = Gauge("quiver_backend_adapters_resident", "Adapters resident per tier.",
                              ["tier"], registry=r)
        self.free_slots = Gauge("quiver_backend_free_slots", "Engine adapter slots free.",
                                registry=r)
        self.adapter_load = Histogram("quiver_backend_adapter_load_seconds",
                                      "Time to bring an adapter into a slot, by its source.",
                                      ["source"], buckets=_LOAD_BUCKETS, registry=r)
        self.evictions = Counter("quiver_backend_evictions", "Adapters evicted, per tier.",
                                 ["tier"], registry=r)
        self.pulls = Counter("quiver_backend_adapter_pulls", "Adapter downloads from the registry.",
                             ["result"], registry=r)
        self.errors = Counter("quiver_backend_errors", "Errors answered, by stable error code.",
                              ["code"], registry=r)
        self.ttft = Histogram("quiver_backend_time_to_first_token_seconds",
                              "Time from request arrival to the first generated token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self._window = tokens_window_s
        self._token_times: deque[tuple[float, int]] = deque()

    def count_tokens(self, prompt: int, completion: int) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt)
        if completion:
            self.generated_tokens.inc(completion)
            self._token_times.append((time.monotonic(), completion))

    def _tokens_rate(self) -> float:
        now = time.monotonic()
        while self._token_times and self._token_times[0][0] < now - self._window:
            self._token_times.popleft()
        return sum(n for _, n in self._token_times) / self._window

    def render(self, live: LiveState) -> bytes:
        self.tokens_per_second.set(self._tokens_rate())
        self.queue_depth.set(live.queue_depth)
        self.running.set(live.running)
        self.free_slots.set(live.free_slots)
        for tier, n in live.tiers.items():
            self.adapters.labels(tier=tier).set(n)
        return generate_latest(self.registry)
