"""What the live dashboard shows, read from Kafka itself.

A thread tails the pipeline's topics from their end (no consumer group, so it
takes nothing from the stages): records per second per topic; per stage, the
time from a request's record on the stage's input topic to its record on the
next topic (by the records' timestamps, the time each was produced: every stage
stamps its outputs so); recent dead letters and drift alerts. Consumer
lag per partition comes from the committed offsets of every declared group
(topics.groups: inference pools and the cache filler included), every few seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer

from kllm.core.errors import BrokerError, PipelineError
from kllm.core.refs import readable_key
from kllm.runtime.kafka import end_offsets
from kllm.runtime.lag import Lag, consumer_lag, lag_groups
from schemas import DeadLetter, DriftAlert, Evaluation, decode, peek_request_id
from topics import (
    DASHBOARD_GROUP,
    DRIFT_ALERTS,
    EVALUATIONS,
    GENERATIONS,
    INFERENCE,
    REQUESTS,
    RESPONSES,
    RETRIEVAL,
    declared,
)

# stage -> (its input topic, the topic its output for the request lands on)
HOPS = {
    "ingestion": (REQUESTS.name, RETRIEVAL.name),
    "retrieval": (RETRIEVAL.name, INFERENCE.name),
    "inference": (INFERENCE.name, GENERATIONS.name),
    "moderation": (GENERATIONS.name, RESPONSES.name),
}
WINDOW_S = 10.0

log = logging.getLogger(__name__)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


@dataclass
class Quality:
    """The recent online evaluations of one (tenant, model, template, source)."""

    groundedness: deque[float] = field(default_factory=lambda: deque(maxlen=500))
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=500))
    """Per scored answer with claims: whether it was unsupported."""
    evaluated: int = 0


@dataclass
class Snapshot:
    seen: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=50_000))
    stamps: OrderedDict[str, dict[str, float]] = field(default_factory=OrderedDict)
    hop_ms: dict[str, deque[float]] = field(
        default_factory=lambda: {s: deque(maxlen=500) for s in HOPS}
    )
    dead: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    lag: list[Lag] = field(default_factory=list)
    lag_error: str | None = None
    quality: dict[tuple[str, str, str, str], Quality] = field(default_factory=dict)


class PipelineMonitor:
    def __init__(self, bootstrap: str, pools: Iterable[str] = (), lag_every_s: float = 5.0) -> None:
        """``pools``: the inference pools whose groups and topics to show too (the
        gateway passes its KLLM_INFERENCE_POOLS)."""
        self.bootstrap = bootstrap
        self.pools = tuple(pools)
        self.groups = lag_groups(self.pools)
        """Every group whose lag is shown: group -> the topics it reads."""
        self.lag_every_s = lag_every_s
        self.snap = Snapshot()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.tailing = False  # set once every topic is assigned: records from then on count

    def start(self) -> None:
        if self._threads:
            return
        for target in (self._tail, self._poll_lag):
            thread = threading.Thread(target=target, daemon=True, name=target.__name__)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()

    def _tail(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": DASHBOARD_GROUP,
                "enable.auto.commit": False,
            }
        )
        try:
            if not self._assign_at_end(consumer):
                return
            self.tailing = True
            while not self._stop.is_set():
                msg = consumer.poll(0.2)
                if msg is not None and msg.error() is None:
                    _kind, produced_ms = msg.timestamp()
                    record = (msg.topic() or "", msg.key(), msg.value() or b"")
                    self._record(*record, produced_ms / 1000)
        finally:
            consumer.close()

    def _assign_at_end(self, consumer: Consumer) -> bool:
        """Every topic assigned at its end, tried again while the broker cannot say where
        that is (it is starting, or gone for a while); False when stopped first."""
        topics = declared(self.pools)
        while not self._stop.is_set():
            try:
                consumer.assign([tp for t in topics for tp in end_offsets(consumer, t.name)])
                return True
            except BrokerError as exc:
                log.warning("dashboard cannot tail the topics yet", extra={"error": str(exc)})
                self._stop.wait(self.lag_every_s)
        return False

    def _record(self, topic: str, key: bytes | None, value: bytes, produced_at: float) -> None:
        with self._lock:
            self.snap.seen.append((time.time(), topic))
            if topic.endswith(".dlq"):
                self._dead_letter(value)
            elif topic == DRIFT_ALERTS.name:
                self._drift(value)
            elif topic == EVALUATIONS.name:
                self._evaluation(value)
            else:
                rid = peek_request_id(value) if topic == REQUESTS.name else readable_key(key)
                if rid:
                    self._stamp(rid, topic, produced_at)

    def _stamp(self, rid: str, topic: str, at: float) -> None:
        stamps = self.snap.stamps.setdefault(rid, {})
        if topic in stamps:
            return  # a replayed duplicate: the first copy timed the hop
        stamps[topic] = at
        # Partitions arrive here in any order: a hop is timed when its second end shows up.
        for stage, (into, out) in HOPS.items():
            if topic in (into, out) and into in stamps and out in stamps:
                self.snap.hop_ms[stage].append((stamps[out] - stamps[into]) * 1000)
        while len(self.snap.stamps) > 5000:
            self.snap.stamps.popitem(last=False)

    def _dead_letter(self, value: bytes) -> None:
        try:
            d = decode(value, DeadLetter)
        except PipelineError:
            return
        self.snap.dead.appendleft({"stage": d.stage, "reason": d.reason, "at": d.failed_at})

    def _drift(self, value: bytes) -> None:
        try:
            a = decode(value, DriftAlert)
        except PipelineError:
            return
        self.snap.alerts.appendleft(
            {
                "tenant": a.tenant,
                "model": a.model,
                "signal": a.signal,
                "detector": a.detector,
                "before": a.before.get("mean"),
                "after": a.after.get("mean"),
                "at": a.detected_at,
            }
        )

    def _evaluation(self, value: bytes) -> None:
        try:
            e = decode(value, Evaluation)
        except PipelineError:
            return
        key = (e.tenant, e.model, e.template or "", e.source)
        q = self.snap.quality.get(key)
        if q is None:
            if len(self.snap.quality) >= 200:  # bounded: the dashboard is not a database
                return
            q = self.snap.quality[key] = Quality()
        q.evaluated += 1
        if e.groundedness is not None:
            q.groundedness.append(e.groundedness)
            q.outcomes.append(e.unsupported)

    def _poll_lag(self) -> None:
        while not self._stop.is_set():
            try:
                lag, error = consumer_lag(self.bootstrap, self.groups), None
            except BrokerError as exc:
                lag, error = [], str(exc)
            with self._lock:
                self.snap.lag, self.snap.lag_error = lag, error
            self._stop.wait(self.lag_every_s)

    def data(self) -> dict[str, Any]:
        """Everything the page shows, as JSON."""
        now = time.time()
        with self._lock:
            recent = Counter(t for at, t in self.snap.seen if now - at <= WINDOW_S)
            by_group: dict[str, int] = {}
            for row in self.snap.lag:
                by_group[f"{row.group} / {row.topic}"] = (
                    by_group.get(f"{row.group} / {row.topic}", 0) + row.lag
                )
            return {
                "at": now,
                "tailing": self.tailing,
                "throughput": {t: round(n / WINDOW_S, 2) for t, n in sorted(recent.items())},
                "latency_ms": {
                    s: {"p50": _pct(list(v), 0.5), "p95": _pct(list(v), 0.95), "n": len(v)}
                    for s, v in self.snap.hop_ms.items()
                },
                "groups": {g: list(topics) for g, topics in self.groups.items()},
                "lag": dict(by_group),
                "lag_partitions": [
                    {
                        "group": r.group,
                        "topic": r.topic,
                        "partition": r.partition,
                        "committed": r.committed,
                        "end": r.end,
                        "lag": r.lag,
                    }
                    for r in self.snap.lag
                ],
                "lag_error": self.snap.lag_error,
                "dead_letters": list(self.snap.dead),
                "drift_alerts": list(self.snap.alerts),
                "quality": [
                    {
                        "tenant": tenant,
                        "model": model,
                        "template": template,
                        "source": source,
                        "evaluated": q.evaluated,
                        "groundedness_p50": _pct(list(q.groundedness), 0.5),
                        "unsupported_rate": round(sum(q.outcomes) / len(q.outcomes), 3)
                        if q.outcomes
                        else None,
                    }
                    for (tenant, model, template, source), q in sorted(self.snap.quality.items())
                ],
            }
