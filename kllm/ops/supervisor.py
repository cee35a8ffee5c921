"""Runs each stage as its own OS process, restarts crashed ones, stops them all cleanly.

A crashed process is restarted on the backoff of its restart policy (kllm.ops.restarts);
one that crashes more often than its budget allows is marked failed and left stopped,
and the other stages keep running. Each process's state goes to the status file
(kllm.core.stage_status), which `kllm scale` and the gateway read."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from kllm.core import stage_status
from kllm.core.errors import ConfigError, PipelineError
from kllm.core.stage_status import STATUS_FILE, ProcessStatus, State
from kllm.ops.proc import die_with_parent
from kllm.ops.restarts import CrashBudget, RestartPolicy
from topics import GROUPLESS, STAGES, stage_groups

log = logging.getLogger(__name__)

STOP_GRACE_S = 15.0
"""How long a stage sent SIGTERM may take to stop before it is sent SIGKILL."""

__all__ = [
    "GROUPLESS",
    "STAGES",
    "Change",
    "ChildSettings",
    "RestartPolicy",
    "StageProcess",
    "Supervisor",
]


class ChildSettings(BaseSettings):
    """What the supervisor reads of the stages' configuration: the environment, with
    the values it was given for its children on top."""

    model_config = SettingsConfigDict(env_prefix="KLLM_", frozen=True, extra="ignore")

    pool: str = ""
    """The inference pool the inference processes serve (their group)."""
    metrics_base_port: int = 0
    """First /metrics port; 0: the stages open none."""
    restart_budget: int = 5
    """Crashes a stage process may have within ``restart_window_s`` before it is marked
    failed and left stopped (the other stages keep running)."""
    restart_window_s: float = 300.0
    restart_backoff_s: float = 1.0
    """Wait before the second restart within the window, doubled for each crash after
    (the first restart is at once), with +-25 % jitter."""
    restart_backoff_max_s: float = 60.0

    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy(
            budget=self.restart_budget,
            window_s=self.restart_window_s,
            backoff_s=self.restart_backoff_s,
            backoff_max_s=self.restart_backoff_max_s,
        )

    @classmethod
    def over(cls, env: Mapping[str, str]) -> ChildSettings:
        """The settings with ``env`` (KLLM_* names) over the process environment."""
        given: dict[str, Any] = {
            f: env[k] for f in cls.model_fields if (k := f"KLLM_{f.upper()}") in env
        }
        return cls(**given)


@dataclass
class StageProcess:
    stage: str
    replica: int
    log_path: Path
    ready_file: Path
    budget: CrashBudget = field(default_factory=lambda: CrashBudget(RestartPolicy()))
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    exit_codes: list[int] = field(default_factory=list)
    restart_at: float | None = None
    """When a crashed process is due to start again (the supervisor's clock)."""
    failed: str = ""
    """Why the process was given up on; empty while it is not."""
    seen: State = "stopped"
    since: float = field(default_factory=time.time)
    """When ``seen`` last changed (seconds since the epoch)."""

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.replica}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        return self.alive() and self.ready_file.exists()

    def state(self) -> State:
        if self.failed:
            return "failed"
        if self.proc is None:
            return "stopped"
        if not self.alive():
            return "restarting"
        return "running" if self.ready_file.exists() else "starting"

    def status(self) -> ProcessStatus:
        """The process as the status file shows it; notes when its state changed."""
        state = self.state()
        if state != self.seen:
            self.seen, self.since = state, time.time()
        return ProcessStatus(
            stage=self.stage,
            replica=self.replica,
            state=state,
            pid=self.proc.pid if self.proc is not None and self.alive() else None,
            restarts=self.restarts,
            last_exit_code=self.exit_codes[-1] if self.exit_codes else None,
            since=self.since,
            reason=self.failed,
            log=str(self.log_path),
        )


@dataclass(frozen=True)
class Change:
    """Something the supervisor did to a process, said for the operator."""

    name: str
    kind: Literal["exited", "restarted", "failed"]
    text: str


class Supervisor:
    def __init__(
        self,
        run_dir: Path,
        env: Mapping[str, str],
        replicas: Mapping[str, int] | None = None,
        stages: Iterable[str] = STAGES,
        policy: RestartPolicy | None = None,
        draw: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``policy``: when to restart a crashed process and when to give up on it
        (default: from the settings, KLLM_RESTART_*); ``draw`` and ``clock`` feed it."""
        self.run_dir = run_dir
        self.env = dict(env)
        try:
            self.config = ChildSettings.over(self.env)
        except ValidationError as exc:
            raise ConfigError(f"supervisor settings: {exc}") from exc
        self.policy = policy or self.config.restart_policy()
        self.draw, self.clock = draw, clock
        self.stopping = False
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "ready").mkdir(parents=True, exist_ok=True)
        (run_dir / "control").mkdir(parents=True, exist_ok=True)
        self.stages = tuple(stages)
        counts = {s: 1 for s in self.stages} | dict(replicas or {})
        self.procs = [self._process(s, i) for s in self.stages for i in range(counts[s])]

    def _process(self, stage: str, replica: int) -> StageProcess:
        return StageProcess(
            stage=stage,
            replica=replica,
            log_path=self.run_dir / "logs" / f"{stage}-{replica}.log",
            ready_file=self.run_dir / "ready" / f"{stage}-{replica}",
            budget=CrashBudget(self.policy),
        )

    def start(self, sp: StageProcess) -> None:
        sp.ready_file.unlink(missing_ok=True)
        env = os.environ | self.env | {"KLLM_READY_FILE": str(sp.ready_file)}
        # Each process its own state stores, as on separate hosts: a partition that moves
        # takes its keyed state with it through the changelog, not through a shared disk.
        env["KLLM_STATE_DIR"] = str(self.run_dir / "state" / sp.name)
        if self.config.metrics_base_port:
            # One port per process, stable across restarts: stage order, then replica.
            env["KLLM_METRICS_PORT"] = str(self.config.metrics_base_port + self._port_slot(sp))
        with open(sp.log_path, "ab") as out:
            sp.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{sp.stage}"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the supervisor, which stops us in order
                preexec_fn=die_with_parent,
            )
        sp.started_at = time.monotonic()
        sp.restart_at = None
        log.info("stage started", extra={"stage": sp.name, "pid": sp.proc.pid})

    def _port_slot(self, sp: StageProcess) -> int:
        return STAGES.index(sp.stage) * 16 + sp.replica if sp.stage in STAGES else sp.replica

    def start_all(self) -> None:
        self.stopping = False
        for sp in self.procs:
            self.start(sp)

    def find(self, stage: str, replica: int = 0) -> StageProcess:
        for sp in self.procs:
            if sp.stage == stage and sp.replica == replica:
                return sp
        raise KeyError(f"no process {stage}-{replica}")

    def wait_ready(
        self,
        timeout_s: float,
        on_progress: Callable[[StageProcess], None] | None = None,
        bootstrap: str | None = None,
        on_change: Callable[[Change], None] | None = None,
    ) -> None:
        """Wait until every stage is consuming: ready file written and, given the
        broker address, its consumer group has settled with members.

        Given ``on_change``, a process that crashes meanwhile is supervised as later
        (restarted on its backoff, failed past its budget; each change is passed on)
        and a failed one is not waited for. Without, a crash fails the wait at once."""
        deadline = time.monotonic() + timeout_s
        reported: set[str] = set()
        admin = AdminClient({"bootstrap.servers": bootstrap}) if bootstrap else None
        while time.monotonic() < deadline:
            if on_change is None:
                self._fail_on_exit()
            else:
                for change in self.supervise():
                    on_change(change)
                self.write_status()
            live = [sp for sp in self.procs if not sp.failed]
            if not live:
                raise PipelineError(f"every stage process failed: {self._failures()}")
            for sp in live:
                if sp.ready() and sp.name not in reported:
                    reported.add(sp.name)
                    if on_progress:
                        on_progress(sp)
            if all(sp.ready() for sp in live) and (
                admin is None or groups_stable(admin, self.awaited_groups())
            ):
                return
            time.sleep(0.1)
        waiting = [sp.name for sp in self.procs if not sp.failed and not sp.ready()]
        raise PipelineError(f"stages not ready after {timeout_s:.0f}s: {waiting or 'groups'}")

    def _fail_on_exit(self) -> None:
        for sp in self.procs:
            if sp.proc is not None and not sp.alive():
                raise PipelineError(
                    f"{sp.name} exited with code {sp.proc.returncode} while starting; "
                    f"see {sp.log_path}:\n{tail(sp.log_path)}"
                )

    def _failures(self) -> str:
        return "; ".join(f"{sp.name} {sp.failed}" for sp in self.procs if sp.failed)

    def failed_stages(self) -> set[str]:
        """Stages whose every process has failed."""
        return {
            s
            for s in self.stages
            if (mine := [sp for sp in self.procs if sp.stage == s])
            and all(sp.failed for sp in mine)
        }

    def awaited_groups(self) -> set[str]:
        """The declared groups the running stages always join (topics.groups); one
        turned on by a setting (the cache filler) is not waited for, nor the groups
        of a stage that failed."""
        failed = self.failed_stages()
        return {
            g.name
            for s in self.stages
            if s not in GROUPLESS and s not in failed
            for g in stage_groups(s, self.config.pool)
            if not g.runs_if
        }

    def supervise(self) -> list[Change]:
        """Restart the processes that died, each once its backoff is over; give up on
        one that crashed more often than its budget allows. Returns what it did."""
        if self.stopping:
            return []
        now = self.clock()
        changes: list[Change] = []
        for sp in self.procs:
            if sp.failed or sp.proc is None or sp.alive():
                continue
            if sp.restart_at is None:
                changes.append(self._crashed(sp, now))
            if sp.restart_at is not None and now >= sp.restart_at:
                self.start(sp)
                sp.restarts += 1
                pid = sp.proc.pid if sp.proc else "-"
                text = f"{sp.name} restarted (restart {sp.restarts}), pid {pid}"
                changes.append(Change(sp.name, "restarted", text))
        return changes

    def _crashed(self, sp: StageProcess, now: float) -> Change:
        """Note a crash; fail the process or set when it starts again."""
        code = sp.proc.returncode if sp.proc is not None else -1
        sp.exit_codes.append(code)
        verdict = sp.budget.crashed(now, self.draw())
        within = f"within {self.policy.window_s:g} s"
        if verdict.failed:
            codes = ", ".join(str(c) for c in sp.exit_codes[-verdict.crashes :])
            sp.failed = f"crashed {verdict.crashes} times {within} (exit codes {codes})"
            log.error("stage failed; not restarted", extra={"stage": sp.name, "reason": sp.failed})
            return Change(
                sp.name,
                "failed",
                f"{sp.name} FAILED: {sp.failed}; not restarted, the other stages keep "
                f"running. Last lines of {sp.log_path}:\n{tail(sp.log_path, 8)}",
            )
        sp.restart_at = now + verdict.delay_s
        log.warning(
            "stage exited; restarting",
            extra={"stage": sp.name, "code": code, "delay_s": round(verdict.delay_s, 2)},
        )
        return Change(
            sp.name,
            "exited",
            f"{sp.name} exited with code {code} (crash {verdict.crashes} of "
            f"{self.policy.budget} allowed {within}); restarting in {verdict.delay_s:.1f} s",
        )

    def restart_crashed(self) -> list[str]:
        """Supervise once; the names of the processes started again now."""
        return [c.name for c in self.supervise() if c.kind == "restarted"]

    def scale(self, stage: str, replicas: int) -> list[str]:
        """Run ``replicas`` processes of ``stage`` (in its consumer group): start the
        missing ones, stop the highest-numbered extra ones, start again a kept one
        that had failed (with its crash budget renewed). Returns what changed."""
        if stage not in self.stages:
            raise PipelineError(f"{stage!r} is not running here (stages: {', '.join(self.stages)})")
        mine = sorted((sp for sp in self.procs if sp.stage == stage), key=lambda sp: sp.replica)
        changed = []
        for sp in mine[replicas:]:
            if sp.proc is not None and sp.alive():
                sp.proc.terminate()
                _wait_or_kill(sp, time.monotonic() + STOP_GRACE_S)
            sp.ready_file.unlink(missing_ok=True)
            self.procs.remove(sp)
            changed.append(f"stopped {sp.name}")
        for sp in mine[:replicas]:
            if sp.failed:
                sp.failed = ""
                sp.budget.reset()
                self.start(sp)
                changed.append(f"started {sp.name} again (it had failed)")
        for i in range(len(mine), replicas):
            sp = self._process(stage, i)
            self.procs.append(sp)
            self.start(sp)
            changed.append(f"started {sp.name}")
        return changed

    def apply_scale_requests(self) -> list[str]:
        """Apply `kllm scale` requests left in the run folder, then report the replicas."""
        changed = []
        for request in sorted((self.run_dir / "control").glob("scale-*.json")):
            try:
                wanted = orjson.loads(request.read_bytes())
                changed += self.scale(str(wanted["stage"]), int(wanted["replicas"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, PipelineError) as exc:
                log.error("scale request refused", extra={"file": request.name, "reason": str(exc)})
            request.unlink(missing_ok=True)
        self.write_status()
        return changed

    def write_status(self) -> None:
        """Each process's state, to the status file (kllm.core.stage_status)."""
        stage_status.write_status(self.run_dir / STATUS_FILE, [sp.status() for sp in self.procs])

    def kill(self, stage: str, replica: int = 0, sig: int = signal.SIGKILL) -> None:
        sp = self.find(stage, replica)
        if sp.proc is not None and sp.alive():
            sp.proc.send_signal(sig)
            sp.proc.wait()

    def stop_all(self, timeout_s: float = STOP_GRACE_S) -> None:
        """Stop every process (SIGTERM, then SIGKILL past ``timeout_s``); none is
        restarted after."""
        self.stopping = True
        live = [sp for sp in self.procs if sp.alive()]
        for sp in live:
            assert sp.proc is not None
            sp.proc.terminate()
        deadline = time.monotonic() + timeout_s
        for sp in live:
            _wait_or_kill(sp, deadline)
        for sp in self.procs:
            sp.ready_file.unlink(missing_ok=True)


def _wait_or_kill(sp: StageProcess, deadline: float) -> None:
    """Wait for a process sent SIGTERM until ``deadline``, then SIGKILL it: a stage's
    graceful stop (flush, commit, leave its group) can outlast any grace on a busy host,
    and every stage survives a SIGKILL without losing a request."""
    assert sp.proc is not None
    try:
        sp.proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        log.warning("stage ignored SIGTERM; killing", extra={"stage": sp.name})
        sp.proc.kill()
        sp.proc.wait()


def groups_stable(admin: AdminClient, groups: Iterable[str]) -> bool:
    try:
        futures = admin.describe_consumer_groups(list(groups), request_timeout=5)
        described = [f.result() for f in futures.values()]
    except KafkaException:
        return False
    # State only: Tansu reports a stable group with an empty member list.
    return all(g.state == ConsumerGroupState.STABLE for g in described)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
