"""Open-loop load through the gateway: requests start on schedule, whatever the answers do.

A realistic mix: short and long questions, a share of streamed requests (their
time to first token is measured), a share of repeated questions (cache hits),
several tenants. Reports a table (end-to-end p50/p95/p99, TTFT, pipeline
overhead = end to end minus engine time, throughput, errors by status) and,
with matplotlib installed, a PNG of latency over time.

Against a running pipeline (`kllm up` prints the gateway and a key):
    python loadtest/openloop.py --url http://127.0.0.1:8080/v1 --key kllm-... --rate 20 --seconds 30
Or self-contained (embedded broker, every stage; --engine scripted answers instantly,
so what is measured is the pipeline):
    python loadtest/openloop.py --rate 50 --seconds 20 --engine scripted --png load.png

Time limit: the whole run, startup and teardown included, ends within --limit-s
(default 360 s). Sending stops at --seconds, waiting for answers --drain-s later (or at
the limit); requests not answered by then are reported as unanswered and the figures
marked INCOMPLETE. Ctrl-C or SIGTERM stops every process it started, and prints what
was measured.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from harness import Deadline, add_limit_arg, pct, run_limited

from kllm.ops.broker import Storage

LIMIT_S = 360
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""

SHORT = ["What is a DLQ?", "How are offsets committed?", "What does retrieval do?"]
LONG = [
    "Explain, step by step, what happens to a request from the moment the gateway receives "
    "it until the caller reads the answer, including which topics it crosses and why.",
    "Compare how the inference stage keeps several requests in flight with a simple loop "
    "that handles one message at a time, and say what happens when a worker is killed.",
]


@dataclass
class Sample:
    started: float
    status: int
    e2e_ms: float
    ttft_ms: float | None = None
    engine_ms: float | None = None
    cached: bool = False


@dataclass
class Mix:
    stream_share: float = 0.3
    repeat_share: float = 0.2
    long_share: float = 0.3
    tenants: int = 3
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def request(self, i: int, model: str) -> tuple[dict[str, object], str]:
        r = self.rng
        if r.random() < self.repeat_share:
            prompt = SHORT[i % len(SHORT)]  # asked before: a cache hit once answered
        else:
            pool = LONG if r.random() < self.long_share else SHORT
            prompt = f"{pool[i % len(pool)]} (#{i})"
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 32,
            "stream": r.random() < self.stream_share,
        }
        return body, f"tenant-{i % self.tenants}"


async def one(
    http: httpx.AsyncClient,
    url: str,
    key: str,
    body: dict[str, object],
    t0: float,
    out: list[Sample],
) -> None:
    start = time.perf_counter()
    headers = {"authorization": f"Bearer {key}"}
    try:
        if body["stream"]:
            out.append(await _streamed(http, url, headers, body, start, t0))
            return
        r = await http.post(f"{url}/chat/completions", json=body, headers=headers)
    except httpx.HTTPError:
        out.append(Sample(start - t0, 0, (time.perf_counter() - start) * 1000))
        return
    e2e = (time.perf_counter() - start) * 1000
    ext = r.json().get("kllm", {}) if r.status_code == 200 else {}
    out.append(
        Sample(start - t0, r.status_code, e2e, None, ext.get("engine_ms"), bool(ext.get("cached")))
    )


async def _streamed(
    http: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    body: dict[str, object],
    start: float,
    t0: float,
) -> Sample:
    ttft = None
    ext: dict[str, object] = {}
    async with http.stream("POST", f"{url}/chat/completions", json=body, headers=headers) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            delta = chunk.get("choices", [{}])[0].get("delta", {}) if chunk.get("choices") else {}
            if ttft is None and delta.get("content"):
                ttft = (time.perf_counter() - start) * 1000
            ext = chunk.get("kllm", ext)
        status = r.status_code
    engine = ext.get("engine_ms")
    return Sample(
        start - t0,
        status,
        (time.perf_counter() - start) * 1000,
        ttft,
        float(engine) if isinstance(engine, int | float) else None,
        bool(ext.get("cached")),
    )


@dataclass
class Phase:
    """What one open-loop run offered, sent and left unanswered."""

    rate: float
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    offered: int = 0  # requests the schedule called for
    sent: int = 0  # requests started before the phase's deadline
    sending_s: float = 0.0
    unanswered: int = 0  # still waiting at the deadline: cancelled, not in ``samples``

    @property
    def complete(self) -> bool:
        return self.sent == self.offered and self.unanswered == 0

    def note(self) -> str:
        """Empty when the phase ran as asked; else why its figures are partial."""
        if self.complete:
            return ""
        return (
            f"INCOMPLETE: sent {self.sent}/{self.offered} requests before it stopped, "
            f"{self.unanswered} still unanswered when it passed (cancelled, not counted)"
        )


async def run(
    url: str,
    keys: dict[str, str],
    model: str,
    rate: float,
    seconds: float,
    deadline: Deadline | None = None,
    phase: Phase | None = None,
) -> Phase:
    """Send ``rate`` requests/s for ``seconds`` and wait for the answers, never past
    ``deadline`` (default: ``seconds`` plus 30 s to drain). At the deadline, requests not
    yet sent are not sent and those unanswered are cancelled and counted as such. Pass
    ``phase`` to keep what was measured if the run is interrupted."""
    deadline = deadline or Deadline(seconds + 30)
    phase = phase or Phase(rate, seconds)
    mix = Mix(tenants=len(keys))
    tenants = sorted(keys)
    phase.offered = int(rate * seconds)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    # A bound on each request as a whole (httpx's timeout is per connect, read or write).
    per_request_s = 90.0
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        t0 = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        for i in range(phase.offered):
            if deadline.expired():
                break
            delay = t0 + i / rate - time.perf_counter()
            # Always yield to the loop, even when behind schedule: a generator that only
            # creates tasks starves the requests it started (the client's own backlog).
            await asyncio.sleep(max(0.0, min(delay, deadline.left())))
            body, tenant = mix.request(i, model)
            key = keys[tenants[int(tenant.rsplit("-", 1)[1]) % len(tenants)]]
            request = one(http, url, key, body, t0, phase.samples)
            tasks.append(asyncio.create_task(asyncio.wait_for(request, per_request_s)))
            phase.sent += 1
        phase.sending_s = time.perf_counter() - t0
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=max(deadline.left(), 0.01))
            for task in pending:
                task.cancel()
            phase.unanswered = len(pending)
            await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and isinstance(task.exception(), TimeoutError):
                phase.samples.append(Sample(0.0, 0, per_request_s * 1000))  # gave up on it
    return phase


def report(samples: list[Sample], rate: float, seconds: float) -> str:
    ok = [s for s in samples if s.status == 200]
    statuses: dict[int, int] = {}
    for s in samples:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    e2e = [s.e2e_ms for s in ok]
    ttft = [s.ttft_ms for s in ok if s.ttft_ms is not None]
    overhead = [s.e2e_ms - s.engine_ms for s in ok if s.engine_ms and not s.cached]
    span = max((s.started for s in samples), default=0) or seconds
    rows = [
        ("offered", f"{rate:.0f} req/s for {seconds:.0f} s ({len(samples)} requests)"),
        ("answered", f"{len(ok)} ({len(ok) / max(span, 1e-9):.1f}/s), statuses {statuses}"),
        ("from cache", str(sum(s.cached for s in ok))),
        ("end to end p50/p95/p99 ms", " / ".join(f"{pct(e2e, q):.1f}" for q in (0.5, 0.95, 0.99))),
        (
            "TTFT p50/p95/p99 ms (streamed)",
            " / ".join(f"{pct(ttft, q):.1f}" for q in (0.5, 0.95, 0.99)),
        ),
        (
            "pipeline overhead p50/p99 ms",
            f"{pct(overhead, 0.5):.1f} / {pct(overhead, 0.99):.1f}"
            " (end to end minus engine time, answers not from cache)",
        ),
        ("mean end to end ms", f"{statistics.fmean(e2e):.1f}" if e2e else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot(samples: list[Sample], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for status in sorted({s.status for s in samples}):
        pts = [s for s in samples if s.status == status]
        a.scatter([s.started for s in pts], [s.e2e_ms for s in pts], s=6, label=f"HTTP {status}")
    a.set(
        xlabel="request start (s)",
        ylabel="end to end (ms)",
        yscale="log",
        title="latency over time",
    )
    a.legend()
    ok = [s.e2e_ms for s in samples if s.status == 200]
    b.hist(ok, bins=50)
    b.set(xlabel="end to end (ms)", ylabel="requests", title="answered requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="gateway base URL (…/v1); default: start a pipeline here")
    p.add_argument("--key", help="API key (with --url)")
    p.add_argument("--rate", type=float, default=10, help="requests/s (default 10)")
    p.add_argument("--seconds", type=float, default=20, help="duration (default 20)")
    p.add_argument(
        "--engine",
        choices=["smollm2", "scripted"],
        default="smollm2",
        help="self-contained run: the real CPU model, or instant scripted answers",
    )
    p.add_argument("--png", type=Path, default=Path("openloop.png"), help="plot file")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="self-contained run: response cache off, so every request runs the whole pipeline",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="self-contained run: trace every request and report each stage's wait and work",
    )
    p.add_argument(
        "--drain-s", type=float, default=30, help="at most this long for the last answers"
    )
    add_limit_arg(p, LIMIT_S)
    args = p.parse_args()
    if args.url and not args.key:
        p.error("--url needs --key")
    return run_limited(lambda deadline: _main(args, deadline), args.limit_s)


def _main(args: argparse.Namespace, deadline: Deadline) -> int:
    phase = Phase(args.rate, args.seconds)
    try:
        with ExitStack() as stack:
            if args.url:
                url, keys, model = args.url.rstrip("/"), {"tenant-0": args.key}, "smollm2-135m"
            else:
                url, keys, model, run_dir = stack.enter_context(
                    _pipeline(args.engine, args.breakdown, cache=not args.no_cache)
                )
            until = deadline.within(args.seconds + args.drain_s)
            asyncio.run(run(url, keys, model, args.rate, args.seconds, until, phase))
            if args.breakdown and not args.url:
                time.sleep(1.5)  # the stages export their spans every half second
                print_breakdown(run_dir)
    finally:
        if phase.sent:
            print(report(phase.samples, args.rate, args.seconds))
            print(phase.note() or "complete: every request sent and answered")
    if plot(phase.samples, args.png):
        print(f"plot: {args.png}")
    return 0 if phase.complete else 1


def print_breakdown(run_dir: Path) -> None:
    from trace_breakdown import report

    n, table = report(run_dir)
    print(f"where the time goes ({n} traced requests):")
    print(table)


@contextmanager
def _pipeline(
    engine: str, traced: bool, cache: bool = True, storage: Storage = "memory"
) -> Iterator[tuple[str, dict[str, str], str, Path]]:
    from harness import free_port, supervised

    from kllm.gateway.keys import KeyStore
    from kllm.testing.scripted_engine import scripted_engine

    with ExitStack() as stack:
        port = free_port()
        keys_file = Path(tempfile.mkdtemp()) / "keys.json"
        store = KeyStore(keys_file)
        keys = {f"tenant-{i}": store.create(f"tenant-{i}")[1] for i in range(3)}
        env = {
            "KLLM_GATEWAY_PORT": str(port),
            "KLLM_GATEWAY_KEYS_FILE": str(keys_file),
            "KLLM_CACHE": "true" if cache else "false",
            "KLLM_GATEWAY_MAX_WAITING": "256",
            "KLLM_TRACE_EXPORT": "file" if traced else "none",
        }
        model = "smollm2-135m"
        if engine == "scripted":
            script = stack.enter_context(scripted_engine())
            model = "scripted"
            env |= {
                "KLLM_MODELS": orjson.dumps(
                    [{"name": "scripted", "engine": "openai", "url": script, "slots": 16}]
                ).decode(),
                "KLLM_GATEWAY_MODELS": '["scripted"]',
            }
        _bootstrap, sup = stack.enter_context(supervised(env=env, storage=storage))
        yield f"http://127.0.0.1:{port}/v1", keys, model, sup.run_dir


if __name__ == "__main__":
    sys.exit(main())
