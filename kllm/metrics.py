"""Prometheus metrics, one registry per process (no globals shared across tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Milliseconds matter for gateway overhead; seconds for the pipeline.
FAST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kllm_gateway_requests",
            "Chat completion requests by HTTP status",
            ["status"],
            registry=r,
        )
        self.errors = Counter(
            "kllm_gateway_errors", "Refused or failed requests by error code", ["code"], registry=r
        )
        self.shed = Counter(
            "kllm_gateway_shed",
            "Requests refused with 429 because too many were waiting",
            registry=r,
        )
        self.cache_hits = Counter(
            "kllm_gateway_cache_hits", "Answers served from the response cache", registry=r
        )
        self.waiting = Gauge("kllm_gateway_waiting", "Callers waiting for a reply", registry=r)
        self.overhead = Histogram(
            "kllm_gateway_overhead_seconds",
            "Gateway time outside the pipeline",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.pipeline = Histogram(
            "kllm_gateway_pipeline_seconds",
            "Publish to reply, as seen by the gateway",
            buckets=SLOW_BUCKETS,
            registry=r,
        )

    def observe_ok(self, pipeline_s: float, overhead_s: float, cached: bool) -> None:
        self.requests.labels("200").inc()
        self.pipeline.observe(pipeline_s)
        self.overhead.observe(overhead_s)
        if cached:
            self.cache_hits.inc()

    def observe_error(self, status: int, code: str) -> None:
        self.requests.labels(str(status)).inc()
        self.errors.labels(code).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
