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
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from harness import free_port, pct, supervised
from scripted_engine import scripted_engine

from kllm.gateway.keys import KeyStore
from kllm.ops.supervisor import Supervisor


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


async def offer(url: str, key: str, phases: list[Phase]) -> tuple[list[Sample], dict[str, float]]:
    """Open loop: requests start on schedule whatever the answers do. Also returns when
    each phase began (monotonic)."""
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=500)
    headers = {"authorization": f"Bearer {key}"}
    began: dict[str, float] = {}
    tasks: list[asyncio.Task[Sample]] = []
    async with httpx.AsyncClient(limits=limits, timeout=120, headers=headers) as http:
        for phase in phases:
            began[phase.name] = time.monotonic()
            t0 = time.perf_counter()
            print(f"{phase.name}: {phase.rate:.0f}/s for {phase.seconds:.0f} s", flush=True)
            for i in range(int(phase.rate * phase.seconds)):
                delay = t0 + i / phase.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_one(http, url, phase.name, i, t0)))
        began["end"] = time.monotonic()
        return list(await asyncio.gather(*tasks)), began


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
    over = by_phase["overload"]
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
    base_ok = [s.ms for s in by_phase["baseline"] if s.status == 200]
    limit = 2 * pct(base_ok, 0.99)
    after = recovered_after_s(by_phase["recovery"], limit)
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
    args = p.parse_args()
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
            samples, began = asyncio.run(offer(url, key, phases))
            watch.stop.set()
            middle = began["overload"] + args.overload_s / 2
            memory = (
                watch.peak(began["overload"], middle),
                watch.peak(middle, began["recovery"]),
            )
            gone = troubled(sup, pids)
    # The callers admitted at the end of the overload are answered first: that takes
    # max_waiting / capacity seconds before new requests see baseline latency again.
    recover_within = args.max_waiting / capacity + args.recovery_slack_s
    lines, failures = verdict(samples, phases, memory, gone, args.rss_slack_mb, recover_within)
    print("\n".join(lines))
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
