"""Overload test: offer three times what the pipeline can answer, then drop back.

The engine sets the capacity: a scripted OpenAI-compatible server that takes
``--delay`` seconds per answer with ``--slots`` answers at a time, so the pipeline
can answer ``slots / delay`` requests/s. Every stage runs as its own process on the
embedded broker. Open-loop load through the gateway, in three phases:

    baseline   half the capacity
    overload   three times the capacity
    recovery   half the capacity again

It passes when, during the overload, the gateway sheds with 429 (and Retry-After)
and answers every request it admitted (no 5xx, no timeout); the memory of all the
processes (broker and stages, summed RSS) stops growing (its peak in the second half
of the overload is within ``--rss-slack-mb`` of the first half's); no process exits
or restarts; and in the recovery phase latency returns to the baseline's: from some
point on, every request gets a 200 within twice the baseline p99, and that point
comes within the time to answer the callers admitted during the overload
(max waiting / capacity) plus ``--recovery-slack-s``.

    python loadtest/overload.py                   # 4 slots x 0.25 s: 16 answers/s
    python loadtest/overload.py --slots 8 --delay 0.2 --overload-s 60

Time limit: the whole run, startup and teardown included, ends within --limit-s
(default 420 s). Nothing is sent or awaited past the end of the phases plus --drain-s
(or the limit); a phase cut short is reported, and the verdict says INCOMPLETE. Ctrl-C
or SIGTERM stops every process it started and prints what was measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from harness import Deadline, add_limit_arg, free_port, pct, run_limited, supervised

from kllm.gateway.keys import KeyStore
from kllm.ops.supervisor import Supervisor
from kllm.testing.scripted_engine import scripted_engine

LIMIT_S = 420
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""


@dataclass
class Sample:
    phase: str
    started: float  # seconds since the phase began
    status: int
    ms: float
    retry_after: bool = False
    pipeline_ms: float | None = None  # the gateway's own figure: publish to reply
    error: str = ""  # the client's exception when no HTTP answer came (status 0)


@dataclass
class Phase:
    name: str
    rate: float
    seconds: float


# -- memory of the process tree ----------------------------------------------------------


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (the broker, the stages and their children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces; the fields after it do not.
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class MemoryWatch:
    """Summed RSS of this process's descendants, sampled twice a second."""

    samples: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, MB)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), sum(map(rss_mb, descendants(me)))))
            self.stop.wait(0.5)

    def peak(self, start: float, end: float) -> float:
        return max((mb for at, mb in self.samples if start <= at < end), default=0.0)


# -- load ----------------------------------------------------------------------------------


async def _one(http: httpx.AsyncClient, url: str, phase: str, i: int, t0: float) -> Sample:
    body = {
        "model": "scripted",
        "messages": [{"role": "user", "content": f"Overload {phase} {i}: how do offsets work?"}],
        "max_tokens": 32,
    }
    # As a careful client: an Idempotency-Key, and one retry when a pooled connection
    # was closed under the request (no answer came, and the key makes it safe).
    headers = {"idempotency-key": f"overload-{phase}-{i}-{t0}"}
    start = time.perf_counter()
    try:
        try:
            r = await http.post(url, json=body, headers=headers)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            r = await http.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        ms = (time.perf_counter() - start) * 1000
        return Sample(phase, start - t0, 0, ms, error=f"{type(exc).__name__}: {exc}"[:200])
    ms = (time.perf_counter() - start) * 1000
    pipeline = r.headers.get("x-kllm-pipeline-ms")
    return Sample(
        phase,
        start - t0,
        r.status_code,
        ms,
        "retry-after" in r.headers,
        float(pipeline) if pipeline else None,
    )


async def offer(
    url: str, key: str, phases: list[Phase], deadline: Deadline, out: list[Sample]
) -> tuple[list[Sample], dict[str, float], int]:
    """Open loop: requests start on schedule whatever the answers do. Also returns when
    each phase began (monotonic) and how many requests were still unanswered at the
    deadline (cancelled; not in the samples). Nothing is sent or awaited past
    ``deadline``; ``out`` keeps the samples if the run is interrupted."""
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=500)
    headers = {"authorization": f"Bearer {key}"}
    began: dict[str, float] = {}
    tasks: list[asyncio.Task[None]] = []

    async def keep(coro: Coroutine[None, None, Sample]) -> None:
        out.append(await coro)

    async with httpx.AsyncClient(limits=limits, timeout=120, headers=headers) as http:
        for phase in phases:
            if deadline.expired():
                break
            began[phase.name] = time.monotonic()
            t0 = time.perf_counter()
            print(f"{phase.name}: {phase.rate:.0f}/s for {phase.seconds:.0f} s", flush=True)
            for i in range(int(phase.rate * phase.seconds)):
                if deadline.expired():
                    print(f"{phase.name}: stopped at the deadline after {i} requests")
                    break
                delay = t0 + i / phase.rate - time.perf_counter()
                await asyncio.sleep(max(0.0, min(delay, deadline.left())))
                tasks.append(asyncio.create_task(keep(_one(http, url, phase.name, i, t0))))
        began["end"] = time.monotonic()
        _done, pending = await asyncio.wait(tasks, timeout=max(deadline.left(), 0.01))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return out, began, len(pending)


# -- verdict -------------------------------------------------------------------------------


def recovered_after_s(samples: list[Sample], limit_ms: float) -> float | None:
    """When, in the recovery phase, every later request got a 200 within ``limit_ms``."""
    last_bad = max((s.started for s in samples if s.status != 200 or s.ms > limit_ms), default=None)
    if last_bad is None:
        return 0.0
    later = [s.started for s in samples if s.started > last_bad]
    return min(later) if later else None


def verdict(
    samples: list[Sample],
    phases: list[Phase],
    memory: tuple[float, float],
    processes: list[str],
    rss_slack_mb: float,
    recover_within_s: float,
) -> tuple[list[str], list[str]]:
    """The report's lines, and the reasons it fails (none: it passes)."""
    by_phase = {p.name: [s for s in samples if s.phase == p.name] for p in phases}
    lines, failures = [], []
    for p in phases:
        got = by_phase[p.name]
        ok = [s.ms for s in got if s.status == 200]
        inside = [s.pipeline_ms for s in got if s.pipeline_ms is not None]
        refused = [s.ms for s in got if s.status == 429]
        statuses: dict[int, int] = {}
        for s in got:
            statuses[s.status] = statuses.get(s.status, 0) + 1
        lines.append(
            f"{p.name:9} offered {p.rate:5.1f}/s, answered {len(ok) / p.seconds:5.1f}/s, "
            f"statuses {dict(sorted(statuses.items()))}\n"
            f"{'':9} 200s p50/p99 {pct(ok, 0.5):.0f}/{pct(ok, 0.99):.0f} ms at the client, "
            f"{pct(inside, 0.5):.0f}/{pct(inside, 0.99):.0f} ms publish to reply; "
            f"429s p50/p99 {pct(refused, 0.5):.0f}/{pct(refused, 0.99):.0f} ms"
        )
    over = by_phase.get("overload", [])
    shed = [s for s in over if s.status == 429]
    other = [s for s in over if s.status not in (200, 429)]
    if not shed:
        failures.append("the gateway shed nothing at 3x capacity")
    if any(not s.retry_after for s in shed):
        failures.append("a 429 came without Retry-After")
    if other:
        kinds = sorted({s.error or f"HTTP {s.status}" for s in other})
        failures.append(f"{len(other)} overload requests failed otherwise: {kinds[:5]}")
    first_half, second_half = memory
    lines.append(
        f"memory (all processes): overload first half peak {first_half:.0f} MB, "
        f"second half peak {second_half:.0f} MB"
    )
    if second_half > first_half + rss_slack_mb:
        failures.append(f"memory grew under overload: {first_half:.0f} -> {second_half:.0f} MB")
    base_ok = [s.ms for s in by_phase.get("baseline", []) if s.status == 200]
    limit = 2 * pct(base_ok, 0.99)
    after = (
        recovered_after_s(by_phase.get("recovery", []), limit) if "recovery" in by_phase else None
    )
    lines.append(
        "recovery: every request answered within 2x the baseline p99 "
        f"({limit:.0f} ms) from {after:.1f} s into the phase"
        if after is not None
        else f"recovery: latency never came back within {limit:.0f} ms"
    )
    if after is None or after > recover_within_s:
        failures.append(f"the pipeline did not recover within {recover_within_s:.0f} s")
    if processes:
        failures.append(f"processes exited or restarted: {processes}")
    return lines, failures


def troubled(sup: Supervisor, pids: dict[str, int | None]) -> list[str]:
    """Stage processes that are not the ones that started, or not alive."""
    out = []
    for sp in sup.procs:
        pid = sp.proc.pid if sp.proc else None
        if not sp.alive() or sp.restarts or pids.get(sp.name) != pid:
            out.append(f"{sp.name} ({sp.state()}, restarts {sp.restarts})")
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--slots", type=int, default=4, help="engine answers at a time (default 4)")
    p.add_argument("--delay", type=float, default=0.25, help="seconds per answer (default 0.25)")
    p.add_argument("--baseline-s", type=float, default=10, help="baseline phase length")
    p.add_argument("--overload-s", type=float, default=30, help="overload phase length")
    p.add_argument("--recovery-s", type=float, default=20, help="recovery phase length")
    p.add_argument("--max-waiting", type=int, default=64, help="gateway KLLM_GATEWAY_MAX_WAITING")
    p.add_argument("--rss-slack-mb", type=float, default=150, help="allowed growth, MB")
    p.add_argument(
        "--recovery-slack-s",
        type=float,
        default=5,
        help="seconds allowed to recover beyond draining the admitted callers (default 5)",
    )
    p.add_argument(
        "--drain-s",
        type=float,
        default=30,
        help="after the last phase, wait at most this long for answers (default 30)",
    )
    add_limit_arg(p, LIMIT_S)
    args = p.parse_args()
    return run_limited(lambda deadline: _main(args, deadline), args.limit_s)


def _main(args: argparse.Namespace, deadline: Deadline) -> int:
    capacity = args.slots / args.delay
    phases = [
        Phase("baseline", capacity / 2, args.baseline_s),
        Phase("overload", capacity * 3, args.overload_s),
        Phase("recovery", capacity / 2, args.recovery_s),
    ]
    print(f"capacity: {args.slots} slots / {args.delay} s = {capacity:.0f} answers/s")
    port = free_port()
    keys = Path(tempfile.mkdtemp()) / "keys.json"
    key = KeyStore(keys).create("overload")[1]
    samples: list[Sample] = []
    began: dict[str, float] = {}
    unanswered, finished = 0, False
    memory: tuple[float, float] = (0.0, 0.0)
    gone: list[str] = []
    try:
        with scripted_engine(args.delay) as script:
            env = {
                "KLLM_GATEWAY_PORT": str(port),
                "KLLM_GATEWAY_KEYS_FILE": str(keys),
                "KLLM_GATEWAY_MAX_WAITING": str(args.max_waiting),
                "KLLM_MODELS": orjson.dumps(
                    [{"name": "scripted", "engine": "openai", "url": script, "slots": args.slots}]
                ).decode(),
                "KLLM_GATEWAY_MODELS": '["scripted"]',
            }
            with supervised(env=env) as (_bootstrap, sup):
                pids = {sp.name: sp.proc.pid if sp.proc else None for sp in sup.procs}
                watch = MemoryWatch()
                threading.Thread(target=watch.run, daemon=True).start()
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                until = deadline.within(sum(p.seconds for p in phases) + args.drain_s)
                try:
                    _, began, unanswered = asyncio.run(offer(url, key, phases, until, samples))
                finally:
                    watch.stop.set()
                if "recovery" in began:
                    middle = began["overload"] + args.overload_s / 2
                    memory = (
                        watch.peak(began["overload"], middle),
                        watch.peak(middle, began["recovery"]),
                    )
                gone = troubled(sup, pids)
        finished = True
    finally:
        if not finished and samples:
            print("INTERRUPTED: what was measured before the stop")
            ran = [p for p in phases if any(s.phase == p.name for s in samples)]
            print("\n".join(verdict(samples, ran, memory, [], 0, 0)[0]))
    # The callers admitted at the end of the overload are answered first: that takes
    # max_waiting / capacity seconds before new requests see baseline latency again.
    recover_within = args.max_waiting / capacity + args.recovery_slack_s
    ran = [p for p in phases if p.name in began]
    lines, failures = verdict(samples, ran, memory, gone, args.rss_slack_mb, recover_within)
    if len(ran) < len(phases) or unanswered:
        missing = [p.name for p in phases if p.name not in began]
        failures.insert(
            0,
            f"INCOMPLETE at the time limit: phases not run {missing}, "
            f"{unanswered} requests unanswered at the deadline",
        )
    print("\n".join(lines))
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
