"""The retrieval stage's failure isolation and limits, through the real broker, the real
retrieval process, real embeddings and embedded Qdrant."""

from __future__ import annotations

import statistics
import time
import uuid

import pytest
from confluent_kafka import Producer

from kllm.ops.supervisor import Supervisor
from kllm.runtime.kafka import produce_sync
from schemas import DeadLetter, Document, InferenceJob, Request, decode, encode
from tests.e2e.conftest import Client, Replies, collect
from topics import DOCUMENTS, DOCUMENTS_INDEXED, INFERENCE, RESPONSES, RETRIEVAL


def _job_request(tenant: str, prompt: str, **kw: object) -> Request:
    """A request as ingestion hands it to retrieval (template assigned)."""
    fields: dict[str, object] = {"template": "rag@v2/a", "model": "scripted", "max_tokens": 8}
    fields.update(kw)
    return Request(request_id=f"t-{uuid.uuid4()}", tenant=tenant, prompt=prompt, **fields)  # type: ignore[arg-type]


def _publish_together(client: Client, requests: list[Request]) -> None:
    """Produced back to back and flushed once: the retrieval stage reads them in one poll."""
    for r in requests:
        client.producer.produce(RETRIEVAL.name, key=r.request_id, value=encode(r))
    assert client.producer.flush(15) == 0


def test_one_bad_request_in_a_batch_is_answered_alone(pipeline: Supervisor, client: Client) -> None:
    tenant = f"iso-{uuid.uuid4().hex[:6]}"
    restarts = pipeline.find("retrieval").restarts  # earlier tests kill stages
    good = [_job_request(tenant, f"What is the DLQ for? ({i})") for i in range(6)]
    # A template version this retrieval stage does not know (ingestion deployed first).
    bad = _job_request(tenant, "What is the DLQ for?", template="rag@v99/a")
    responses, letters, jobs = (
        client.tail(RESPONSES),
        client.tail(RETRIEVAL.dlq),
        client.tail(INFERENCE),
    )
    try:
        _publish_together(client, [*good[:3], bad, *good[3:]])
        ids = {r.request_id for r in good}
        got_jobs = collect(jobs, ids, 60)
        assert set(got_jobs) == ids, f"missing jobs: {ids - set(got_jobs)}"
        letter = decode(collect(letters, {bad.request_id}, 30)[bad.request_id], DeadLetter)
        assert "unknown version v99" in letter.reason
        answers = client.responses(responses, {*ids, bad.request_id}, 120)
        assert answers[bad.request_id].error_code == "internal_error"
        assert all(answers[i].error is None for i in ids), {i: answers[i].error for i in ids}
    finally:
        for r in (responses, letters, jobs):
            r.close()
    retrieval = pipeline.find("retrieval")
    assert retrieval.alive() and retrieval.restarts == restarts  # no crash, no crash loop


def _big_producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 8_000_000})


def _receipt(replies: Replies, key: str, timeout_s: float) -> None:
    assert key in collect(replies, {key}, timeout_s), f"no receipt for {key}"


@pytest.mark.slow
def test_a_2mb_unbroken_document_makes_jobs_under_1mb(pipeline: Supervisor, client: Client) -> None:
    tenant = f"big-{uuid.uuid4().hex[:6]}"
    doc = Document(tenant=tenant, doc_id="aaaa", text="a" * 2_000_000, version=1)
    key = f"{tenant}/aaaa"
    receipts, jobs = client.tail(DOCUMENTS_INDEXED), client.tail(INFERENCE)
    try:
        produce_sync(_big_producer(client.bootstrap), DOCUMENTS.name, key, encode(doc))
        _receipt(receipts, key, 180)
        req = _job_request(tenant, "a" * 40)
        _publish_together(client, [req])
        value = collect(jobs, {req.request_id}, 60)[req.request_id]
        job = decode(value, InferenceJob)
        assert job.context.chunks, "the document's chunks were not retrieved"
        print(f"\njob for the 2 MB unbroken document: {len(value)} bytes")
        assert len(value) < 1_000_000
    finally:
        receipts.close()
        jobs.close()


def _latencies(client: Client, jobs: Replies, tenant: str, n: int, every_s: float) -> list[float]:
    """Seconds from publishing each of ``n`` questions (one every ``every_s``) to its job
    on the inference topic."""
    sent: dict[str, float] = {}
    out: list[float] = []

    def read(for_s: float) -> None:
        deadline = time.monotonic() + for_s
        while sent and (left := deadline - time.monotonic()) > 0:
            for k, _v in jobs.reader.records(min(left, 0.05)):
                if k in sent:
                    out.append(time.monotonic() - sent.pop(k))

    for i in range(n):
        # A tenant of its own: no answer cached for a similar question (no job then).
        req = _job_request(f"{tenant}-{i}", f"How are documents chunked? ({i})")
        produce_sync(client.producer, RETRIEVAL.name, req.request_id, encode(req))
        sent[req.request_id] = time.monotonic()
        read(every_s)
    read(60)
    assert not sent, f"{len(sent)} of {n} questions got no job"
    return out


@pytest.mark.slow
def test_queries_are_served_while_a_large_document_indexes(
    pipeline: Supervisor, client: Client
) -> None:
    tenant = f"load-{uuid.uuid4().hex[:6]}"
    jobs, receipts = client.tail(INFERENCE), client.tail(DOCUMENTS_INDEXED)
    try:
        idle = _latencies(client, jobs, f"{tenant}-idle", 10, 0.3)
        words = [
            f"Sentence {i} of the handbook says that item {i} is kept in room {i}."
            for i in range(12_000)
        ]
        doc = Document(tenant=tenant, doc_id="handbook", text=" ".join(words), version=1)
        key = f"{tenant}/handbook"
        t0 = time.monotonic()
        produce_sync(_big_producer(client.bootstrap), DOCUMENTS.name, key, encode(doc))
        busy = _latencies(client, jobs, f"{tenant}-busy", 20, 0.3)
        indexing_ms = None
        if key in collect(receipts, {key}, 0.1):
            indexing_ms = None  # finished before the questions did: the measure is void
        else:
            _receipt(receipts, key, 300)
            indexing_ms = (time.monotonic() - t0) * 1000
        print(
            f"\nquestion -> job, idle: p50 {statistics.median(idle) * 1000:.0f} ms, "
            f"max {max(idle) * 1000:.0f} ms; while a {len(doc.text) // 1000} kB document "
            f"indexed ({indexing_ms and round(indexing_ms)} ms): "
            f"p50 {statistics.median(busy) * 1000:.0f} ms, max {max(busy) * 1000:.0f} ms"
        )
        assert indexing_ms is not None, "the document indexed before the questions ended"
        assert max(busy) < 5.0
    finally:
        jobs.close()
        receipts.close()
