"""Pure, typed logic of each stage. No Kafka here: a stage's service feeds
decoded messages in and publishes the :class:`Emit` values that come out."""

from processors.base import Emit, Rejected

__all__ = ["Emit", "Rejected"]
