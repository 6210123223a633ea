"""Prometheus metrics, shared by all worker processes through prometheus-client's multiprocess
mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (the CLI sets it before importing this module)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The proxy's counters; one instance per worker process."""

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
            "Time from request parsed to response sent",
            ["kind"],
            buckets=_BUCKETS,
            registry=reg,
        )
        self.inflight = Gauge(
            "hep_proxy_inflight_requests",
            "Requests being answered",
            registry=reg,
            multiprocess_mode="livesum",
        )

    def render(self) -> bytes:
        if self.multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, self.multiproc_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        assert self._registry is not None
        return generate_latest(self._registry)
