"""The pipeline's topology, declared once: its processes, their consumer groups and
the topics each group reads.

Supervisor, lag, dashboard, `kllm scale`, the services and the deploy tests all
derive from this; nothing else spells a group name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from topics.catalog import (
    ALL,
    DOCUMENTS,
    EMBEDDING_REQUESTS,
    EVALUATIONS,
    FEEDBACK,
    FEEDBACK_ENRICHED,
    GENERATIONS,
    GENERATIONS_SHADOW,
    INFERENCE,
    REQUESTS,
    RESPONSES,
    RETRIEVAL,
    TOKENS,
    TopicSpec,
    inference_topic,
)

GROUP_PREFIX = "kllm-"


def group_id(name: str) -> str:
    """A consumer group name: every consumer of it shares the work."""
    return f"{GROUP_PREFIX}{name}"


_SHADOW_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
SHADOW_GROUP_PREFIX = group_id("shadow-")
"""A shadow candidate's group is this prefix and its name (`kllm shadow start --name`)."""


def stage_group(stage: str, pool: str = "") -> str:
    """The group of a stage's processes; an inference pool has a group of its own."""
    return group_id(f"{stage}-{pool}" if pool else stage)


@dataclass(frozen=True)
class ConsumerGroup:
    """One consumer group: the process it runs in and the topics it reads."""

    name: str
    stage: str
    inputs: tuple[TopicSpec, ...]
    pool: str = ""
    single_replica: str = ""
    """Why the group must keep one consumer; empty: it scales up to its partitions."""
    runs_if: str = ""
    """The setting that turns the group on; empty: it always runs in its stage."""

    @property
    def topic_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def max_replicas(self) -> int:
        """Consumers that can hold a partition: beyond it they sit idle."""
        return 1 if self.single_replica else min(t.partitions for t in self.inputs)


INGESTION_GROUP = ConsumerGroup(group_id("ingestion"), "ingestion", (REQUESTS,))
RETRIEVAL_GROUP = ConsumerGroup(group_id("retrieval"), "retrieval", (RETRIEVAL,))
INDEXER_GROUP = ConsumerGroup(group_id("indexer"), "retrieval", (DOCUMENTS,))
"""The document indexer, inside the retrieval process (embedded Qdrant has one opener)."""
EMBEDDING_GROUP = ConsumerGroup(group_id("embeddings"), "retrieval", (EMBEDDING_REQUESTS,))
"""Embedding requests, inside the retrieval process: it owns the embedding model."""
CACHE_GROUP = ConsumerGroup(group_id("cache"), "retrieval", (RESPONSES,), runs_if="KLLM_CACHE")
"""The cache filler, inside the retrieval process: answers coming back."""
MODERATION_GROUP = ConsumerGroup(group_id("moderation"), "moderation", (GENERATIONS, TOKENS))
FEEDBACK_GROUP = ConsumerGroup(
    group_id("feedback"), "feedback", (RETRIEVAL, INFERENCE, RESPONSES, FEEDBACK)
)
"""A join: its inputs are co-partitioned (same key, same partition count)."""
EVALUATION_GROUP = ConsumerGroup(
    group_id("evaluation"), "evaluation", (GENERATIONS, GENERATIONS_SHADOW)
)
"""A side reader of the generations: scores a sample of the answers online, and every
shadow answer."""
DRIFT_GROUP = ConsumerGroup(
    group_id("drift"),
    "drift",
    (RETRIEVAL, INFERENCE, RESPONSES, FEEDBACK_ENRICHED, EVALUATIONS),
    single_replica="every detector must see all of a tenant's events",
)


def changelog(group: ConsumerGroup, sources: tuple[TopicSpec, ...]) -> TopicSpec:
    """The changelog of a keyed-state store, named as quixstreams names it: the state of
    ``group`` over ``sources`` (one stream, or several merged). Compacted; one partition
    per input partition, so a partition's state moves with it to its next owner."""
    stream = "--".join(sorted(t.name for t in sources))
    return TopicSpec(
        f"changelog__{group.name}--{stream}--default",
        max(t.partitions for t in sources),
        "state key",
        None,
        retention_ms=-1,
        cleanup_policy="compact",
    )


CHANGELOGS: tuple[TopicSpec, ...] = (
    changelog(INGESTION_GROUP, (REQUESTS,)),  # quotas and the idempotency window
    changelog(MODERATION_GROUP, (TOKENS,)),  # each stream's window, buffer and tail
    changelog(FEEDBACK_GROUP, FEEDBACK_GROUP.inputs),  # pending joins
)
"""Every keyed-state changelog: provisioned with the topics (the stages never create
topics), and checked against the stages' own state stores by the tests."""


def declared(pools: Iterable[str] = ()) -> tuple[TopicSpec, ...]:
    """Every topic to provision: the catalog, each pool's job topic and its DLQ, and the
    keyed-state changelogs."""
    extra = [inference_topic(p) for p in dict.fromkeys(pools) if p]
    return ALL + tuple(extra) + tuple(t.dlq for t in extra) + CHANGELOGS


EXPORT_GROUP = group_id("export")
"""`kllm export`'s reader: it assigns partitions and never commits."""
DASHBOARD_GROUP = group_id("dashboard")
"""The dashboard's tail of every topic: it assigns partitions and never commits."""
REPLIES_GROUP = group_id("gateway-replies")
"""The gateway's reply readers: they assign every partition and never join or commit."""
TAIL_GROUP = group_id("tail-reader")
"""TailReader (CLI, tests): it assigns partitions from their end and never commits."""
DLQ_LEDGER_GROUP = group_id("dlq-ledger")
"""Each stage's reader of its DLQs (kllm.runtime.ledger): it assigns and never commits."""
ANSWER_LEDGER_GROUP = group_id("answer-ledger")
"""Each stage's reader of the answers already published (kllm.runtime.ledger): it
assigns and never commits."""
BENCH_IDLE_GROUP = group_id("bench-idle")
"""`make bench-broker`'s idle consumers: they join (one group each, suffixed) and never
commit; a benchmark's own broker only."""
READER_GROUPS = (
    EXPORT_GROUP,
    DASHBOARD_GROUP,
    REPLIES_GROUP,
    TAIL_GROUP,
    DLQ_LEDGER_GROUP,
    ANSWER_LEDGER_GROUP,
)
"""Group ids of the readers that assign partitions themselves: librdkafka requires one,
but none of them joins its group or commits, so none has lag."""


def shadow_group(name: str, pool: str = "") -> ConsumerGroup:
    """The group of a shadow candidate (`kllm shadow start`): a copy of a pool's
    inference jobs, read beside its workers. Not a stage of ``kllm up``."""
    if not _SHADOW_NAME.match(name):
        raise ValueError(f"a shadow name is 1-32 of a-z, 0-9, - and _, got {name!r}")
    return ConsumerGroup(f"{SHADOW_GROUP_PREFIX}{name}", "shadow", (inference_topic(pool),))


def inference_group(pool: str = "") -> ConsumerGroup:
    """The group of an inference pool's workers, reading that pool's job topic."""
    topic = inference_topic(pool)
    return ConsumerGroup(stage_group("inference", pool), "inference", (topic,), pool=pool)


STAGES: tuple[str, ...] = (
    "ingestion",
    "retrieval",
    "inference",
    "moderation",
    "feedback",
    "evaluation",
    "drift",
    "gateway",
)
"""Every kind of process the pipeline runs (`python -m services.<stage>`), in start order."""
GROUPLESS = frozenset({"gateway"})
"""Stages with no consumer group (the gateway reads replies from every partition)."""

_FIXED: dict[str, tuple[ConsumerGroup, ...]] = {
    "ingestion": (INGESTION_GROUP,),
    "retrieval": (RETRIEVAL_GROUP, INDEXER_GROUP, EMBEDDING_GROUP, CACHE_GROUP),
    "moderation": (MODERATION_GROUP,),
    "feedback": (FEEDBACK_GROUP,),
    "evaluation": (EVALUATION_GROUP,),
    "drift": (DRIFT_GROUP,),
    "gateway": (),
}


def stage_groups(stage: str, pool: str = "") -> tuple[ConsumerGroup, ...]:
    """The groups one process of ``stage`` joins (serving ``pool`` if inference); the
    first is the one the stage scales by."""
    if stage == "inference":
        return (inference_group(pool),)
    if stage not in _FIXED:
        raise KeyError(f"no stage {stage!r} (stages: {', '.join(STAGES)})")
    return _FIXED[stage]


def primary_group(stage: str, pool: str = "") -> ConsumerGroup:
    """The group ``stage`` scales by (its main input)."""
    found = stage_groups(stage, pool)
    if not found:
        raise KeyError(f"stage {stage!r} has no consumer group")
    return found[0]


def groups(pools: Iterable[str] = ()) -> tuple[ConsumerGroup, ...]:
    """Every consumer group the pipeline runs: each stage's, and one per inference pool."""
    fixed = tuple(g for s in STAGES for g in stage_groups(s))
    return fixed + tuple(inference_group(p) for p in dict.fromkeys(pools) if p)


def group_topics(pools: Iterable[str] = ()) -> dict[str, tuple[str, ...]]:
    """Group name -> the names of the topics it reads, for every group."""
    return {g.name: g.topic_names for g in groups(pools)}
