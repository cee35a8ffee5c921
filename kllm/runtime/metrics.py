"""Prometheus metrics, one registry per process (no globals shared across tests)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

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


class StageMetrics:
    """What every stage process reports: records in and out per topic, time per record,
    dead letters, records in flight, tokens, cost and cache hits."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.registry = CollectorRegistry()
        r = self.registry
        self.records_in = Counter(
            "kllm_records_in", "Records consumed", ["stage", "topic"], registry=r
        )
        self.records_out = Counter(
            "kllm_records_out", "Records produced", ["stage", "topic"], registry=r
        )
        self.dead_letters = Counter(
            "kllm_dead_letters", "Records sent to a DLQ", ["stage", "topic"], registry=r
        )
        self.seconds = Histogram(
            "kllm_record_seconds",
            "Processing time per record",
            ["stage"],
            buckets=sorted(set(FAST_BUCKETS + SLOW_BUCKETS)),
            registry=r,
        )
        self.in_flight = Gauge("kllm_in_flight", "Records being processed", ["stage"], registry=r)
        self.tokens = Counter(
            "kllm_tokens", "Tokens generated and read", ["model", "kind"], registry=r
        )
        self.cost = Counter("kllm_cost_usd", "Cost of generations", ["model"], registry=r)
        self.cache = Counter("kllm_cache_answers", "Answers served from the cache", registry=r)
        quality = ["tenant", "model", "template", "source"]
        self.groundedness = Histogram(
            "kllm_answer_groundedness",
            "Supported share of an evaluated answer's claims (online evaluation)",
            quality,
            buckets=[i / 10 for i in range(1, 11)],
            registry=r,
        )
        self.evaluated = Counter(
            "kllm_answers_evaluated",
            "Answers scored online, by outcome: supported, unsupported, declined, no_claims, error",
            [*quality, "outcome"],
            registry=r,
        )

    def observe(self, source: str, records: int, outputs: Sequence[Any], seconds: float) -> None:
        """One handled batch (or record) and what it produced."""
        self.records_in.labels(self.stage, source).inc(records)
        if records:
            per_record = seconds / records
            for _ in range(records):
                self.seconds.labels(self.stage).observe(per_record)
        for emit in outputs:
            topic = emit.topic.name
            self.records_out.labels(self.stage, topic).inc()
            if topic.endswith(".dlq"):
                self.dead_letters.labels(self.stage, topic).inc()
            message = emit.message
            usage = getattr(message, "usage", None)
            if getattr(message, "SCHEMA", "") == "llm.generation" and usage is not None:
                model = message.model
                self.tokens.labels(model, "prompt").inc(usage.prompt_tokens)
                self.tokens.labels(model, "completion").inc(usage.completion_tokens)
                self.cost.labels(model).inc(message.cost_usd)
            if getattr(message, "cached", False):
                self.cache.inc()
            if getattr(message, "SCHEMA", "") == "llm.evaluation":
                self._evaluated(message)

    def _evaluated(self, e: Any) -> None:
        labels = (e.tenant, e.model, e.template or "", e.source)
        if e.groundedness is not None:
            self.groundedness.labels(*labels).observe(e.groundedness)
        outcome = (
            "error"
            if e.error
            else "declined"
            if e.declined
            else "no_claims"
            if e.groundedness is None
            else "unsupported"
            if e.unsupported
            else "supported"
        )
        self.evaluated.labels(*labels, outcome).inc()

    def serve(self, port: int) -> None:
        """Expose /metrics on ``port`` (0: not at all)."""
        if not port:
            return
        try:
            start_http_server(port, registry=self.registry)
        except OSError as exc:  # metrics are worth a warning, not a stage that will not start
            log.warning("metrics port unavailable", extra={"port": port, "reason": str(exc)})


_stage: StageMetrics | None = None


def for_stage(stage: str) -> StageMetrics:
    """This process's stage metrics (one stage per process)."""
    global _stage
    if _stage is None:
        _stage = StageMetrics(stage)
    return _stage
