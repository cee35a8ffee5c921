"""Every topic, declared once: name, partitions, key, schema, configs and its DLQ.

Nothing outside this package spells a topic name; code refers to these specs.
"""

from topics.catalog import (
    ALL,
    DOCUMENTS,
    DOCUMENTS_INDEXED,
    DRIFT_ALERTS,
    FEEDBACK,
    FEEDBACK_ENRICHED,
    GENERATIONS,
    INFERENCE,
    MODERATED_TOKENS,
    MODERATION_EVENTS,
    REQUESTS,
    RESPONSES,
    RETRIEVAL,
    TOKENS,
    TopicSpec,
    by_name,
    declared,
    inference_topic,
)
from topics.provision import ProvisionReport, TopicAdmin, provision

__all__ = [
    "ALL",
    "DOCUMENTS",
    "DOCUMENTS_INDEXED",
    "DRIFT_ALERTS",
    "FEEDBACK",
    "FEEDBACK_ENRICHED",
    "GENERATIONS",
    "INFERENCE",
    "MODERATED_TOKENS",
    "MODERATION_EVENTS",
    "REQUESTS",
    "RESPONSES",
    "RETRIEVAL",
    "TOKENS",
    "ProvisionReport",
    "TopicAdmin",
    "TopicSpec",
    "by_name",
    "declared",
    "inference_topic",
    "provision",
]
