"""The cases of the fault matrix (loadtest/faults.py), each against the running pipeline.

Each case returns rows of the matrix: what was checked, what was counted, and whether
that holds. Callers go through the gateway as a careful client does: an Idempotency-Key
on every request, retries of a dropped connection or a 429/503/504 with the same key.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from harness import Deadline

from kllm.ops.supervisor import Supervisor
from kllm.runtime.kafka import TailReader
from kllm.testing.poison import dlq_counts, flood, publish
from schemas import FeedbackEnriched, Response, decode
from topics import FEEDBACK_ENRICHED, REQUESTS, RESPONSES, STAGES

SUPERVISING = threading.Lock()
"""Held around every call on the supervisor: the benchmark's restarter thread and a
case's scaling must not act on the same process at once (a restart of a process that
scaling has just stopped would leave it running unsupervised)."""


@dataclass(frozen=True)
class Row:
    case: str
    check: str
    value: str
    ok: bool


@dataclass
class Calls:
    """What the callers sent and got, by idempotency key."""

    sent: dict[str, float] = field(default_factory=dict)  # key -> sent at (monotonic)
    answers: dict[str, list[str]] = field(default_factory=dict)  # key -> answer ids
    statuses: dict[str, int] = field(default_factory=dict)  # key -> final HTTP status
    failures: list[str] = field(default_factory=list)
    unfinished: int = 0  # callers still retrying when the deadline passed
    lock: threading.Lock = field(default_factory=threading.Lock)

    def lost(self) -> list[str]:
        with self.lock:
            return [k for k in self.sent if not self.answers.get(k)]

    def twice(self) -> list[str]:
        with self.lock:
            return [k for k, v in self.answers.items() if len(v) > 1]


@dataclass(frozen=True)
class Gateway:
    url: str
    key: str
    feedback_key: str = ""

    def headers(self, idem: str, key: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {key or self.key}", "idempotency-key": idem}


def ask(
    gw: Gateway,
    calls: Calls,
    prompt: str,
    deadline: Deadline,
    *,
    key: str | None = None,
    final: frozenset[int] = frozenset({200}),
) -> str | None:
    """One caller: retries until an answer (or a status in ``final``) or the deadline;
    the answer's id."""
    idem = f"fault-{uuid.uuid4()}"
    body = {"model": "scripted", "messages": [{"role": "user", "content": f"{prompt} {idem}"}]}
    with calls.lock:
        calls.sent[idem] = time.monotonic()
    for _attempt in range(30):
        if deadline.expired():
            with calls.lock:
                calls.unfinished += 1
            return None
        try:
            r = httpx.post(
                f"{gw.url}/v1/chat/completions",
                json=body,
                headers=gw.headers(idem, key),
                timeout=min(60, deadline.left() + 1),
            )
        except httpx.HTTPError:
            time.sleep(1.0)
            continue
        if r.status_code == 200 or r.status_code in final:
            answer = str(r.json()["id"]) if r.status_code == 200 else None
            with calls.lock:
                calls.statuses[idem] = r.status_code
                if answer is not None:
                    calls.answers.setdefault(idem, []).append(answer)
            return answer
        if r.status_code in (429, 503, 504):
            time.sleep(1.0)
            continue
        with calls.lock:
            calls.failures.append(f"HTTP {r.status_code}: {r.text[:120]}")
        return None
    with calls.lock:
        calls.failures.append(f"{idem}: no answer after 30 tries")
    return None


def steady(
    rate: float, stop: threading.Event, deadline: Deadline, call: Callable[[int], object]
) -> threading.Thread:
    """A thread starting ``call(i)`` in its own thread ``rate`` times a second until
    ``stop``; joining it waits for every call it started."""

    def run() -> None:
        threads, i = [], 0
        while not stop.is_set() and not deadline.expired():
            t = threading.Thread(target=call, args=(i,), daemon=True)
            t.start()
            threads.append(t)
            i += 1
            stop.wait(1 / rate)
        for t in threads:
            t.join(deadline.left() + 2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def calls_rows(case: str, calls: Calls) -> list[Row]:
    lost, twice = calls.lost(), calls.twice()
    return [
        Row(case, "requests answered", f"{len(calls.answers)} of {len(calls.sent)}", not lost),
        Row(case, "lost", str(len(lost)), not lost and not calls.unfinished),
        Row(case, "answered twice", str(len(twice)), not twice),
        Row(case, "caller errors", str(len(calls.failures)), not calls.failures),
    ]


# -- poison -----------------------------------------------------------------------------------


def poison(
    sup: Supervisor, bootstrap: str, gw: Gateway, deadline: Deadline, count: int
) -> list[Row]:
    """``count`` malformed records (20 of them 1-8 MB) published to the request topic by a
    plain producer: each dead-lettered once, no stage restarted, valid traffic answered."""
    case = "poison"
    pids = {sp.name: sp.proc.pid if sp.proc else None for sp in sup.procs}
    restarts = sum(sp.restarts for sp in sup.procs)
    calls = Calls()
    ask(gw, calls, "Poison control before: what is a partition?", deadline)
    t0 = time.monotonic()
    sent = publish(bootstrap, [(REQUESTS, p) for p in flood(REQUESTS, count, big=20)])
    ask(gw, calls, "Poison control after: what is retention?", deadline)
    counts = dlq_counts(bootstrap, [REQUESTS])
    while not sent <= counts.keys() and not deadline.expired():
        time.sleep(1.0)
        counts = dlq_counts(bootstrap, [REQUESTS])
    took = time.monotonic() - t0
    once = sum(1 for ref in sent if counts.get(ref) == 1)
    more = sum(1 for ref in sent if counts.get(ref, 0) > 1)
    now_pids = {sp.name: sp.proc.pid if sp.proc else None for sp in sup.procs}
    restarted = sum(sp.restarts for sp in sup.procs) - restarts + (now_pids != pids)
    return [
        Row(case, "malformed records published", str(len(sent)), len(sent) == count),
        Row(
            case,
            "dead-lettered exactly once",
            f"{once} of {len(sent)} in {took:.0f} s",
            once == len(sent),
        ),
        Row(case, "dead-lettered more than once", str(more), more == 0),
        Row(case, "stage restarts", str(restarted), restarted == 0),
        Row(
            case,
            "valid requests before and after answered",
            f"{len(calls.answers)} of 2",
            not calls.lost(),
        ),
    ]


# -- SIGKILL of each stage --------------------------------------------------------------------


def kill_each(
    sup: Supervisor,
    gw: Gateway,
    deadline: Deadline,
    rate: float,
    settle_s: float,
    recovery_s: float,
) -> list[Row]:
    """SIGKILL of each stage's first process in turn under load (its peer, where it has
    one, takes over); the supervisor restarts it. Recovery: from the kill until a request
    sent after it is answered."""
    case = "sigkill"
    calls, stop = Calls(), threading.Event()
    load = steady(rate, stop, deadline, lambda i: ask(gw, calls, f"Kill Q{i}", deadline))
    rows: list[Row] = []
    time.sleep(min(settle_s, deadline.left()))
    for stage in STAGES:
        replicas = sum(1 for sp in sup.procs if sp.stage == stage)
        if deadline.left() < settle_s + 10:
            rows.append(Row(case, f"{stage} ({replicas} replicas)", "NOT RUN (time limit)", False))
            continue
        killed_at = time.monotonic()
        with SUPERVISING:
            sup.kill(stage, 0)
        took = _answered_after(calls, killed_at, deadline.within(recovery_s))
        text = "did not recover" if took is None else f"answering again after {took:.1f} s"
        rows.append(Row(case, f"{stage} ({replicas} replicas) killed", text, took is not None))
        print(f"  {stage:10} {text}", flush=True)
        time.sleep(min(settle_s, deadline.left()))
    stop.set()
    load.join(deadline.left() + 5)
    return rows + calls_rows(case, calls)


def _answered_after(calls: Calls, killed_at: float, until: Deadline) -> float | None:
    while not until.expired():
        with calls.lock:
            if any(calls.sent[k] > killed_at for k in calls.answers):
                return time.monotonic() - killed_at
        time.sleep(0.1)
    return None


# -- scaling ----------------------------------------------------------------------------------


@dataclass
class Streams:
    texts: dict[str, str] = field(default_factory=dict)  # request id -> streamed text
    broken: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def ask_streaming(gw: Gateway, streams: Streams, i: int, deadline: Deadline) -> None:
    idem = f"stream-{uuid.uuid4()}"
    body = {
        "model": "scripted",
        "stream": True,
        "messages": [{"role": "user", "content": f"Stream {i} {idem}: SCRIPT:clean"}],
    }
    text, rid, done = [], "", False
    try:
        with httpx.stream(
            "POST",
            f"{gw.url}/v1/chat/completions",
            json=body,
            headers=gw.headers(idem),
            timeout=min(60, deadline.left() + 1),
        ) as r:
            if r.status_code != 200:
                raise httpx.HTTPError(f"HTTP {r.status_code}")
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = orjson.loads(line[6:])
                    rid = event.get("id", rid)
                    for choice in event.get("choices", []):
                        text.append(choice.get("delta", {}).get("content") or "")
    except httpx.HTTPError as exc:
        with streams.lock:
            streams.broken.append(f"{idem}: {exc}")
        return
    with streams.lock:
        if done and rid:
            streams.texts[rid] = "".join(text)
        else:
            streams.broken.append(f"{idem}: ended without [DONE]")


def scale(
    sup: Supervisor,
    bootstrap: str,
    gw: Gateway,
    deadline: Deadline,
    rate: float,
    quota_rpm: int,
    quota_key: str,
    settle_s: float,
) -> list[Row]:
    """Ingestion, moderation and feedback scaled down to one process and up to two again
    while callers ask (plain, streamed, and a tenant at its quota) and rate answers."""
    case = "scale"
    calls, quota, streams, stop = Calls(), Calls(), Streams(), threading.Event()
    responses = TailReader(bootstrap, RESPONSES.name, {"fetch.wait.max.ms": 10})
    enriched = TailReader(bootstrap, FEEDBACK_ENRICHED.name, {"fetch.wait.max.ms": 10})
    rated: list[str] = []

    def plain(i: int) -> None:
        rid = ask(gw, calls, f"Scale Q{i}", deadline)
        if rid is not None and i % 2 == 0:  # rate every other answer
            r = httpx.post(
                f"{gw.url}/v1/feedback",
                json={"request_id": rid, "rating": 1 + i % 5},
                headers={"authorization": f"Bearer {gw.key}"},
                timeout=30,
            )
            if r.status_code < 300:
                with calls.lock:
                    rated.append(rid)

    # The quota tenant asks twice its per-minute limit while ingestion moves down and up,
    # all within one minute of the clock (the quota's window), from its start; 429 is final.
    quota_s = 2.5 * settle_s
    _wait_for_a_minute_with(quota_s + 10, deadline)
    quota_stop = threading.Event()
    over = frozenset({429})
    loads = [
        steady(rate, stop, deadline, plain),
        steady(rate / 2, stop, deadline, lambda i: ask_streaming(gw, streams, i, deadline)),
    ]
    quota_load = steady(
        2 * quota_rpm / quota_s,
        quota_stop,
        deadline,
        lambda i: ask(gw, quota, f"Quota Q{i}", deadline, key=quota_key, final=over),
    )
    moves = []
    try:
        for stage, replicas in [
            ("ingestion", 1),
            ("ingestion", 2),
            ("moderation", 1),
            ("moderation", 2),
            ("feedback", 1),
            ("feedback", 2),
        ]:
            time.sleep(min(settle_s, deadline.left()))
            with SUPERVISING:
                changed = sup.scale(stage, replicas)
            moves.append(f"{stage}->{replicas}: {', '.join(changed) or '-'}")
            print(f"  scaled {moves[-1]}", flush=True)
            if len(moves) == 2:
                time.sleep(min(quota_s - 2 * settle_s, deadline.left()))
                quota_stop.set()
        time.sleep(min(settle_s, deadline.left()))
    finally:
        stop.set()
        quota_stop.set()
        for t in [*loads, quota_load]:
            t.join(deadline.left() + 5)
    finals = _read(responses, set(streams.texts), Response, deadline.within(60))
    joins = _read(enriched, set(rated), FeedbackEnriched, deadline.within(60))
    responses.close()
    enriched.close()
    accepted = sum(1 for s in quota.statuses.values() if s == 200)
    refused = sum(1 for s in quota.statuses.values() if s == 429)
    unequal = [
        rid for rid, text in streams.texts.items() if rid in finals and finals[rid].text != text
    ]
    missing = set(streams.texts) - set(finals)
    joined = sum(1 for j in joins.values() if j.status == "joined")
    # A record in flight when its partition moves may be counted by both owners: one.
    slack = 1
    quota_sent = len(quota.sent)
    return [
        Row(case, "scaled", "; ".join(moves), len(moves) == 6),
        *calls_rows(case, calls),
        Row(
            case,
            f"quota tenant ({quota_rpm}/min, {quota_sent} asked in {quota_s:.0f} s) accepted",
            f"{accepted} ({refused} refused)",
            accepted <= quota_rpm + slack and refused > 0,
        ),
        Row(
            case,
            "streams complete",
            f"{len(streams.texts)} of {len(streams.texts) + len(streams.broken)}",
            not streams.broken,
        ),
        Row(
            case,
            "streams equal to the final moderated text",
            f"{len(streams.texts) - len(unequal) - len(missing)} of {len(streams.texts)}",
            not unequal and not missing,
        ),
        Row(
            case,
            "feedback joined (not orphaned)",
            f"{joined} of {len(rated)}",
            joined == len(rated),
        ),
    ]


def _wait_for_a_minute_with(seconds: float, deadline: Deadline) -> None:
    """Wait, if need be, for the next minute of the clock, so ``seconds`` fit in one."""
    left_in_minute = 60 - time.time() % 60
    if left_in_minute < seconds:
        time.sleep(min(left_in_minute + 0.5, deadline.left()))


def _read(reader: TailReader, keys: set[str], schema: type, until: Deadline) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if not keys:
        return found
    for key, value in reader.records(until.left()):
        if key in keys and key not in found:
            found[key] = decode(value, schema)
            if len(found) == len(keys):
                break
    return found
