"""`kllm replay`: retained inference jobs through a shadow candidate, in process.

Jobs are read in slices off the event loop (the Kafka reader blocks), answered with at
most ``capacity`` in flight (the candidate's slots), and each answer is published to
llm.generations.shadow; the replay ends when the broker has acknowledged them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

from kllm.runtime.delivery import Acks
from kllm.runtime.kafka import make_producer
from processors.shadow import Shadow
from schemas import Generation, InferenceJob
from services.shadow import answer_or_skip

ACK_TIMEOUT_S = 60.0


@dataclass
class Replayed:
    read: int = 0
    answered: int = 0
    failed: int = 0
    """Answers with an engine error (published too: errors are part of the comparison)."""
    skipped: int = 0
    """Jobs the candidate could not take (logged with their request id)."""


def _take(jobs: Iterator[InferenceJob], n: int) -> list[InferenceJob]:
    return list(islice(jobs, n))


async def replay(
    jobs: Iterator[InferenceJob],
    shadow: Shadow,
    bootstrap: str,
    capacity: int,
    limit: int | None = None,
    on_done: Callable[[int], None] | None = None,
) -> Replayed:
    """Answer every job of ``jobs`` (at most ``limit``) with ``shadow``; see the module."""
    acks = Acks(make_producer(bootstrap))
    result = Replayed()
    slots = asyncio.Semaphore(max(1, capacity))

    async def one(job: InferenceJob) -> None:
        async with slots:
            emits = await answer_or_skip(shadow, job, f"replay of {job.request.request_id}")
        if emits is None:
            result.skipped += 1
        for emit in emits or []:
            acks.produce(emit)
            acks.poll()  # delivery reports as they come: a long replay never fills the queue
            if isinstance(emit.message, Generation):
                result.answered += 1
                result.failed += emit.message.error is not None
        if on_done:
            on_done(1)

    left = limit
    while left is None or left > 0:
        size = capacity * 4 if left is None else min(capacity * 4, left)
        batch = await asyncio.to_thread(_take, jobs, size)
        if not batch:
            break
        result.read += len(batch)
        left = None if left is None else left - len(batch)
        await asyncio.gather(*(one(j) for j in batch))
    await asyncio.to_thread(acks.wait, ACK_TIMEOUT_S)
    return result
