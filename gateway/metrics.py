"""Prometheus metrics of one gateway process, in a registry of its own (served at /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["GatewayMetrics"]


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._answered: dict[tuple[str, int | str], Any] = {}
        self._first_byte: dict[str, Any] = {}
        self._routed: dict[str, Any] = {}
        r = self.registry
        self.requests = Counter("quiver_gateway_requests_total", "Requests answered",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("quiver_gateway_request_seconds",
                                 "Time to the first byte of the answer", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5,
                                          5, 10, 30), registry=r)
        self.upstream_failures = Counter("quiver_gateway_upstream_failures_total",
                                         "Failed attempts on a backend", ["backend", "kind"],
                                         registry=r)
        self.retries = Counter("quiver_gateway_retries_total",
                               "Requests sent again to another backend", registry=r)
        self.ejections = Counter("quiver_gateway_ejections_total",
                                 "Backends taken out after repeated failures", ["backend"],
                                 registry=r)
        self.stream_errors = Counter("quiver_gateway_stream_errors_total",
                                     "Streams ended with an error event after output began",
                                     registry=r)
        self.client_disconnects = Counter("quiver_gateway_client_disconnects_total",
                                          "Requests whose client went away; upstream cancelled",
                                          registry=r)
        self.rate_limited = Counter("quiver_gateway_rate_limited_total",
                                    "Requests refused by a rate limit", ["limit"], registry=r)
        self.limiter_errors = Counter("quiver_gateway_rate_limiter_errors_total",
                                      "Rate-limit checks that could not reach Redis, by the "
                                      "policy applied", ["policy"], registry=r)
        self.limiter_degraded = Gauge("quiver_gateway_rate_limiter_degraded",
                                      "1 while the last rate-limit check could not reach Redis",
                                      registry=r)
        self.inflight = Gauge("quiver_gateway_inflight", "Requests in flight per backend",
                              ["backend"], registry=r)
        self.backends = Gauge("quiver_gateway_backends", "Known backends by state", ["state"],
                              registry=r)
        self.routed = Counter("quiver_gateway_routed_total", "Requests by how the model was chosen",
                              ["kind"], registry=r)

    def count(self, endpoint: str, status: int | str) -> None:
        """Count one answered request (label children cached: this runs on every request)."""
        child = self._answered.get((endpoint, status))
        if child is None:
            child = self._answered[(endpoint, status)] = self.requests.labels(endpoint,
                                                                              str(status))
        child.inc()

    def first_byte(self, endpoint: str, seconds: float) -> None:
        child = self._first_byte.get(endpoint)
        if child is None:
            child = self._first_byte[endpoint] = self.latency.labels(endpoint)
        child.observe(seconds)

    def routed_as(self, kind: str) -> None:
        child = self._routed.get(kind)
        if child is None:
            child = self._routed[kind] = self.routed.labels(kind)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
