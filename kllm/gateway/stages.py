"""The other stages' processes as the supervisor's status file tells them
(kllm.core.stage_status), for ``/healthz`` and the dashboard.

`kllm up` writes the file; a gateway run without it reports nothing of the others.
A stage that failed (it crashed past its restart budget) is shown; the gateway is not
ready only when every process of a stage that every answer passes through has failed,
since then no request can be answered. A failed stage off that path (feedback, drift)
leaves it ready, and degraded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kllm.core.errors import PipelineError
from kllm.core.stage_status import read_status

log = logging.getLogger(__name__)

REQUEST_PATH = frozenset({"gateway", "ingestion", "retrieval", "inference", "moderation"})
"""The stages every answer passes through (topics.STAGES names)."""


def stage_report(status_file: str) -> tuple[bool, dict[str, Any]]:
    """(whether requests can be answered, what the status file says of each process)."""
    if not status_file:
        return True, {"supervised": False}
    try:
        status = read_status(Path(status_file))
    except PipelineError as exc:
        log.warning("stage status unreadable", extra={"reason": str(exc)})
        return True, {"supervised": False, "error": str(exc)}
    if status is None:
        return True, {"supervised": False}
    blocking = [s for s in status.failed_stages() if s in REQUEST_PATH]
    processes = {
        p.name: {
            "state": p.state,
            "restarts": p.restarts,
            "last_exit_code": p.last_exit_code,
            "since": p.since,
            "reason": p.reason,
        }
        for p in status.processes
    }
    report = {
        "supervised": True,
        "failed": status.named("failed"),
        "restarting": status.named("restarting"),
        "blocking": blocking,
        "processes": processes,
    }
    return not blocking, report


def add_stage_health(body: dict[str, Any], status_file: str) -> bool:
    """Put the stages' report in a ``/healthz`` body (none when no supervisor writes
    one); whether they let it be ready. An ``ok`` status becomes ``degraded`` when a
    stage failed, ``not ready: ...`` when one on the request path did."""
    ready, report = stage_report(status_file)
    if report == {"supervised": False}:
        return ready  # no `kllm up` here: nothing to say of the others
    body["stages"] = report
    if body.get("status") == "ok" and not ready:
        body["status"] = f"not ready: {', '.join(report['blocking'])} failed"
    elif body.get("status") == "ok" and report.get("failed"):
        body["status"] = "degraded"
    return ready
