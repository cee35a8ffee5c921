"""Poison records at every stage's input, published by a plain producer as any Kafka
client could: each is dead-lettered exactly once, no stage restarts, and valid traffic
before and after is answered. A replay of the same offsets adds no second DLQ record,
and no second answer."""

from __future__ import annotations

from collections import Counter

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from kllm.ops.supervisor import Supervisor
from kllm.testing.poison import SourceRef, answer_counts, dlq_counts, publish, shapes
from schemas import peek_request_id
from tests.e2e.conftest import Client, wait_until
from topics import (
    DOCUMENTS,
    FEEDBACK,
    GENERATIONS,
    INFERENCE,
    INGESTION_GROUP,
    REQUESTS,
    RESPONSES,
    RETRIEVAL,
    TopicSpec,
)

# Every topic a stage owns and dead-letters (the tokens topic has no DLQ: skipped there).
OWNED = [REQUESTS, RETRIEVAL, INFERENCE, GENERATIONS, FEEDBACK, DOCUMENTS]


def _publish(bootstrap: str, topics: list[TopicSpec]) -> set[SourceRef]:
    return publish(bootstrap, [(t, p) for t in topics for p in shapes(t)])


def _dlq_counts(bootstrap: str, topics: list[TopicSpec]) -> Counter[SourceRef]:
    return dlq_counts(bootstrap, topics)


def _pids(pipeline: Supervisor) -> dict[str, int | None]:
    return {sp.name: sp.proc.pid if sp.proc else None for sp in pipeline.procs}


def test_poison_at_every_stage_input_is_dead_lettered_once(
    pipeline: Supervisor, client: Client
) -> None:
    answers = client.tail(RESPONSES)
    pids = _pids(pipeline)
    restarts = {sp.name: sp.restarts for sp in pipeline.procs}  # earlier tests kill stages
    try:
        before = client.send("Poison control: what is a partition?", max_tokens=8)
        assert client.responses(answers, {before}, 120)
        sent = _publish(client.bootstrap, OWNED)
        after = client.send("Poison control: what is retention?", max_tokens=8)
        counts: Counter[tuple[str, int, int]] = Counter()

        def all_lettered() -> bool:
            counts.clear()
            counts.update(_dlq_counts(client.bootstrap, OWNED))
            return sent <= counts.keys()

        wait_until(all_lettered, 180, lambda: f"{len(sent - counts.keys())} of {len(sent)}")
        controls = client.responses(answers, {before, after}, 120)
    finally:
        answers.close()
    twice = {ref: n for ref, n in counts.items() if ref in sent and n != 1}
    assert not twice, f"dead-lettered more than once: {twice}"
    assert controls.keys() == {before, after}
    assert all(r.error is None and r.text for r in controls.values())
    assert _pids(pipeline) == pids, "a stage restarted"
    assert {sp.name: sp.restarts for sp in pipeline.procs} == restarts


@pytest.mark.slow
def test_a_replay_of_dead_lettered_offsets_adds_no_dlq_record_nor_answer(
    pipeline: Supervisor, client: Client
) -> None:
    poison = shapes(REQUESTS)
    rids = {rid for _k, v, _h in poison if (rid := peek_request_id(v)) is not None}
    sent = publish(client.bootstrap, [(REQUESTS, p) for p in poison])
    wait_until(
        lambda: sent <= _dlq_counts(client.bootstrap, [REQUESTS]).keys(), 120, "dead letters"
    )

    def every_answer() -> Counter[str] | None:
        got = answer_counts(client.bootstrap)
        return got if rids <= got.keys() else None

    answered = wait_until(every_answer, 120, "the error answers")
    first = {(t, p): min(o for (t2, p2, o) in sent if (t2, p2) == (t, p)) for (t, p, _o) in sent}
    pipeline.kill("ingestion")  # and rewind its group to before the poison: a full replay
    admin = AdminClient({"bootstrap.servers": client.bootstrap})
    rewind = [TopicPartition(t, p, o) for (t, p), o in first.items()]

    def rewound() -> bool:
        futures = admin.alter_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(INGESTION_GROUP.name, rewind)]
        )
        try:
            next(iter(futures.values())).result(10)
        except Exception:  # noqa: BLE001 - the group is not empty until its session ends
            return False
        return True

    wait_until(rewound, 60, "the ingestion group to empty and take the rewind", every_s=1.0)
    wait_until(pipeline.restart_crashed, 60, "ingestion to be started again")
    pipeline.wait_ready(120)
    answers = client.tail(RESPONSES)
    try:
        probe = client.send("Replay control: what is a consumer group?", max_tokens=8)
        assert client.responses(answers, {probe}, 120), "ingestion did not get past the replay"
    finally:
        answers.close()
    counts = _dlq_counts(client.bootstrap, [REQUESTS])
    assert {ref: counts[ref] for ref in sent if counts[ref] != 1} == {}
    again = answer_counts(client.bootstrap)
    assert {rid: (answered[rid], again[rid]) for rid in rids if again[rid] != answered[rid]} == {}
