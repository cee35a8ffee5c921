"""The gateway's /healthz and dashboard data say which stage processes failed, from the
supervisor's status file; only a failed stage on the request path makes it not ready."""

from __future__ import annotations

import time
from pathlib import Path

from starlette.testclient import TestClient

from kllm.core.stage_status import STATUS_FILE, ProcessStatus, State, write_status
from kllm.gateway.routes import make_app
from kllm.gateway.stages import REQUEST_PATH
from tests.unit.test_gateway import auth, chat, make_rig
from topics import STAGES


def _status(tmp_path: Path, **states: State) -> None:
    """Every stage running, but for those given (``drift="failed"``)."""
    write_status(
        tmp_path / STATUS_FILE,
        [
            ProcessStatus(
                stage=s,
                replica=0,
                state=states.get(s, "running"),
                pid=None if states.get(s) == "failed" else 4000 + i,
                restarts=5 if states.get(s) == "failed" else 0,
                last_exit_code=1 if states.get(s) == "failed" else None,
                since=time.time(),
                reason="crashed 6 times within 300 s" if states.get(s) == "failed" else "",
            )
            for i, s in enumerate(STAGES)
        ],
    )


def test_the_request_path_is_named_in_the_stages() -> None:
    assert set(STAGES) > REQUEST_PATH


def test_a_failed_stage_off_the_request_path_is_reported_and_the_gateway_answers(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path)
    _status(tmp_path, drift="failed")
    with TestClient(make_app(rig.gw)) as client:
        health = client.get("/healthz")
        answer = client.post("/v1/chat/completions", json=chat(), headers=auth(rig.secret))
        data = client.get("/dashboard/data")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "degraded"
    assert body["stages"]["failed"] == ["drift-0"] and body["stages"]["blocking"] == []
    assert body["stages"]["processes"]["drift-0"]["last_exit_code"] == 1
    assert answer.status_code == 200
    procs = data.json()["stages"]["processes"]
    assert procs["drift-0"]["state"] == "failed" and procs["ingestion-0"]["state"] == "running"


def test_a_failed_stage_on_the_request_path_makes_the_gateway_not_ready(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    _status(tmp_path, retrieval="failed", feedback="restarting")
    with TestClient(make_app(rig.gw)) as client:
        health = client.get("/healthz")
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "not ready: retrieval failed"
    assert body["stages"]["restarting"] == ["feedback-0"]


def test_all_running_is_ok_and_a_stale_or_bad_file_is_no_verdict(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    _status(tmp_path)
    with TestClient(make_app(rig.gw)) as client:
        fine = client.get("/healthz")
        (tmp_path / STATUS_FILE).write_bytes(b"not json")
        bad = client.get("/healthz")
        (tmp_path / STATUS_FILE).unlink()
        gone = client.get("/healthz")
        data = client.get("/dashboard/data")
    assert (fine.status_code, fine.json()["status"], fine.json()["stages"]["failed"]) == (
        200,
        "ok",
        [],
    )
    assert bad.status_code == 200 and "unreadable" in bad.json()["stages"]["error"]
    assert gone.status_code == 200 and "stages" not in gone.json()
    assert data.json()["stages"] == {"supervised": False}
