"""The supervisor's status file: each stage process's state, for whoever wants to know.

`kllm up` (kllm.ops.supervisor) rewrites ``<run_dir>/status.json`` about twice a
second while it runs and removes it when it stops; `kllm scale`, the gateway's
``/healthz`` and its dashboard read it. The file::

    {"version": 1, "updated_at": 1767225600.5, "supervisor_pid": 4242,
     "processes": {"drift-0": {"stage": "drift", "replica": 0, "state": "failed",
                               "pid": null, "restarts": 5, "last_exit_code": 1,
                               "since": 1767225590.1, "reason": "crashed 6 times ...",
                               "log": ".kllm/logs/drift-0.log"}, ...}}

States: ``starting`` (launched, not yet consuming), ``running`` (consuming),
``restarting`` (exited; restarted after its backoff), ``failed`` (crashed more often
than its budget allows; left stopped while the other stages run), ``stopped``.
Times are seconds since the epoch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import orjson

from kllm.core.errors import PipelineError

STATUS_FILE = "status.json"
VERSION = 1
STALE_AFTER_S = 10.0
"""A file not rewritten for this long is a supervisor that is gone."""

State = Literal["starting", "running", "restarting", "failed", "stopped"]
STATES: tuple[str, ...] = get_args(State)


@dataclass(frozen=True)
class ProcessStatus:
    stage: str
    replica: int
    state: State
    pid: int | None
    restarts: int
    last_exit_code: int | None
    since: float
    """When the process entered ``state``."""
    reason: str = ""
    """Why it failed (empty otherwise)."""
    log: str = ""

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.replica}"


@dataclass(frozen=True)
class PipelineStatus:
    updated_at: float
    supervisor_pid: int
    processes: tuple[ProcessStatus, ...]

    def named(self, state: State) -> list[str]:
        """The processes in ``state``, by name."""
        return [p.name for p in self.processes if p.state == state]

    def failed_stages(self) -> list[str]:
        """Stages whose every process has failed: nothing of theirs runs."""
        stages = dict.fromkeys(p.stage for p in self.processes)
        return [
            s for s in stages if all(p.state == "failed" for p in self.processes if p.stage == s)
        ]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "version": VERSION,
                "updated_at": self.updated_at,
                "supervisor_pid": self.supervisor_pid,
                "processes": {p.name: asdict(p) for p in self.processes},
            }
        )


def write_status(path: Path, processes: Iterable[ProcessStatus]) -> PipelineStatus:
    """Replace the file at ``path`` in one step (readers never see half of it)."""
    status = PipelineStatus(time.time(), os.getpid(), tuple(processes))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(status.to_json())
    os.replace(tmp, path)
    return status


def read_status(path: Path, stale_after_s: float = STALE_AFTER_S) -> PipelineStatus | None:
    """The status at ``path``; None when there is none, or none fresh (no supervisor).
    A file that is there but not a status file raises PipelineError."""
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise PipelineError(f"{path} is unreadable: {exc}") from exc
    status = _parse(path, raw)
    if time.time() - status.updated_at > stale_after_s:
        return None
    return status


def _parse(path: Path, raw: Any) -> PipelineStatus:
    try:
        if raw["version"] != VERSION:
            raise PipelineError(f"{path}: status version {raw['version']}, expected {VERSION}")
        processes = tuple(_process(entry) for entry in raw["processes"].values())
        return PipelineStatus(float(raw["updated_at"]), int(raw["supervisor_pid"]), processes)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PipelineError(f"{path} is not a status file: {exc!r}") from exc


def _process(entry: dict[str, Any]) -> ProcessStatus:
    if entry["state"] not in STATES:
        raise ValueError(f"unknown state {entry['state']!r}")
    return ProcessStatus(
        stage=str(entry["stage"]),
        replica=int(entry["replica"]),
        state=entry["state"],
        pid=None if entry["pid"] is None else int(entry["pid"]),
        restarts=int(entry["restarts"]),
        last_exit_code=None if entry["last_exit_code"] is None else int(entry["last_exit_code"]),
        since=float(entry["since"]),
        reason=str(entry.get("reason", "")),
        log=str(entry.get("log", "")),
    )
