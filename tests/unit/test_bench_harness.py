"""The benchmarks' shared limits (loadtest/harness.py): deadlines, signals, no leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))

import harness


def test_deadline_counts_down_and_a_phase_never_outlasts_it() -> None:
    now = [100.0]
    d = harness.Deadline(10, clock=lambda: now[0])
    assert d.left() == 10 and not d.expired()
    assert d.within(3).at == 103  # a phase shorter than what is left
    assert d.within(30).at == 110  # a phase never past the run's deadline
    now[0] = 111
    assert d.left() == 0 and d.expired()


def test_sigterm_raises_keyboard_interrupt_and_marked_processes_are_killed() -> None:
    child = None
    with pytest.raises(KeyboardInterrupt), harness.limits(600):
        # A child started inside the run inherits the marker, as the broker and stages do.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted at once
    assert child is not None
    assert child.wait(5) == -signal.SIGKILL  # the net at the end of the run killed it
    assert harness.MARKER not in os.environ
    assert signal.getsignal(signal.SIGTERM) is not harness._on_signal  # handlers restored


def test_a_second_signal_does_not_interrupt_the_teardown() -> None:
    stopped = []
    with pytest.raises(KeyboardInterrupt), harness.limits(600):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # while tearing down: only a message
            time.sleep(0.1)
            stopped.append(True)
    assert stopped == [True]


def test_the_reaper_kills_marked_processes_when_the_benchmark_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "bench.py"
    script.write_text(
        "import subprocess, sys, time\n"
        f"sys.path.insert(0, {str(Path(harness.__file__).parent)!r})\n"
        "import harness\n"
        "with harness.limits(600):\n"
        "    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "    print(p.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    bench = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert bench.stdout is not None
    pid = int(bench.stdout.readline())
    bench.kill()  # SIGKILL: no finally, no atexit; the reaper sees its stdin close
    bench.wait(5)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists() or "Z" in _state(pid):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the benchmark's child outlived it")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
