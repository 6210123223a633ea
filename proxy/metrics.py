"""Prometheus metrics, shared by all worker processes through prometheus-client's multiprocess
mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (the CLI sets it before importing this module).

The hot path only bumps plain integers in :class:`Tally`; ``flush()`` (twice a second, and
before ``/metrics`` is rendered) moves them into the shared Prometheus values, so a scrape
may lag the other workers by up to half a second.
"""

from __future__ import annotations

import bisect
import os
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The proxy's metrics for one worker process."""

    def __init__(self) -> None:
        self.multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        reg = None if self.multiproc_dir else CollectorRegistry()
        self._registry = reg
        self.requests = Counter(
            "hep_proxy_requests", "Requests answered", ["kind", "status"], registry=reg
        )
        self.bytes = Counter(
            "hep_proxy_response_bytes", "Body bytes sent (HEAD counts 0)", ["kind"], registry=reg
        )
        self.cache = Counter(
            "hep_proxy_cache", "Memory cache lookups for data objects", ["result"], registry=reg
        )
        self.store_misses = Counter(
            "hep_proxy_store_misses", "Objects not found in the store", registry=reg
        )
        self.upstream = Counter(
            "hep_proxy_upstream_fetches",
            "Upstream requests by outcome (ok, missing, corrupt, error)",
            ["result"],
            registry=reg,
        )
        self.upstream_bytes = Counter(
            "hep_proxy_upstream_bytes", "Bytes fetched from upstream", registry=reg
        )
        self.errors = Counter("hep_proxy_errors", "Errors by type", ["type"], registry=reg)
        self.rejected = Counter(
            "hep_proxy_rejected_connections",
            "Connections refused or closed by policy",
            ["reason"],
            registry=reg,
        )
        self.latency = Histogram(
            "hep_proxy_request_duration_seconds",
            "Time from request parsed to response handed to the kernel",
            ["kind"],
            buckets=BUCKETS,
            registry=reg,
        )
        self.inflight = Gauge(
            "hep_proxy_inflight_requests",
            "Requests being answered by the general (non-cached) path",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.tally = Tally()

    def flush(self) -> None:
        t = self.tally
        for (kind, status), n in t.requests.items():
            self.requests.labels(kind, str(status)).inc(n)
        for kind, n in t.bytes.items():
            self.bytes.labels(kind).inc(n)
        for result, n in t.cache.items():
            self.cache.labels(result).inc(n)
        for kind, (counts, total) in t.latency.items():
            child = self.latency.labels(kind)
            buckets = getattr(child, "_buckets", None)
            sum_value = getattr(child, "_sum", None)
            if buckets is not None and sum_value is not None and len(buckets) == len(counts):
                # bulk add: one write per bucket instead of one observe() per request
                for value, n in zip(buckets, counts, strict=True):
                    if n:
                        value.inc(n)
                sum_value.inc(total)
            else:  # pragma: no cover - other prometheus-client internals
                for i, n in enumerate(counts):
                    bound = (*BUCKETS, float("inf"))[i]
                    for _ in range(n):
                        child.observe(min(bound, 1e9))
        t.clear()

    def render(self) -> bytes:
        self.flush()
        if self.multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, self.multiproc_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        assert self._registry is not None
        return generate_latest(self._registry)


class Tally:
    """Plain counters for the hot path (no locks, no shared memory)."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.bytes: defaultdict[str, int] = defaultdict(int)
        self.cache: defaultdict[str, int] = defaultdict(int)
        self.latency: dict[str, tuple[list[int], float]] = {}

    def clear(self) -> None:
        self.requests.clear()
        self.bytes.clear()
        self.cache.clear()
        self.latency.clear()

    def answered(self, kind: str, status: int, sent: int, seconds: float) -> None:
        self.requests[kind, status] += 1
        if sent:
            self.bytes[kind] += sent
        entry = self.latency.get(kind)
        if entry is None:
            entry = self.latency[kind] = ([0] * (len(BUCKETS) + 1), 0.0)
        entry[0][bisect.bisect_left(BUCKETS, seconds)] += 1
        self.latency[kind] = (entry[0], entry[1] + seconds)
