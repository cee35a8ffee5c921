"""The evaluation stage on the real pipeline: every answer scored once on llm.evaluations,
read by the drift stage, and shown on the dashboard per tenant and model."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from kllm.ops.supervisor import Supervisor
from kllm.runtime.lag import consumer_lag
from schemas import Evaluation, decode
from tests.e2e.conftest import Client, collect, wait_until
from topics import DRIFT_GROUP, EVALUATIONS, RESPONSES


def test_answers_are_scored_online_and_reach_drift_and_the_dashboard(
    pipeline: Supervisor, client: Client
) -> None:
    base = f"http://127.0.0.1:{pipeline.env['KLLM_GATEWAY_PORT']}"
    httpx.get(f"{base}/dashboard", timeout=10)  # starts the dashboard's monitor
    wait_until(
        lambda: httpx.get(f"{base}/dashboard/data", timeout=10).json()["tailing"],
        30,
        "the dashboard's monitor to tail the topics",
        every_s=0.5,
    )
    tenant = f"oe-{uuid.uuid4().hex[:6]}"
    responses, evaluations = client.tail(RESPONSES), client.tail(EVALUATIONS)
    try:
        ids = {
            client.send(f"SCRIPT:clean How do partitions keep order? {i}", tenant=tenant,
                        model="scripted")
            for i in range(4)
        }  # fmt: skip
        answers = client.responses(responses, ids, 120)
        assert set(answers) == ids and all(a.error is None for a in answers.values()), answers
        # This pipeline flags, never replaces (KLLM_ANSWER_POLICY=flag): scored, as given.
        assert all(a.answer_mode == "generated" for a in answers.values())
        assert all(a.groundedness is not None for a in answers.values())
        scored = {k: decode(v, Evaluation) for k, v in collect(evaluations, ids, 60).items()}
    finally:
        responses.close()
        evaluations.close()
    assert set(scored) == ids, f"not evaluated: {ids - set(scored)}"
    for e in scored.values():
        assert (e.tenant, e.model, e.source, e.error) == (tenant, "scripted", "primary", None)
        assert e.claims >= 1 and e.groundedness is not None and 0.0 <= e.groundedness <= 1.0
        assert e.relevance is not None and e.completion_tokens > 0, e

    def drift_read_them() -> bool:
        rows = consumer_lag(client.bootstrap, {DRIFT_GROUP.name: [EVALUATIONS.name]})
        return any(r.committed for r in rows) and all(r.lag == 0 for r in rows)

    wait_until(drift_read_them, 60, "the drift stage to commit past the evaluations", 1.0)

    data: dict[str, Any] = {}

    def on_the_dashboard() -> bool:
        data.update(httpx.get(f"{base}/dashboard/data", timeout=10).json())
        # One row per tenant, model, template variant (the A/B split) and source.
        return sum(q["evaluated"] for q in data["quality"] if q["tenant"] == tenant) >= 4

    wait_until(on_the_dashboard, 30, lambda: f"the tenant's quality row: {data['quality']}", 1.0)
    rows = [q for q in data["quality"] if q["tenant"] == tenant]
    assert all(q["model"] == "scripted" and q["groundedness_p50"] is not None for q in rows), rows
