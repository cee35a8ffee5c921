"""Feedback through the real gateway, broker and join stage: joined with the request,
retrieval and answer it rates, PII-free; orphans marked and counted, not dropped."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from kllm.gateway.keys import KeyStore
from kllm.ops.supervisor import Supervisor
from schemas import DeadLetter, FeedbackEnriched, decode
from tests.e2e.conftest import Client, Replies, collect
from topics import FEEDBACK, FEEDBACK_ENRICHED

TIMEOUT = 120.0


class Api:
    def __init__(self, pipeline: Supervisor, tenant: str) -> None:
        self.url = f"http://127.0.0.1:{pipeline.env['KLLM_GATEWAY_PORT']}/v1"
        keys = KeyStore(Path(pipeline.env["KLLM_RUN_DIR"]) / "keys.json")
        self.headers = {"authorization": f"Bearer {keys.create(tenant, 'feedback test')[1]}"}

    def ask(self, question: str) -> str:
        body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": question}]}
        r = httpx.post(
            f"{self.url}/chat/completions", json=body, headers=self.headers, timeout=TIMEOUT
        )
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    def rate(self, request_id: str, rating: int, **extra: str) -> httpx.Response:
        body = {"request_id": request_id, "rating": rating, **extra}
        return httpx.post(f"{self.url}/feedback", json=body, headers=self.headers, timeout=30)


@pytest.fixture()
def enriched(client: Client) -> Iterator[Replies]:
    reader = client.tail(FEEDBACK_ENRICHED)
    yield reader
    reader.close()


def test_feedback_is_joined_with_what_it_rates_and_pii_free(
    pipeline: Supervisor, enriched: Replies
) -> None:
    api = Api(pipeline, "fb-tenant")
    rid = api.ask(f"My email is sam.doe@example.org. What is a DLQ? ({uuid.uuid4().hex[:6]})")
    r = api.rate(rid, 2, label="unhelpful", comment="Wrong. Call me at 212-555-0142.")
    assert r.status_code == 202 and r.json()["request_id"] == rid
    record = decode(collect(enriched, {rid}, 30)[rid], FeedbackEnriched)
    assert record.status == "joined" and record.tenant == "fb-tenant"
    assert record.rating == 2 and record.label == "unhelpful"
    assert record.prompt and "<EMAIL_ADDRESS>" in record.prompt
    assert record.answer and record.verdict in ("allowed", "redacted")
    assert record.model == "smollm2-135m" and record.template and record.policy
    assert record.chunk_ids and record.top_score is not None
    assert record.comment == "Wrong. Call me at <PHONE_NUMBER>."
    assert record.usage is not None and record.pipeline_ms
    raw = collect(enriched, {rid}, 1)[rid]
    assert b"sam.doe@example.org" not in raw and b"212-555-0142" not in raw


def test_orphan_feedback_is_marked_and_kept(pipeline: Supervisor, enriched: Replies) -> None:
    api = Api(pipeline, "fb-orphans")
    ids = [f"never-asked-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for rid in ids:
        assert api.rate(rid, 5).status_code == 202
    records = {k: decode(v, FeedbackEnriched) for k, v in collect(enriched, set(ids), 30).items()}
    assert records.keys() == set(ids)
    assert all(r.status == "orphan" and r.reason and r.prompt is None for r in records.values())


def test_feedback_on_another_tenants_answer_is_refused(
    pipeline: Supervisor, client: Client
) -> None:
    owner, other = Api(pipeline, "fb-owner"), Api(pipeline, "fb-other")
    rid = owner.ask(f"What is a partition? ({uuid.uuid4().hex[:6]})")
    dlq = client.tail(FEEDBACK.dlq)
    try:
        assert other.rate(rid, 1).status_code == 202  # the gateway cannot know; the join can
        letter = decode(collect(dlq, {rid}, 30)[rid], DeadLetter)
        assert "another tenant" in letter.reason
    finally:
        dlq.close()


def test_bad_feedback_is_refused_at_the_gateway(pipeline: Supervisor) -> None:
    api = Api(pipeline, "fb-bad")
    for body in (
        {"request_id": "x", "rating": 9},
        {"rating": 3},
        {"request_id": "x", "rating": 3, "extra": 1},
    ):
        r = httpx.post(f"{api.url}/feedback", json=body, headers=api.headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"], body
    r = httpx.post(f"{api.url}/feedback", json={"request_id": "x", "rating": 3}, timeout=30)
    assert r.status_code == 401


def test_export_dataset_writes_jsonl_and_parquet_that_read_back(
    pipeline: Supervisor, enriched: Replies, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    api = Api(pipeline, "fb-export")
    good = api.ask(f"What does the indexer do? ({uuid.uuid4().hex[:6]})")
    bad = api.ask(f"How are offsets committed? ({uuid.uuid4().hex[:6]})")
    api.rate(good, 3)
    api.rate(good, 5, label="great")  # the latest rating of a request wins
    api.rate(bad, 1)
    seen: list[tuple[str, int]] = []
    for key, value in enriched.reader.records(30):  # until all three are joined
        if key in (good, bad):
            seen.append((key, decode(value, FeedbackEnriched).rating))
        if len(seen) == 3:
            break
    assert sorted(seen) == sorted([(good, 3), (good, 5), (bad, 1)])
    env = os.environ | {"KLLM_BOOTSTRAP_SERVERS": pipeline.env["KLLM_BOOTSTRAP_SERVERS"]}
    for name, extra in (("all.jsonl", []), ("good.parquet", ["--min-rating", "4"])):
        out = tmp_path / name
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "kllm.cli",
                "export-dataset",
                str(out),
                "--tenant",
                "fb-export",
                "--since",
                "1h",
                *extra,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    rows = [orjson.loads(line) for line in (tmp_path / "all.jsonl").read_bytes().splitlines()]
    by_id = {r["metadata"]["request_id"]: r for r in rows}
    assert by_id.keys() == {good, bad}
    assert by_id[good]["rating"] == 5 and by_id[good]["label"] == "great"
    assert [m["role"] for m in by_id[good]["messages"]] == ["user", "assistant"]
    assert by_id[good]["messages"][1]["content"]
    table = pq.read_table(tmp_path / "good.parquet").to_pylist()
    assert [(r["request_id"], r["rating"], r["status"]) for r in table] == [(good, 5, "joined")]
    assert table[0]["prompt"] and table[0]["completion_tokens"] is not None
