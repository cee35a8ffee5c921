"""The supervisor's restart policy: backoff with jitter, a sliding-window crash budget,
a failed process left alone while the others run, and the status file that says so."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from kllm.core.errors import ConfigError, PipelineError
from kllm.core.stage_status import STATUS_FILE, ProcessStatus, read_status, write_status
from kllm.ops import supervisor
from kllm.ops.restarts import CrashBudget, RestartPolicy
from kllm.ops.supervisor import ChildSettings, Supervisor

POLICY = RestartPolicy(budget=3, window_s=60.0, backoff_s=1.0, backoff_max_s=10.0, jitter=0.25)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the policy, pure ----------------------------------------------------------------------


def test_first_crash_restarts_at_once_then_the_wait_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(budget=10, backoff_s=1.0, backoff_max_s=10.0, jitter=0.0)
    assert [policy.delay_s(n, 0.5) for n in range(1, 8)] == [0, 1, 2, 4, 8, 10, 10]


def test_jitter_scales_the_wait_within_its_bounds_and_never_past_the_cap() -> None:
    assert POLICY.delay_s(3, 0.0) == pytest.approx(2 * 0.75)
    assert POLICY.delay_s(3, 0.5) == pytest.approx(2.0)
    assert POLICY.delay_s(3, 0.999) == pytest.approx(2 * 1.25, rel=1e-2)
    assert POLICY.delay_s(20, 0.999) == 10.0
    assert len({POLICY.delay_s(4, d / 10) for d in range(10)}) == 10  # spread, not one value


def test_the_crash_past_the_budget_within_the_window_fails_the_process() -> None:
    budget = CrashBudget(POLICY)
    verdicts = [budget.crashed(t, 0.5) for t in (0.0, 1.0, 3.0, 7.0)]
    assert [v.crashes for v in verdicts] == [1, 2, 3, 4]
    assert [v.failed for v in verdicts] == [False, False, False, True]
    assert [v.delay_s for v in verdicts[:3]] == [0.0, 1.0, 2.0]


def test_crashes_older_than_the_window_leave_the_budget() -> None:
    budget = CrashBudget(POLICY)
    for t in (0.0, 10.0, 20.0):
        assert not budget.crashed(t, 0.5).failed
    # At 65 s the crash at 0 s is out of the 60 s window: three within it, no failure;
    # the wait is that of a third crash, not of a fourth.
    late = budget.crashed(65.0, 0.5)
    assert (late.crashes, late.failed, late.delay_s) == (3, False, 2.0)
    assert budget.in_window(200.0) == 0
    assert budget.crashed(200.0, 0.5).delay_s == 0.0  # long quiet: at once again


def test_a_zero_budget_fails_at_the_first_crash_and_reset_forgets() -> None:
    budget = CrashBudget(RestartPolicy(budget=0))
    assert budget.crashed(0.0, 0.5).failed
    budget.reset()
    assert budget.in_window(0.0) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"budget": -1},
        {"window_s": 0},
        {"backoff_s": 5, "backoff_max_s": 1},
        {"jitter": 1.0},
    ],
)
def test_a_policy_that_makes_no_sense_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RestartPolicy(**bad)  # type: ignore[arg-type]


def test_the_policy_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLLM_RESTART_BACKOFF_S", "0.5")
    policy = ChildSettings.over({"KLLM_RESTART_BUDGET": "2", "KLLM_RESTART_WINDOW_S": "30"})
    assert policy.restart_policy() == RestartPolicy(budget=2, window_s=30, backoff_s=0.5)
    with pytest.raises(ConfigError):
        Supervisor(Path("/tmp/unused"), {"KLLM_RESTART_BUDGET": "many"}, stages=())


# --- the supervisor, with processes that exit at once -------------------------------------


def _exited(sup: Supervisor) -> None:
    """Wait until every started process has exited (they exit at once)."""
    deadline = time.monotonic() + 30
    while any(sp.alive() for sp in sup.procs):
        assert time.monotonic() < deadline, "a process that should exit did not"
        time.sleep(0.02)


def _crash_loop(tmp_path: Path, clock: FakeClock) -> Supervisor:
    # `python -m services.crashloop`: no such module, so each start exits with code 1.
    sup = Supervisor(
        tmp_path, {}, stages=("crashloop",), policy=POLICY, draw=lambda: 0.5, clock=clock
    )
    sup.start_all()
    _exited(sup)
    return sup


def test_a_crash_looping_process_backs_off_then_fails_and_stays_down(tmp_path: Path) -> None:
    clock = FakeClock()
    sup = _crash_loop(tmp_path, clock)
    sp = sup.procs[0]
    kinds = [c.kind for c in sup.supervise()]
    assert kinds == ["exited", "restarted"]  # the first restart is at once
    _exited(sup)
    assert [c.kind for c in sup.supervise()] == ["exited"]  # second crash: wait 1 s
    assert sp.state() == "restarting" and sup.supervise() == []
    clock.now += 0.9
    assert sup.supervise() == []  # not yet
    clock.now += 0.2
    assert [c.kind for c in sup.supervise()] == ["restarted"]
    _exited(sup)
    (third,) = sup.supervise()
    assert "restarting in 2.0 s" in third.text
    clock.now += 2.0
    sup.supervise()
    _exited(sup)
    (failed,) = sup.supervise()
    assert failed.kind == "failed"
    assert "crashloop-0 FAILED: crashed 4 times within 60 s (exit codes 1, 1, 1, 1)" in failed.text
    assert "No module named services.crashloop" in failed.text  # the log's tail
    clock.now += 3600
    assert sup.supervise() == [] and not sp.alive()  # failed: never restarted
    assert (sp.state(), sp.restarts) == ("failed", 3)


def test_the_status_file_says_which_process_failed_and_why(tmp_path: Path) -> None:
    clock = FakeClock()
    sup = _crash_loop(tmp_path, clock)
    sup.write_status()
    status = read_status(tmp_path / STATUS_FILE)
    assert status is not None
    assert [(p.name, p.state) for p in status.processes] == [("crashloop-0", "restarting")]
    for _ in range(20):  # crashes 2.5 s apart, each restart once its backoff is over
        if sup.procs[0].failed:
            break
        clock.now += 2.5
        sup.supervise()
        _exited(sup)
    sup.write_status()
    status = read_status(tmp_path / STATUS_FILE)
    assert status is not None
    (p,) = status.processes
    assert (p.state, p.restarts, p.last_exit_code, p.pid) == ("failed", 3, 1, None)
    assert p.reason.startswith("crashed 4 times within 60 s")
    assert p.since <= time.time() and p.log.endswith("crashloop-0.log")
    assert status.failed_stages() == ["crashloop"]


def test_waiting_for_stages_that_all_fail_ends_with_why(tmp_path: Path) -> None:
    policy = RestartPolicy(budget=1, backoff_s=0.0)
    sup = Supervisor(tmp_path, {}, stages=("crashloop",), policy=policy)
    sup.start_all()
    seen: list[str] = []
    with pytest.raises(PipelineError, match="every stage process failed: crashloop-0 crashed 2"):
        sup.wait_ready(30, on_change=lambda c: seen.append(c.kind))
    assert seen == ["exited", "restarted", "failed"]


def test_scaling_a_failed_stage_starts_it_again_with_a_new_budget(tmp_path: Path) -> None:
    policy = RestartPolicy(budget=0)
    sup = Supervisor(tmp_path, {}, stages=("crashloop",), policy=policy)
    sup.start_all()
    _exited(sup)
    assert [c.kind for c in sup.supervise()] == ["failed"]
    assert sup.scale("crashloop", 1) == ["started crashloop-0 again (it had failed)"]
    assert sup.procs[0].state() in ("starting", "restarting")
    sup.stop_all()
    assert sup.supervise() == []  # stopping: nothing restarts


def test_scaling_down_kills_a_process_that_ignores_sigterm_past_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "STOP_GRACE_S", 0.5)
    sup = Supervisor(tmp_path, {}, stages=("stubborn",))
    (sp,) = sup.procs  # not started: stand in a process that ignores SIGTERM
    ignores_term = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(flush=True); time.sleep(60)"
    )
    sp.proc = subprocess.Popen([sys.executable, "-c", ignores_term], stdout=subprocess.PIPE)
    assert sp.proc.stdout is not None
    sp.proc.stdout.readline()  # its handler is in place
    t0 = time.monotonic()
    assert sup.scale("stubborn", 0) == ["stopped stubborn-0"]
    assert sp.proc.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 10 and sup.procs == []


# --- the status file ----------------------------------------------------------------------


def _entry(state: str, replica: int = 0, stage: str = "drift") -> ProcessStatus:
    return ProcessStatus(stage, replica, state, None, 0, None, time.time())  # type: ignore[arg-type]


def test_a_stage_is_failed_only_when_every_replica_is(tmp_path: Path) -> None:
    path = tmp_path / STATUS_FILE
    write_status(path, [_entry("failed", 0), _entry("running", 1), _entry("failed", 0, "feedback")])
    status = read_status(path)
    assert status is not None
    assert status.failed_stages() == ["feedback"]
    assert status.named("failed") == ["drift-0", "feedback-0"]


def test_a_missing_or_stale_file_is_no_status_and_a_bad_one_an_error(tmp_path: Path) -> None:
    path = tmp_path / STATUS_FILE
    assert read_status(path) is None
    write_status(path, [_entry("running")])
    assert read_status(path, stale_after_s=-1.0) is None  # not rewritten: no supervisor
    raw = orjson.loads(path.read_bytes())
    raw["processes"]["drift-0"]["state"] = "ready"  # the old file's word
    path.write_bytes(orjson.dumps(raw))
    with pytest.raises(PipelineError, match="not a status file"):
        read_status(path)
    path.write_bytes(b"{")
    with pytest.raises(PipelineError, match="unreadable"):
        read_status(path)
