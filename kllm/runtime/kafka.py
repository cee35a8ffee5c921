"""confluent-kafka clients: topic admin, producer, and a reader that waits for replies."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kllm.core.errors import BrokerError
from kllm.core.refs import readable_key
from kllm.runtime.delivery import Acks
from topics import TAIL_GROUP, TopicSpec

log = logging.getLogger(__name__)


class ConfluentTopicAdmin:
    """:class:`topics.TopicAdmin` over confluent-kafka's AdminClient."""

    def __init__(self, bootstrap: str, timeout_s: float = 15.0) -> None:
        self._admin = AdminClient({"bootstrap.servers": bootstrap})
        self._timeout = timeout_s

    def existing_partitions(self) -> Mapping[str, int]:
        try:
            meta = self._admin.list_topics(timeout=self._timeout)
        except KafkaException as exc:
            raise BrokerError(f"cannot list topics: {exc}") from exc
        return {name: len(t.partitions) for name, t in meta.topics.items()}

    def create(self, specs: Iterable[TopicSpec]) -> None:
        new = [
            NewTopic(s.name, num_partitions=s.partitions, replication_factor=-1, config=s.configs)
            for s in specs
        ]
        for name, future in self._admin.create_topics(new, request_timeout=self._timeout).items():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args and exc.args[0].name() == "TOPIC_ALREADY_EXISTS":
                    continue  # a concurrent provisioner won the race: fine
                raise BrokerError(f"cannot create topic {name}: {exc}") from exc


def records_only(msgs: Sequence[Message]) -> list[Message]:
    """The records among what consume() returned; error events are logged, not returned."""
    out = []
    for msg in msgs:
        err = msg.error()
        if err is None:
            out.append(msg)
        elif err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error", extra={"error": str(err)})
    return out


def make_consumer(
    bootstrap: str, group: str, extra: Mapping[str, str | int | bool] | None = None
) -> Consumer:
    """A group consumer that never commits on its own: callers commit after their output."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "range",
            **(extra or {}),
        }
    )


def make_producer(bootstrap: str, extra: Mapping[str, str | int | bool] | None = None) -> Producer:
    # murmur2, as quixstreams and the Java client partition: a key lands in the same
    # partition whichever stage produced it, so topics keyed alike are co-partitioned
    # (the feedback join depends on it). librdkafka's default would be CRC32.
    return Producer(
        {"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", **(extra or {})}
    )


def produce_sync(producer: Producer, topic: str, key: str | None, value: bytes) -> None:
    """Produce one record and wait for the broker's acknowledgement."""
    acks = Acks(producer)
    acks.produce_bytes(topic, key, value)
    acks.wait(15.0)


def end_offsets(consumer: Consumer, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic`` at its current end, to assign a group-less reader."""
    try:
        meta = consumer.list_topics(topic, timeout=10.0)
    except KafkaException as exc:
        raise BrokerError(f"cannot read metadata of {topic}: {exc}") from exc
    partitions = meta.topics[topic].partitions
    if not partitions:
        raise BrokerError(f"topic {topic} does not exist; run `kllm provision`")
    # Start at each partition's current end. (Tansu reports an end that can
    # lie inside the last batch: older records replay, none are skipped.)
    starts = []
    for p in partitions:
        try:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10.0)
        except KafkaException as exc:
            raise BrokerError(f"cannot read the end offset of {topic}[{p}]: {exc}") from exc
        starts.append(TopicPartition(topic, p, high))
    return starts


class TailReader:
    """Reads a topic from its current end, without a consumer group.

    Open it *before* publishing the requests whose replies it waits for, so no
    reply can slip in between. No group means no join delay and no offsets to
    commit: replies are matched by key, and replays of older records are ignored.
    """

    def __init__(self, bootstrap: str, topic: str, extra: Mapping[str, str | int | bool]) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": TAIL_GROUP,  # required by librdkafka; never used to commit
                "enable.auto.commit": False,
                **{k: v for k, v in extra.items() if k == "fetch.wait.max.ms"},
            }
        )
        self._consumer.assign(end_offsets(self._consumer, topic))

    def records(self, timeout_s: float) -> Iterator[tuple[str | None, bytes]]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            msg = self._consumer.poll(min(left, 0.2))
            if msg is None or msg.error() is not None:
                continue
            yield readable_key(msg.key()) or None, msg.value() or b""

    def wait_for(
        self, keys: set[str], timeout_s: float, on_record: Callable[[str, bytes], None]
    ) -> set[str]:
        """Call ``on_record`` once per awaited key; return the keys still missing."""
        missing = set(keys)
        for key, value in self.records(timeout_s):
            if key in missing:
                missing.discard(key)
                on_record(key, value)
                if not missing:
                    break
        return missing

    def close(self) -> None:
        self._consumer.close()
