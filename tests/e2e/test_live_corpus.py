"""The live corpus through the real broker, the real retrieval process and real embeddings."""

from __future__ import annotations

import time
import uuid

from kllm.ops.supervisor import Supervisor
from schemas import Document, DocumentIndexed, Response, decode, encode
from tests.e2e.conftest import Client, Replies, collect
from topics import DOCUMENTS, DOCUMENTS_INDEXED, RESPONSES


def publish(client: Client, doc: Document) -> str:
    key = f"{doc.tenant}/{doc.doc_id}"
    client.producer.produce(DOCUMENTS.name, key=key, value=encode(doc))
    client.producer.flush(10)
    return key


def receipt(replies: Replies, key: str, timeout_s: float = 60) -> DocumentIndexed:
    replies.seen.pop(key, None)  # a document's earlier receipt is not this one's
    got = collect(replies, {key}, timeout_s)
    assert key in got, f"no receipt for {key}"
    return decode(got[key], DocumentIndexed)


def ask(client: Client, tenant: str, prompt: str) -> Response:
    replies = client.tail(RESPONSES)
    try:
        rid = client.send(prompt, tenant=tenant, max_tokens=8)
        return client.responses(replies, {rid}, 120)[rid]
    finally:
        replies.close()


def cited(resp: Response) -> set[str]:
    return {c.doc_id for c in resp.citations}


def test_fresh_document_is_cited_within_seconds(pipeline: Supervisor, client: Client) -> None:
    tenant, doc_id = f"acme-{uuid.uuid4().hex[:6]}", "zorblax-manual"
    receipts = client.tail(DOCUMENTS_INDEXED)
    try:
        t0 = time.monotonic()
        key = publish(
            client,
            Document(
                tenant=tenant,
                doc_id=doc_id,
                version=1,
                text=(
                    "The Zorblax gateway listens on port 7431. Zorblax was written in 2019 by the "
                    "platform team. It forwards telemetry from factory sensors to the data lake."
                ),
            ),
        )
        r = receipt(receipts, key)
        resp = ask(client, tenant, "Which port does the Zorblax gateway listen on?")
        elapsed = time.monotonic() - t0
    finally:
        receipts.close()
    assert (r.op, r.version) == ("upsert", 1) and r.chunks >= 1
    assert doc_id in cited(resp), resp.citations
    assert elapsed < 30, f"cited {elapsed:.1f}s after publishing"


def test_a_tenant_never_sees_another_tenants_chunks(pipeline: Supervisor, client: Client) -> None:
    owner, other = f"globex-{uuid.uuid4().hex[:6]}", f"initech-{uuid.uuid4().hex[:6]}"
    receipts = client.tail(DOCUMENTS_INDEXED)
    try:
        key = publish(
            client,
            Document(
                tenant=owner,
                doc_id="merger",
                version=1,
                text=(
                    "Project Nightjar is the secret merger of Globex with Hooli, closing in March."
                ),
            ),
        )
        receipt(receipts, key)
    finally:
        receipts.close()
    question = "What is Project Nightjar, the secret merger?"
    assert "merger" in cited(ask(client, owner, question))
    assert "merger" not in cited(ask(client, other, question))


def test_update_replaces_delete_removes_stale_is_skipped(
    pipeline: Supervisor, client: Client
) -> None:
    tenant, doc_id = f"umbrella-{uuid.uuid4().hex[:6]}", "handbook"
    long_text = " ".join(
        f"Rule {i}: badge holders of wing {i} enter through gate {i}." for i in range(60)
    )
    receipts = client.tail(DOCUMENTS_INDEXED)
    try:
        v1 = receipt(
            receipts,
            publish(client, Document(tenant=tenant, doc_id=doc_id, version=1, text=long_text)),
        )
        v2 = receipt(
            receipts,
            publish(
                client,
                Document(
                    tenant=tenant, doc_id=doc_id, version=2, text="The cafeteria opens at 7 am."
                ),
            ),
        )
        stale = receipt(
            receipts,
            publish(client, Document(tenant=tenant, doc_id=doc_id, version=1, text=long_text)),
        )
        assert doc_id in cited(ask(client, tenant, "When does the cafeteria open?"))
        gone = receipt(
            receipts,
            publish(client, Document(tenant=tenant, doc_id=doc_id, version=3, op="delete")),
        )
        after = ask(client, tenant, "When does the cafeteria open?")
    finally:
        receipts.close()
    assert v1.chunks > 1 and v2.chunks == 1
    assert (stale.op, stale.version) == ("skipped", 1) and "newer" in stale.reason
    assert gone.op == "delete"
    assert doc_id not in cited(after)
