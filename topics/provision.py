"""Idempotent creation of the declared topics through a broker admin interface."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from topics.catalog import TopicSpec

log = logging.getLogger(__name__)


class TopicAdmin(Protocol):
    """What provisioning needs from a broker admin client."""

    def existing_partitions(self) -> Mapping[str, int]:
        """Topic name -> partition count for every topic on the broker."""
        ...

    def create(self, specs: Iterable[TopicSpec]) -> None:
        """Create the topics; must tolerate one that already exists."""
        ...


@dataclass
class ProvisionReport:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def provision(admin: TopicAdmin, specs: Iterable[TopicSpec]) -> ProvisionReport:
    """Create what is missing; report topics whose partition count differs.

    Partition counts are never changed here: adding partitions moves keys
    between partitions, which an operator must decide on.
    """
    report = ProvisionReport()
    present = admin.existing_partitions()
    missing = []
    for spec in specs:
        have = present.get(spec.name)
        if have is None:
            missing.append(spec)
        elif have != spec.partitions:
            report.mismatched.append(f"{spec.name}: {have} partitions, declared {spec.partitions}")
        else:
            report.existing.append(spec.name)
    if missing:
        admin.create(missing)
        report.created.extend(s.name for s in missing)
    for line in report.mismatched:
        log.warning("topic partition count differs from declaration: %s", line)
    return report
