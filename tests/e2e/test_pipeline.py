"""The whole path through real processes: broker, ingestion, retrieval, inference, moderation."""

from __future__ import annotations

import orjson
import pytest

from kllm.ops.supervisor import STAGES, Supervisor
from schemas import Request, encode
from tests.e2e.conftest import Client
from topics import REQUESTS, RESPONSES


def test_twenty_requests_get_twenty_answers(pipeline: Supervisor, client: Client) -> None:
    reader = client.tail(RESPONSES)
    try:
        ids = {
            client.send(f"Question {i}: what does the {s} stage do?", max_tokens=16)
            for i, s in enumerate(STAGES * 5)
        }
        got = client.responses(reader, ids, timeout_s=240)
    finally:
        reader.close()
    assert set(got) == ids
    for rid, resp in got.items():
        assert resp.request_id == rid
        assert resp.error is None, resp.error
        assert resp.text.strip(), f"empty answer for {rid}"
        assert resp.verdict in {"allowed", "blocked"}
        assert 0 < resp.usage.completion_tokens <= 16
    # The seed corpus is about this project: most questions retrieve some of it.
    assert sum(1 for r in got.values() if r.citations) >= 15


def test_bad_input_lands_in_the_dlq_with_a_reason(pipeline: Supervisor, client: Client) -> None:
    dlq = client.tail(REQUESTS.dlq)
    responses = client.tail(RESPONSES)
    try:
        client.send_raw("malformed-1", b"{this is not json")
        future = {"schema": Request.SCHEMA, "v": 99, "request_id": "future-1", "prompt": "hi"}
        client.send_raw("tenant-x", orjson.dumps(future))
        missing = Request(request_id="missing-1", prompt="x").model_dump(mode="json")
        del missing["messages"]  # neither a v2 conversation nor a v1 prompt
        client.send_raw("tenant-x", orjson.dumps({"schema": Request.SCHEMA, "v": 2, **missing}))
        letters = client.dead_letters(dlq, {"malformed-1", "future-1", "missing-1"}, 60)
        errors = client.responses(responses, {"future-1", "missing-1"}, 30)
    finally:
        dlq.close()
        responses.close()
    assert "not valid JSON" in letters["malformed-1"].reason
    assert letters["malformed-1"].request_id is None
    assert "unknown schema version 99" in letters["future-1"].reason
    assert "missing field 'messages'" in letters["missing-1"].reason
    for letter in letters.values():
        assert letter.stage == "ingestion"
        assert letter.source_topic == REQUESTS.name
    # A caller whose request id was readable is told why, instead of waiting forever.
    assert errors["future-1"].finish_reason == "error"
    assert "unknown schema version 99" in (errors["future-1"].error or "")


def test_valid_traffic_flows_around_bad_input(pipeline: Supervisor, client: Client) -> None:
    reader = client.tail(RESPONSES)
    try:
        good = client.send("What is the dead-letter queue for?", max_tokens=8)
        client.send_raw("tenant-y", b"[1, 2, 3]")
        good2 = client.send("What is the responses topic?", max_tokens=8)
        got = client.responses(reader, {good, good2}, 120)
    finally:
        reader.close()
    assert set(got) == {good, good2}


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_of_a_stage_loses_no_request(
    pipeline: Supervisor, client: Client, stage: str
) -> None:
    reader = client.tail(RESPONSES)
    try:
        ids = [
            client.send(f"Kill test {stage} {i}: how are offsets committed?", max_tokens=12)
            for i in range(8)
        ]
        first = client.responses(reader, set(ids[:1]), 120)
        assert first, "pipeline did not answer before the kill"
        pipeline.kill(stage)  # SIGKILL mid-run, records in flight
        assert pipeline.restart_crashed() == [f"{stage}-0"]
        pipeline.wait_ready(120)
        # The restarted process must also take new work, not only replays.
        ids += [
            client.send(f"After restart {stage}: what is a DLQ?", max_tokens=12) for _ in range(2)
        ]
        rest = client.responses(reader, set(ids) - set(first), 240)
    finally:
        reader.close()
    assert set(first) | set(rest) == set(ids), f"lost: {set(ids) - set(first) - set(rest)}"
    assert all(r.text.strip() for r in rest.values())


def test_encoded_request_is_what_ingestion_reads(client: Client) -> None:
    # Guards the wire format the e2e tests rely on: schema and version lead the object.
    body = orjson.loads(encode(Request(request_id="r", prompt="p")))
    assert (body["schema"], body["v"]) == (Request.SCHEMA, Request.VERSION)
