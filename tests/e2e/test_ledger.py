"""The ledgers' readers against a real broker: the tail on the first read, then what is
new, on demand (paused between reads) and following (a thread reads on)."""

from __future__ import annotations

import uuid

import pytest

from kllm.ops.broker import EmbeddedBroker
from kllm.runtime import ledger
from kllm.runtime.kafka import make_producer
from schemas import peek_request_id
from tests.e2e.conftest import wait_until
from topics import ANSWER_LEDGER_GROUP, RESPONSES


def _publish(bootstrap: str, ids: list[str]) -> None:
    producer = make_producer(bootstrap)
    for rid in ids:
        producer.produce(RESPONSES.name, key=rid, value=b'{"request_id": "%s"}' % rid.encode())
    assert producer.flush(30) == 0


@pytest.mark.parametrize("follow", [False, True])
def test_a_reader_gets_the_tail_at_once_then_every_new_record(
    broker: EmbeddedBroker, follow: bool
) -> None:
    run = uuid.uuid4().hex[:8]
    old = [f"old-{run}-{i}" for i in range(50)]
    _publish(broker.bootstrap, old)
    reader = ledger.KafkaPublishedLog(
        broker.bootstrap, [RESPONSES], peek_request_id, group=ANSWER_LEDGER_GROUP, follow=follow
    )
    try:
        # The first read catches up to the watermark before it returns: no record the
        # broker had is missed for a fetch not yet come back.
        assert set(old) <= set(reader.read_new())
        new = [f"new-{run}-{i}" for i in range(20)]
        _publish(broker.bootstrap, new)
        got: set[str] = set()

        def all_new() -> bool:
            got.update(reader.read_new())
            return set(new) <= got

        wait_until(all_new, 30, lambda: f"{len(set(new) - got)} of {len(new)} new records")
        assert not set(old) & got  # nothing read twice
    finally:
        reader.close()


def test_the_answer_ledger_knows_answers_published_by_others(broker: EmbeddedBroker) -> None:
    rid = f"peer-{uuid.uuid4().hex[:8]}"
    book = ledger.for_answers(broker.bootstrap)
    try:
        assert not book.already_answered(rid)
        _publish(broker.bootstrap, [rid])
        book.refresh_s = 0.0
        wait_until(lambda: book.already_answered(rid), 30, "the peer's answer")
    finally:
        book.source.close()  # type: ignore[attr-defined]
