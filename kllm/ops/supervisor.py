"""Runs each stage as its own OS process, restarts crashed ones, stops them all cleanly."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient
from pydantic_settings import BaseSettings, SettingsConfigDict

from kllm.core.errors import PipelineError
from topics import GROUPLESS, STAGES, stage_groups

log = logging.getLogger(__name__)

__all__ = ["GROUPLESS", "STAGES", "ChildSettings", "StageProcess", "Supervisor"]
_PR_SET_PDEATHSIG = 1


class ChildSettings(BaseSettings):
    """What the supervisor reads of the stages' configuration: the environment, with
    the values it was given for its children on top."""

    model_config = SettingsConfigDict(env_prefix="KLLM_", frozen=True, extra="ignore")

    pool: str = ""
    """The inference pool the inference processes serve (their group)."""
    metrics_base_port: int = 0
    """First /metrics port; 0: the stages open none."""

    @classmethod
    def over(cls, env: Mapping[str, str]) -> ChildSettings:
        """The settings with ``env`` (KLLM_* names) over the process environment."""
        given: dict[str, Any] = {
            f: env[k] for f in cls.model_fields if (k := f"KLLM_{f.upper()}") in env
        }
        return cls(**given)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies, even by SIGKILL (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class StageProcess:
    stage: str
    replica: int
    log_path: Path
    ready_file: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    exit_codes: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.replica}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        return self.alive() and self.ready_file.exists()

    def state(self) -> str:
        if self.proc is None:
            return "stopped"
        if not self.alive():
            return f"exited({self.proc.returncode})"
        return "ready" if self.ready() else "starting"


class Supervisor:
    def __init__(
        self,
        run_dir: Path,
        env: Mapping[str, str],
        replicas: Mapping[str, int] | None = None,
        max_restarts: int = 5,
        stages: Iterable[str] = STAGES,
    ) -> None:
        self.run_dir = run_dir
        self.env = dict(env)
        self.config = ChildSettings.over(self.env)
        self.max_restarts = max_restarts
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "ready").mkdir(parents=True, exist_ok=True)
        (run_dir / "control").mkdir(parents=True, exist_ok=True)
        self.stages = tuple(stages)
        counts = {s: 1 for s in self.stages} | dict(replicas or {})
        self.procs = [
            StageProcess(
                stage=s,
                replica=i,
                log_path=run_dir / "logs" / f"{s}-{i}.log",
                ready_file=run_dir / "ready" / f"{s}-{i}",
            )
            for s in self.stages
            for i in range(counts[s])
        ]

    def start(self, sp: StageProcess) -> None:
        sp.ready_file.unlink(missing_ok=True)
        env = os.environ | self.env | {"KLLM_READY_FILE": str(sp.ready_file)}
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
                preexec_fn=_die_with_parent,
            )
        sp.started_at = time.monotonic()
        log.info("stage started", extra={"stage": sp.name, "pid": sp.proc.pid})

    def _port_slot(self, sp: StageProcess) -> int:
        return STAGES.index(sp.stage) * 16 + sp.replica if sp.stage in STAGES else sp.replica

    def start_all(self) -> None:
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
    ) -> None:
        """Wait until every stage is consuming: ready file written and, given the
        broker address, its consumer group has settled with members."""
        deadline = time.monotonic() + timeout_s
        reported: set[str] = set()
        admin = AdminClient({"bootstrap.servers": bootstrap}) if bootstrap else None
        while time.monotonic() < deadline:
            for sp in self.procs:
                if sp.proc is not None and not sp.alive():
                    raise PipelineError(
                        f"{sp.name} exited with code {sp.proc.returncode} while starting; "
                        f"see {sp.log_path}:\n{tail(sp.log_path)}"
                    )
                if sp.ready() and sp.name not in reported:
                    reported.add(sp.name)
                    if on_progress:
                        on_progress(sp)
            if len(reported) == len(self.procs) and (
                admin is None or groups_stable(admin, self.awaited_groups())
            ):
                return
            time.sleep(0.1)
        waiting = [sp.name for sp in self.procs if sp.name not in reported]
        raise PipelineError(f"stages not ready after {timeout_s:.0f}s: {waiting or 'groups'}")

    def awaited_groups(self) -> set[str]:
        """The declared groups the running stages always join (topics.groups); one
        turned on by a setting (the cache filler) is not waited for."""
        return {
            g.name
            for s in self.stages
            if s not in GROUPLESS
            for g in stage_groups(s, self.config.pool)
            if not g.runs_if
        }

    def restart_crashed(self) -> list[str]:
        """Restart stages that died; give up on one that keeps crashing."""
        restarted = []
        for sp in self.procs:
            if sp.proc is None or sp.alive():
                continue
            sp.exit_codes.append(sp.proc.returncode)
            if sp.restarts >= self.max_restarts:
                raise PipelineError(
                    f"{sp.name} crashed {sp.restarts + 1} times (exit codes {sp.exit_codes}); "
                    f"last log lines:\n{tail(sp.log_path)}"
                )
            sp.restarts += 1
            log.warning(
                "stage exited; restarting", extra={"stage": sp.name, "code": sp.proc.returncode}
            )
            self.start(sp)
            restarted.append(sp.name)
        return restarted

    def scale(self, stage: str, replicas: int) -> list[str]:
        """Run ``replicas`` processes of ``stage`` (in its consumer group): start the
        missing ones, stop the highest-numbered extra ones. Returns what changed."""
        if stage not in self.stages:
            raise PipelineError(f"{stage!r} is not running here (stages: {', '.join(self.stages)})")
        mine = sorted((sp for sp in self.procs if sp.stage == stage), key=lambda sp: sp.replica)
        changed = []
        for sp in mine[replicas:]:
            if sp.proc is not None and sp.alive():
                sp.proc.terminate()
                sp.proc.wait(15)
            sp.ready_file.unlink(missing_ok=True)
            self.procs.remove(sp)
            changed.append(f"stopped {sp.name}")
        for i in range(len(mine), replicas):
            sp = StageProcess(
                stage=stage,
                replica=i,
                log_path=self.run_dir / "logs" / f"{stage}-{i}.log",
                ready_file=self.run_dir / "ready" / f"{stage}-{i}",
            )
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
        status = {
            sp.name: {
                "stage": sp.stage,
                "pid": sp.proc.pid if sp.proc else None,
                "state": sp.state(),
            }
            for sp in self.procs
        }
        path = self.run_dir / "status.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(status))
        os.replace(tmp, path)

    def kill(self, stage: str, replica: int = 0, sig: int = signal.SIGKILL) -> None:
        sp = self.find(stage, replica)
        if sp.proc is not None and sp.alive():
            sp.proc.send_signal(sig)
            sp.proc.wait()

    def stop_all(self, timeout_s: float = 15.0) -> None:
        live = [sp for sp in self.procs if sp.alive()]
        for sp in live:
            assert sp.proc is not None
            sp.proc.terminate()
        deadline = time.monotonic() + timeout_s
        for sp in live:
            assert sp.proc is not None
            try:
                sp.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("stage ignored SIGTERM; killing", extra={"stage": sp.name})
                sp.proc.kill()
                sp.proc.wait()
        for sp in self.procs:
            sp.ready_file.unlink(missing_ok=True)


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
