"""What every benchmark starts from: an embedded broker, the topics, and stage processes,
and the limits every benchmark runs under: a deadline, a watchdog and a guaranteed teardown.

A benchmark's ``main`` runs inside ``limits(seconds)``: SIGTERM and SIGHUP raise
KeyboardInterrupt as Ctrl-C does, so ``finally`` blocks and context managers run; a
second signal does not interrupt the teardown the first one started. Every process a
benchmark starts (the broker, the stages) inherits a marker in its environment; when the
benchmark ends, however it ends, whatever still carries the marker is killed: at the end
of ``supervised``, at exit, by the watchdog at the hard limit, and by a small reaper
process that outlives a benchmark killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from kllm.ops.broker import EmbeddedBroker, Storage, free_port
from kllm.ops.supervisor import STAGES, Supervisor
from kllm.runtime.kafka import ConfluentTopicAdmin
from topics import declared, provision

REPO = Path(__file__).resolve().parents[1]
MARKER = "KLLM_BENCH_RUN"
"""Environment variable every process a benchmark starts inherits (value: the run's id)."""

__all__ = [
    "MARKER",
    "REPO",
    "Deadline",
    "add_limit_arg",
    "free_port",
    "kill_marked",
    "limits",
    "marked",
    "pct",
    "running",
    "supervised",
]


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0 to 1) of ``values``, nearest rank; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- deadlines --------------------------------------------------------------------------------


class Deadline:
    """A point in time (monotonic) a benchmark or one of its phases must end by."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.at = clock() + seconds

    def left(self) -> float:
        """Seconds left, never below zero."""
        return max(0.0, self.at - self._clock())

    def expired(self) -> bool:
        return self._clock() >= self.at

    def within(self, seconds: float) -> Deadline:
        """A deadline ``seconds`` from now, or this one if it comes first (a phase's)."""
        d = Deadline(0.0, self._clock)
        d.at = min(self.at, self._clock() + seconds)
        return d


_NONE = Deadline(float("inf"))
_current: Deadline = _NONE
"""The deadline of the benchmark running in this process (``limits``), for ``supervised``."""


def current() -> Deadline:
    return _current


# -- processes --------------------------------------------------------------------------------


def marked(run_id: str) -> list[int]:
    """Pids of the processes whose environment carries ``MARKER=run_id`` (not this one)."""
    wanted = f"{MARKER}={run_id}".encode()
    me = os.getpid()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                out.append(int(entry.name))
        except OSError:
            continue
    return out


def kill_marked(run_id: str, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to every process carrying the run's marker; the pids signalled."""
    hit = []
    for pid in marked(run_id):
        try:
            os.kill(pid, sig)
            hit.append(pid)
        except OSError:
            continue
    return hit


_REAPER = """
import os, signal, sys
from pathlib import Path
wanted, me = sys.argv[1].encode(), os.getpid()
sys.stdin.buffer.read()  # returns when the benchmark has exited, however it exited
for entry in Path("/proc").iterdir():
    if entry.name.isdigit() and int(entry.name) != me:
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            pass
"""


def _start_reaper(run_id: str) -> subprocess.Popen[bytes]:
    """A process that waits for this one to exit (its stdin closes), then kills every
    marked process left: the broker has no parent-death signal of its own."""
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, f"{MARKER}={run_id}"],
        stdin=subprocess.PIPE,
        start_new_session=True,  # Ctrl-C at the terminal does not reach it
        env={k: v for k, v in os.environ.items() if k != MARKER},
    )


# -- the whole run ----------------------------------------------------------------------------

_stopping = threading.Event()
"""Set by the first signal: later ones do not interrupt the teardown it started."""


def _on_signal(sig: int, _frame: FrameType | None) -> None:
    if _stopping.is_set():
        print(f"\n{signal.Signals(sig).name}: already stopping", file=sys.stderr, flush=True)
        return
    _stopping.set()
    print(f"\n{signal.Signals(sig).name}: stopping", file=sys.stderr, flush=True)
    raise KeyboardInterrupt


@contextmanager
def limits(seconds: float) -> Iterator[Deadline]:
    """Run a benchmark's ``main`` within ``seconds`` in all; yield the deadline its work
    must end by (a quarter of the limit, at most 60 s, is kept for stopping everything).

    The benchmark checks the deadline: a phase stops there and reports what it measured.
    If the work overruns, the watchdog interrupts the main thread as Ctrl-C would, leaving
    ``grace`` (at most 45 s) to tear down; at ``seconds`` (or ``grace`` after any interrupt)
    it kills every process the run started and exits with status 124. Whatever ends the
    run, no marked process outlives it."""
    global _current
    reserve = min(60.0, seconds / 4)
    grace = min(45.0, reserve * 0.75)
    run_id = uuid.uuid4().hex
    os.environ[MARKER] = run_id  # inherited by the broker, the stages and their children
    reaper = _start_reaper(run_id)
    atexit.register(kill_marked, run_id)
    previous = {
        s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    started = time.monotonic()
    deadline = Deadline(seconds - reserve)
    _current = deadline
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(0.2):
            if time.monotonic() - started >= seconds - grace and not _stopping.is_set():
                print(f"\ntime limit ({seconds:.0f} s) near", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
            if _stopping.is_set():  # interrupted, or tearing down: ``grace`` from now
                if done.wait(grace):
                    return
                print(
                    f"\nstill running {grace:.0f} s after the stop began: killing what is left",
                    file=sys.stderr,
                    flush=True,
                )
                kill_marked(run_id)
                os._exit(124)

    threading.Thread(target=watchdog, name="bench-watchdog", daemon=True).start()
    try:
        yield deadline
    finally:
        _stopping.set()  # from here on a signal does not interrupt the teardown
        try:
            kill_marked(run_id)  # the context managers stopped them; this is the net
        finally:
            done.set()
            _current = _NONE
            os.environ.pop(MARKER, None)
            for s, handler in previous.items():
                signal.signal(s, handler)
            _stopping.clear()
            if reaper.stdin is not None:
                reaper.stdin.close()
            reaper.wait(10)


def add_limit_arg(parser: argparse.ArgumentParser, default_s: float) -> None:
    """The ``--limit-s`` every benchmark takes: its whole run ends within it."""
    parser.add_argument(
        "--limit-s",
        type=float,
        default=default_s,
        help="the whole run, startup and teardown included, ends within this "
        f"(default {default_s})",
    )


def run_limited(main: Callable[[Deadline], int], seconds: float) -> int:
    """``limits(seconds)`` around ``main``; status 130 (and a note) when interrupted."""
    try:
        with limits(seconds) as deadline:
            return main(deadline)
    except KeyboardInterrupt:
        print("interrupted: the results above are all that was measured", file=sys.stderr)
        return 130


# -- the pipeline -----------------------------------------------------------------------------


@contextmanager
def running(stages: Sequence[str] = STAGES, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Yield the bootstrap address once ``stages`` consume; stop everything after."""
    with supervised(stages, env) as (bootstrap, _sup):
        yield bootstrap


@contextmanager
def supervised(
    stages: Sequence[str] = STAGES,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 240,
    replicas: Mapping[str, int] | None = None,
    storage: Storage = "memory",
) -> Iterator[tuple[str, Supervisor]]:
    """As ``running``, with the supervisor too (to kill and restart stages). Waits for
    the stages at most ``ready_timeout_s`` and never past the run's deadline; after, every
    stage is stopped (SIGTERM, then SIGKILL after 15 s), then the broker. ``storage``
    is the broker's (durable: its data under the run folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        with EmbeddedBroker(storage=storage, data_dir=run_dir / "broker") as broker:
            yield from _supervised(broker, run_dir, stages, env, ready_timeout_s, replicas)


def _supervised(
    broker: EmbeddedBroker,
    run_dir: Path,
    stages: Sequence[str],
    env: Mapping[str, str] | None,
    ready_timeout_s: float,
    replicas: Mapping[str, int] | None,
) -> Iterator[tuple[str, Supervisor]]:
    provision(ConfluentTopicAdmin(broker.bootstrap), declared())
    base = {
        "KLLM_BOOTSTRAP_SERVERS": broker.bootstrap,
        "KLLM_RUN_DIR": str(run_dir),
        "KLLM_QDRANT_PATH": str(run_dir / "qdrant"),
        "KLLM_SEED_DIR": str(REPO / "docs"),
        "KLLM_LOG_LEVEL": os.environ.get("KLLM_LOG_LEVEL", "WARNING"),
        "KLLM_GATEWAY_PORT": str(free_port()),
        # Benchmarks measure the pipeline, not the response cache, unless they say so.
        "KLLM_CACHE": "false",
    }
    sup = Supervisor(run_dir, base | dict(env or {}), replicas=replicas, stages=stages)
    try:
        sup.start_all()
        t0 = time.monotonic()
        sup.wait_ready(max(1.0, min(ready_timeout_s, _current.left())), bootstrap=broker.bootstrap)
        print(f"{', '.join(stages)} ready in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        yield broker.bootstrap, sup
    finally:
        stop_stages(sup)
        if keep := os.environ.get("KLLM_BENCH_KEEP_LOGS"):
            # The run folder goes with the run: keep the stages' logs where asked.
            shutil.copytree(run_dir / "logs", keep, dirs_exist_ok=True)


def stop_stages(sup: Supervisor) -> None:
    """Stop every stage; kill those still alive however ``stop_all`` ended."""
    try:
        sup.stop_all()
    finally:
        for sp in sup.procs:
            if sp.proc is not None and sp.proc.poll() is None:
                sp.proc.kill()
                sp.proc.wait(5)
