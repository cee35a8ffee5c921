"""Gateway overhead at a target request rate, answered from the response cache.

The whole pipeline runs (embedded broker, every stage a process, guardrail
models); a few questions are asked once so their answers are cached, then an
open-loop generator sends those questions at each rate. For every answer the
gateway reports, in headers, the pipeline time (publish to reply) and its own
time around it (parsing, auth, routing, serialising). Overhead is the second.

    python loadtest/gateway_overhead.py --rates 50 200 --seconds 10

Time limit: the whole run, startup and teardown included, ends within --limit-s
(default 420 s). Each rate waits at most 30 s past its sending for answers; a rate
cut short is marked INCOMPLETE, one with no time left NOT RUN. Ctrl-C or SIGTERM stops
every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from harness import Deadline, add_limit_arg, current, free_port, pct, run_limited, running

from kllm.gateway.keys import KeyStore

QUESTIONS = [
    "What does the moderation stage check?",
    "How are offsets committed?",
    "What is a consumer group?",
    "How does retrieval pick chunks?",
    "What happens to malformed requests?",
    "How do inference pools work?",
    "What does the indexer do?",
    "How are tenants kept apart?",
]

LIMIT_S = 420
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""


@dataclass
class Run:
    rate: float
    overhead_ms: list[float] = field(default_factory=list)
    pipeline_ms: list[float] = field(default_factory=list)
    client_ms: list[float] = field(default_factory=list)
    ok_client_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    cached: int = 0
    sending_s: float = 1e-9
    unanswered: int = 0  # still waiting at the deadline (cancelled)


def body(question: str) -> dict[str, object]:
    return {"model": "smollm2-135m", "messages": [{"role": "user", "content": question}]}


async def warm(http: httpx.AsyncClient, url: str, in_a_row: int = 25) -> None:
    """Ask each question until ``in_a_row`` answers in a row come from the cache. Cached
    answers are per template variant, and the variant follows the request id: 25 in a
    row leave a 0.8**25 (0.4%) chance that the 20% variant is still uncached."""
    for q in QUESTIONS:
        streak = 0
        for _ in range(200):
            if current().expired():
                raise TimeoutError("the time limit passed while warming the cache")
            r = await http.post(url, json=body(q))
            r.raise_for_status()
            streak = streak + 1 if r.json()["kllm"]["cached"] else 0
            if streak >= in_a_row:
                break
        else:
            raise RuntimeError(f"{q!r} did not settle in the cache")


async def one(http: httpx.AsyncClient, url: str, question: str, run: Run) -> None:
    t0 = time.perf_counter()
    r = await http.post(url, json=body(question))
    run.client_ms.append((time.perf_counter() - t0) * 1000)
    run.statuses[r.status_code] = run.statuses.get(r.status_code, 0) + 1
    if r.status_code == 200:
        run.ok_client_ms.append(run.client_ms[-1])
        run.overhead_ms.append(float(r.headers["x-kllm-gateway-ms"]))
        run.pipeline_ms.append(float(r.headers["x-kllm-pipeline-ms"]))
        run.cached += bool(r.json()["kllm"]["cached"])


async def load(http: httpx.AsyncClient, url: str, rate: float, seconds: float) -> Run:
    """Open loop: request i starts at i / rate, whether or not earlier ones finished."""
    run = Run(rate)
    n = int(rate * seconds)
    t0 = time.perf_counter()
    tasks = []
    until = current().within(seconds + 30)
    for i in range(n):
        if until.expired():
            break
        delay = t0 + i / rate - time.perf_counter()
        await asyncio.sleep(max(0.0, min(delay, until.left())))
        tasks.append(asyncio.create_task(one(http, url, QUESTIONS[i % len(QUESTIONS)], run)))
    run.sending_s = time.perf_counter() - t0
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=max(until.left(), 0.01))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        run.unanswered = len(pending) + n - len(tasks)
    return run


def report(run: Run) -> str:
    ok = len(run.overhead_ms)
    total = sum(run.statuses.values())
    client_extra = [c - p for c, p in zip(run.ok_client_ms, run.pipeline_ms, strict=True)]
    return (
        f"{run.rate:>5.0f} req/s offered, sent at {total / run.sending_s:6.1f}/s: "
        f"{ok}/{total} answered ({run.cached} from cache), statuses {run.statuses}\n"
        + (
            f"    INCOMPLETE: {run.unanswered} requests not sent or unanswered at the deadline\n"
            if run.unanswered
            else ""
        )
        + f"    gateway overhead  p50 {pct(run.overhead_ms, 0.5):6.2f} ms  "
        f"p99 {pct(run.overhead_ms, 0.99):6.2f} ms  (target p50 < 5, p99 < 20)\n"
        f"    pipeline          p50 {pct(run.pipeline_ms, 0.5):6.2f} ms  "
        f"p99 {pct(run.pipeline_ms, 0.99):6.2f} ms\n"
        f"    client end to end p50 {pct(run.client_ms, 0.5):6.2f} ms  "
        f"p99 {pct(run.client_ms, 0.99):6.2f} ms  "
        f"mean {statistics.fmean(run.client_ms or [0]):.2f}\n"
        f"    client minus pipeline p50 {pct(client_extra, 0.5):6.2f} ms  "
        f"p99 {pct(client_extra, 0.99):6.2f} ms  (adds HTTP, the event loop's queue and the "
        "load generator, all on the same cores)"
    )


async def bench(
    port: int, key: str, rates: list[float], seconds: float, runs: list[Run]
) -> list[Run]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as http:
        await warm(http, url)
        await load(http, url, max(rates), 2)  # connections opened, code paths warm
        for rate in rates:
            if current().left() < seconds:
                print(f"{rate:.0f} req/s NOT RUN (time limit)", flush=True)
                continue
            runs.append(await load(http, url, rate, seconds))
        return runs


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rates", type=float, nargs="+", default=[50, 200], help="requests/s")
    p.add_argument("--seconds", type=float, default=10, help="seconds per rate (default 10)")
    add_limit_arg(p, LIMIT_S)
    args = p.parse_args()
    return run_limited(lambda deadline: _main(args, deadline), args.limit_s)


def _main(args: argparse.Namespace, deadline: Deadline) -> int:
    port = free_port()
    keys = Path(tempfile.mkdtemp()) / "keys.json"
    key = KeyStore(keys).create("bench")[1]
    env = {
        "KLLM_GATEWAY_KEYS_FILE": str(keys),
        "KLLM_GATEWAY_PORT": str(port),
        "KLLM_CACHE": "true",
        "KLLM_GATEWAY_MAX_WAITING": "2000",
        "KLLM_LOG_LEVEL": "WARNING",
    }
    runs: list[Run] = []
    try:
        with running(env=env):
            asyncio.run(bench(port, key, args.rates, args.seconds, runs))
    finally:
        for run in runs:
            print(report(run), flush=True)
    complete = len(runs) == len(args.rates) and not any(r.unanswered for r in runs)
    return 0 if complete and all(run.statuses.keys() == {200} for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
