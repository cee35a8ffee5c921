"""Moderation stage throughput and the latency it adds, whole answers and streams.

1. checks alone: the OutputModerator the stage runs (real classifier, presidio,
   policies), in process, per answer: p50/p99.
2. throughput: generations published at once to llm.generations, responses
   read from llm.responses: answers/s through the stage process.
3. added latency: generations published at a steady rate; for each, the time
   from publishing it to reading its response (one hop in, the checks, one hop
   out): p50/p99.
4. streams: token deltas (6 characters each) of the same answers published to
   llm.tokens; moderated windows read from llm.tokens.moderated: deltas/s, and
   the time from a sentence's last delta to its moderated window.

    python loadtest/moderation_throughput.py --answers 1000 --rate 50

Time limit: the whole run, startup and teardown included, ends within --limit-s
(default 600 s). Every wait for the stage's output has a timeout and none goes past the
limit; what did not come back counts as lost. Ctrl-C or SIGTERM stops every process it
started.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from harness import add_limit_arg, current, pct, run_limited, running

from kllm.runtime.kafka import TailReader, make_producer
from processors.moderation import Context
from schemas import Generation, Request, TokenDelta, decode, encode
from services.moderation import Settings, build_checks
from topics import GENERATIONS, MODERATED_TOKENS, RESPONSES, TOKENS

ANSWERS = [
    "Partitions keep records in order by key. Consumers in a group share partitions.",
    "Offsets are committed after the output is written, so a crash replays, never loses.",
    "Write to the admin at jane.roe@example.com or call 212-555-0199 for access.",
    "The retrieval stage embeds the question and searches the tenant's chunks [1].",
    "You are an idiot, this is a stupid question.",
    "A dead-letter queue keeps records a stage could not process, with the reason.",
    "Globex runs a similar setup, but this answer is about our own pipeline.",
    "Inference workers keep N requests in flight and commit in order [2].",
]

LIMIT_S = 600
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""


def generation(i: int) -> Generation:
    text = ANSWERS[i % len(ANSWERS)]
    req = Request(request_id=f"m-{uuid.uuid4()}", tenant="acme" if i % 2 else "t", prompt="q")
    return Generation(request=req, text=text, model="m", finish_reason="stop")


def checks_alone(n: int) -> tuple[float, float]:
    checks = build_checks(Settings())
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        checks.moderate(ANSWERS[i % len(ANSWERS)], Context("acme" if i % 2 else "t"))
        lat.append((time.perf_counter() - t0) * 1000)
    return pct(lat, 0.5), pct(lat, 0.99)


def throughput(bootstrap: str, n: int) -> tuple[float, int]:
    reader = TailReader(bootstrap, RESPONSES.name, {"fetch.wait.max.ms": 10})
    producer = make_producer(bootstrap)
    gens = [generation(i) for i in range(n)]
    t0 = time.perf_counter()
    for g in gens:
        producer.produce(GENERATIONS.name, key=g.request.request_id, value=encode(g))
        producer.poll(0)
    producer.flush(30)
    budget = min(300, current().left())
    missing = reader.wait_for({g.request.request_id for g in gens}, budget, lambda _k, _v: None)
    rate = (n - len(missing)) / (time.perf_counter() - t0)
    reader.close()
    return rate, len(missing)


def added_latency(bootstrap: str, n: int, rate: float) -> tuple[float, float]:
    reader = TailReader(bootstrap, RESPONSES.name, {"fetch.wait.max.ms": 10})
    producer = make_producer(bootstrap, {"linger.ms": 0})
    sent: dict[str, float] = {}
    lat: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        if current().expired():
            break
        g = generation(i)
        while time.perf_counter() < t0 + i / rate:
            for key, _value in reader.records(0.001):
                if key in sent:
                    lat.append((time.perf_counter() - sent.pop(key)) * 1000)
        sent[g.request.request_id] = time.perf_counter()
        producer.produce(GENERATIONS.name, key=g.request.request_id, value=encode(g))
        producer.poll(0)
    producer.flush(10)
    deadline = time.perf_counter() + min(60, current().left())
    while sent and time.perf_counter() < deadline:
        for key, _value in reader.records(0.05):
            if key in sent:
                lat.append((time.perf_counter() - sent.pop(key)) * 1000)
    reader.close()
    return pct(lat, 0.5), pct(lat, 0.99)


def streams(bootstrap: str, n: int) -> tuple[float, float, float]:
    """Deltas/s through the stage, and sentence-end-to-window latency p50/p99."""
    reader = TailReader(bootstrap, MODERATED_TOKENS.name, {"fetch.wait.max.ms": 10})
    producer = make_producer(bootstrap, {"linger.ms": 0})
    closing: set[str] = set()
    total = 0
    t0 = time.perf_counter()
    for i in range(n):
        rid, text = f"s-{uuid.uuid4()}", ANSWERS[i % len(ANSWERS)]
        pieces = [text[j : j + 6] for j in range(0, len(text), 6)]
        for j, piece in enumerate([*pieces, ""]):
            d = TokenDelta(request_id=rid, index=j, text=piece, model="m", final=j == len(pieces))
            producer.produce(TOKENS.name, key=rid, value=encode(d))
            producer.poll(0)
            total += 1
        closing.add(rid)
    producer.flush(30)
    window_lat: list[float] = []
    deadline = time.perf_counter() + min(300, current().left())
    while closing and time.perf_counter() < deadline:
        for key, value in reader.records(0.05):
            d = decode(value, TokenDelta)
            if d.final and key in closing:
                closing.discard(key)
    rate = total / (time.perf_counter() - t0)
    reader.close()
    window_lat.extend(_paced_windows(bootstrap, 100))
    return rate, pct(window_lat, 0.5), pct(window_lat, 0.99)


def _paced_windows(bootstrap: str, n: int) -> list[float]:
    """One sentence per stream, paced: time from its last delta to its moderated window."""
    reader = TailReader(bootstrap, MODERATED_TOKENS.name, {"fetch.wait.max.ms": 10})
    producer = make_producer(bootstrap, {"linger.ms": 0})
    lat = []
    for i in range(n):
        if current().expired():
            break
        rid, text = f"w-{uuid.uuid4()}", ANSWERS[i % len(ANSWERS)] + " "
        for j, piece in enumerate(text[k : k + 6] for k in range(0, len(text), 6)):
            d = TokenDelta(request_id=rid, index=j, text=piece, model="m")
            producer.produce(TOKENS.name, key=rid, value=encode(d))
        producer.flush(5)
        t_last = time.perf_counter()
        for key, _value in reader.records(min(10, current().left())):
            if key == rid:
                lat.append((time.perf_counter() - t_last) * 1000)
                break
    reader.close()
    return lat


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--answers", type=int, default=1000, help="answers per run (default 1000)")
    p.add_argument("--rate", type=float, default=50, help="paced answers/s (default 50)")
    add_limit_arg(p, LIMIT_S)
    args = p.parse_args()
    return run_limited(lambda _deadline: _main(args), args.limit_s)


def _main(args: argparse.Namespace) -> int:
    c50, c99 = checks_alone(args.answers)
    print(f"checks alone (in process):  p50 {c50:.2f} ms, p99 {c99:.2f} ms per answer")
    with running(("moderation",)) as bootstrap:
        throughput(bootstrap, 50)  # warm-up
        rate, lost = throughput(bootstrap, args.answers)
        print(f"throughput through Kafka:   {rate:.0f} answers/s ({lost} lost)", flush=True)
        a50, a99 = added_latency(bootstrap, min(args.answers, int(args.rate * 10)), args.rate)
        print(
            f"added latency at {args.rate:.0f}/s (publish to response, two hops): "
            f"p50 {a50:.1f} ms, p99 {a99:.1f} ms",
            flush=True,
        )
        d_rate, w50, w99 = streams(bootstrap, args.answers // 4)
        print(
            f"streams: {d_rate:.0f} deltas/s; sentence end to moderated window "
            f"p50 {w50:.1f} ms, p99 {w99:.1f} ms"
        )
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
