"""Per-record results for batch processors, and the split that isolates a failing record.

A batch processor answers each record on its own: its outputs, or :class:`Failed` (this
record is dead-lettered, its caller answered; or, ``retry``, a dependency is down and
the record is read again later). It may handle only the first records of a batch (a
time budget): the rest are read again, uncommitted.

:func:`isolate` runs one call over a batch (one embedding call for every text) and,
when the call raises, runs it again on each half, down to single records: the records
that still fail are the ones that fail, and the others get their results. When the
dependency fails every record it is given (two in a row, or all of them), it is down:
those records, and the ones after them, are given back to be tried later instead of
being dead-lettered one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kllm.core.errors import PipelineError
from processors.base import Emit

T = TypeVar("T")
R = TypeVar("R")

DOWN_AFTER = 2
"""Single records failing in a row, with no success in between, that mean the
dependency is down rather than refusing those records."""


@dataclass(frozen=True)
class Failed:
    """A record its processor could not handle. ``code`` is the caller's error code
    (a Rejected error's own code wins); ``retry``: not the record's fault (a dependency
    is down), so it is read again later rather than dead-lettered now."""

    error: PipelineError
    code: str = "internal_error"
    retry: bool = False


Result = list[Emit] | Failed
"""What one record produced."""


def isolate(
    items: Sequence[T],
    call: Callable[[Sequence[T]], list[R]],
    code: str = "internal_error",
) -> list[R | Failed]:
    """``call(items)``, one result per item. If it raises a PipelineError, the halves are
    called on their own, recursively, so each failing item gets its own ``Failed`` and
    the others their results. Stops early when the dependency looks down (see
    DOWN_AFTER): the failed items are marked ``retry`` and the untried ones are left
    out, so the list is shorter than ``items``. ``call`` may also return fewer results
    than items (a time budget): the split stops there."""
    out: list[R | Failed] = []
    state = _Split()

    def run(part: Sequence[T]) -> bool:
        """True when every item of ``part`` has a result and the split may go on."""
        try:
            results = call(part)
        except PipelineError as exc:
            if len(part) == 1:
                out.append(Failed(exc, code))
                state.failed_in_a_row += 1
                return state.failed_in_a_row < DOWN_AFTER
            mid = len(part) // 2
            return run(part[:mid]) and run(part[mid:])
        out.extend(results)
        if results:
            state.succeeded = True
            state.failed_in_a_row = 0
        return len(results) == len(part)

    run(items)
    return _mark_down(out, state.succeeded)


def each(
    items: Sequence[T], call: Callable[[T], R], code: str = "internal_error"
) -> list[R | Failed]:
    """``call`` on each item in turn (a search per question), each failure its item's
    own, until the dependency looks down (DOWN_AFTER failures in a row, or every item
    failed): those failures are marked ``retry`` and the rest are left out."""
    out: list[R | Failed] = []
    succeeded, in_a_row = False, 0
    for item in items:
        try:
            out.append(call(item))
        except PipelineError as exc:
            out.append(Failed(exc, code))
            in_a_row += 1
            if in_a_row >= DOWN_AFTER:
                break
            continue
        succeeded, in_a_row = True, 0
    return _mark_down(out, succeeded)


def tried(results: Sequence[Result | None]) -> list[Result]:
    """The results up to the first record not tried (its dependency is down): that one
    and the rest are read again."""
    done: list[Result] = []
    for result in results:
        if result is None:
            break
        done.append(result)
    return done


def _mark_down(out: list[R | Failed], succeeded: bool) -> list[R | Failed]:
    trailing = _trailing_failures(out)
    if trailing >= DOWN_AFTER or (not succeeded and trailing):
        # Down: the failures at the end are the dependency's, not their records'.
        for i in range(len(out) - trailing, len(out)):
            failed = out[i]
            assert isinstance(failed, Failed)
            out[i] = Failed(failed.error, failed.code, retry=True)
    return out


@dataclass
class _Split:
    succeeded: bool = False
    failed_in_a_row: int = 0


def _trailing_failures(results: Sequence[object]) -> int:
    n = 0
    for r in reversed(results):
        if not isinstance(r, Failed):
            break
        n += 1
    return n
