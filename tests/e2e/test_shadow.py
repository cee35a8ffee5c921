"""Shadow and replay on the real broker and stages: `kllm shadow start` answers copies of
live jobs with a candidate that no caller sees, the evaluation stage scores both sides,
`kllm shadow report` lists both, and `kllm replay` re-runs 200 retained jobs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime

from kllm.ops.supervisor import Supervisor
from schemas import (
    ChatTurn,
    Evaluation,
    InferenceJob,
    Request,
    Response,
    RetrievalContext,
    decode,
    encode,
)
from tests.e2e.conftest import REPO, Client, Replies, collect
from topics import EVALUATIONS, GENERATIONS_SHADOW, INFERENCE, RESPONSES

LIVE, CANDIDATE = "smollm2-135m", "scripted"


def _kllm(
    pipeline: Supervisor, *argv: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kllm.cli", *argv],
        cwd=REPO, env=pipeline.env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _every(replies: Replies, ids: set[str], want: int, timeout_s: float) -> dict[str, list[bytes]]:
    """Every record for ``ids`` until each has ``want`` of them (or the time is up)."""
    got: dict[str, list[bytes]] = {i: [] for i in ids}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(len(v) < want for v in got.values()):
        for key, value in replies.reader.records(min(5.0, deadline - time.monotonic())):
            if key in got:
                got[key].append(value)
    return got


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t).isoformat()


def test_a_shadow_answers_live_jobs_unseen_and_the_report_lists_both(
    pipeline: Supervisor, client: Client
) -> None:
    tenant = f"sh-{uuid.uuid4().hex[:6]}"
    shadows, responses = client.tail(GENERATIONS_SHADOW), client.tail(RESPONSES)
    evaluations = client.tail(EVALUATIONS)
    started = time.time()
    worker = subprocess.Popen(
        [sys.executable, "-m", "kllm.cli", "shadow", "start", "--model", CANDIDATE,
         "--name", f"e2e-{uuid.uuid4().hex[:6]}", "--sample", "1"],
        cwd=REPO, env=pipeline.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # A new shadow copies traffic from when its group is assigned: ask until it answers.
        deadline = time.monotonic() + 120
        while True:
            probe = client.send("What is a consumer group?", tenant=tenant, model=LIVE)
            if collect(shadows, {probe}, 5):
                break
            assert time.monotonic() < deadline and worker.poll() is None, (
                "the shadow never answered"
            )
        asked = [f"How do partitions keep order? ({i})" for i in range(5)]
        ids = {client.send(q, tenant=tenant, model=LIVE, max_tokens=16) for q in asked}
        answers = {
            k: [decode(v, Response) for v in vs] for k, vs in _every(responses, ids, 1, 180).items()
        }
        copies = collect(shadows, ids, 60)
        scored = {
            k: [decode(v, Evaluation) for v in vs]
            for k, vs in _every(evaluations, ids, 2, 90).items()
        }
        late = _every(responses, ids, 1, 3)  # a second answer would show up by now
    finally:
        worker.send_signal(signal.SIGINT)
        out, _ = worker.communicate(timeout=60)
        for r in (shadows, responses, evaluations):
            r.close()
    assert worker.returncode == 0, out
    assert set(copies) == ids, f"no shadow answer for {ids - set(copies)}"
    # Callers saw only the live model: every response to these requests is its answer
    # (a redelivery under load may repeat one: at least once, never the candidate's).
    seen = {i: [*answers[i], *(decode(v, Response) for v in late[i])] for i in ids}
    assert all(seen[i] and all(r.model == LIVE for r in seen[i]) for i in ids), seen
    for rid in ids:
        sources = {(e.source, e.model) for e in scored[rid]}
        assert sources == {("primary", LIVE), ("shadow", CANDIDATE)}, (rid, sources)

    report = _kllm(pipeline, "shadow", "report", "--model", CANDIDATE, "--since", _iso(started))
    assert report.returncode == 0, report.stdout + report.stderr
    assert f"{LIVE} (live) vs {CANDIDATE}" in report.stdout, report.stdout
    assert "| groundedness |" in report.stdout and "| latency_ms |" in report.stdout


def _job(tenant: str, i: int) -> InferenceJob:
    rid = f"replay-{uuid.uuid4().hex[:8]}-{i}"
    request = Request(request_id=rid, tenant=tenant, prompt=f"Replay me {i}", model=CANDIDATE)
    return InferenceJob(
        request=request,
        context=RetrievalContext(request_id=rid),
        messages=[ChatTurn(role="system", content="Answer briefly."),
                  ChatTurn(role="user", content=f"Replay me {i}")],
    )  # fmt: skip


def test_replay_reruns_200_retained_jobs_into_200_shadow_generations(
    pipeline: Supervisor, client: Client
) -> None:
    tenant = f"rp-{uuid.uuid4().hex[:6]}"
    jobs = [_job(tenant, i) for i in range(200)]
    since = time.time() - 0.5
    for job in jobs:
        client.producer.produce(INFERENCE.name, key=job.request.request_id, value=encode(job))
    assert client.producer.flush(30) == 0
    until = time.time() + 0.5
    time.sleep(1.0)
    shadows = client.tail(GENERATIONS_SHADOW)
    try:
        done = _kllm(pipeline, "replay", "--since", _iso(since), "--until", _iso(until),
                     "--model", CANDIDATE)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "200 shadow generations from 200 jobs (0 failed, 0 skipped)" in done.stdout, (
            done.stdout
        )
        ids = {j.request.request_id for j in jobs}
        got = collect(shadows, ids, 60)
    finally:
        shadows.close()
    assert set(got) == ids, f"{len(ids - set(got))} of 200 jobs have no shadow generation"
