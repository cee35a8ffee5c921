"""kllm.runtime.offsets.OffsetTracker: never commit past a record still in flight."""

from __future__ import annotations

import random

import pytest

from kllm.runtime.offsets import OffsetTracker
from topics import INFERENCE

TP = (INFERENCE.name, 0)
TP1 = (INFERENCE.name, 1)


def _committable(tracker: OffsetTracker, tp: tuple[str, int] = TP) -> int | None:
    return tracker.to_commit(unchanged=True).get(tp)


def test_nothing_started_nothing_to_commit() -> None:
    tracker = OffsetTracker()
    assert tracker.to_commit() == {}
    assert tracker.to_commit(unchanged=True) == {}
    assert tracker.in_flight == 0


def test_out_of_order_finishes_never_pass_a_pending_offset() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.start(TP, offset)
    assert tracker.to_commit() == {TP: 10}
    tracker.finish(TP, 12)
    assert tracker.to_commit() == {TP: 10}
    tracker.finish(TP, 10)
    assert tracker.to_commit() == {TP: 11}
    tracker.finish(TP, 11)
    assert tracker.to_commit() == {TP: 13}
    assert tracker.in_flight == 0


def test_to_commit_reports_only_advances() -> None:
    tracker = OffsetTracker()
    tracker.start(TP, 10)
    tracker.start(TP, 11)
    assert tracker.to_commit() == {TP: 10}
    tracker.committed({TP: 10})
    assert tracker.to_commit() == {}
    assert tracker.to_commit(unchanged=True) == {TP: 10}
    tracker.finish(TP, 11)  # 10 still pending: no advance
    assert tracker.to_commit() == {}
    tracker.finish(TP, 10)
    assert tracker.to_commit() == {TP: 12}
    assert tracker.to_commit() == {TP: 12}  # still not recorded as committed
    tracker.committed({TP: 12})
    assert tracker.to_commit() == {}
    assert tracker.to_commit(unchanged=True) == {TP: 12}


def test_committed_ignores_unknown_partitions() -> None:
    tracker = OffsetTracker()
    tracker.start(TP, 0)
    tracker.committed({TP1: 5})
    assert tracker.to_commit() == {TP: 0}
    assert TP1 not in tracker.to_commit(unchanged=True)


def test_forget_drops_a_partition() -> None:
    tracker = OffsetTracker()
    tracker.start(TP, 1)
    tracker.start(TP1, 7)
    tracker.forget([TP])
    assert tracker.to_commit(unchanged=True) == {TP1: 7}
    assert tracker.in_flight == 1
    tracker.finish(TP, 1)  # a late finish of a revoked record is harmless
    assert tracker.to_commit(unchanged=True) == {TP1: 7}
    tracker.forget([TP, ("never", 9)])  # forgetting twice or the unknown is harmless
    tracker.start(TP, 40)  # reassigned later: starts afresh
    assert tracker.to_commit() == {TP: 40, TP1: 7}


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.start(TP, 5)
    tracker.start(TP1, 5)
    tracker.start(TP1, 6)
    tracker.finish(TP1, 5)
    tracker.finish(TP1, 6)
    assert tracker.to_commit() == {TP: 5, TP1: 7}
    tracker.committed({TP1: 7})
    tracker.finish(TP, 5)
    assert tracker.to_commit() == {TP: 6}


def test_in_flight_counts_across_partitions() -> None:
    tracker = OffsetTracker()
    tracker.start(TP, 1)
    tracker.start(TP, 2)
    tracker.start(TP1, 1)
    assert tracker.in_flight == 3
    tracker.finish(TP, 2)
    assert tracker.in_flight == 2
    tracker.finish(TP, 2)  # finishing twice does not go negative
    tracker.finish(TP1, 99)  # never started
    assert tracker.in_flight == 2


def test_starting_the_same_offset_twice_raises() -> None:
    tracker = OffsetTracker()
    tracker.start(TP, 3)
    with pytest.raises(ValueError, match="already in flight"):
        tracker.start(TP, 3)
    tracker.start(TP1, 3)  # another partition's offset 3 is another record
    assert tracker.in_flight == 2


def test_gaps_in_offsets() -> None:
    # Compaction and transaction markers leave gaps: the commit follows what was read.
    tracker = OffsetTracker()
    tracker.start(TP, 10)
    tracker.start(TP, 15)
    tracker.finish(TP, 10)
    assert _committable(tracker) == 15
    tracker.finish(TP, 15)
    assert _committable(tracker) == 16


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_interleavings_keep_the_invariant(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(250):  # 1000 interleavings over the four seeds
        tracker = OffsetTracker()
        tps = [TP, TP1]
        next_offset = {tp: rng.randrange(0, 100) for tp in tps}
        pending: dict[tuple[str, int], set[int]] = {tp: set() for tp in tps}
        finished: dict[tuple[str, int], set[int]] = {tp: set() for tp in tps}
        last: dict[tuple[str, int], int] = {}
        for _ in range(rng.randrange(1, 40)):
            tp = rng.choice(tps)
            action = rng.random()
            if action < 0.5 or not pending[tp]:
                offset = next_offset[tp]
                next_offset[tp] += rng.choice((1, 1, 1, 2))  # sometimes a gap
                tracker.start(tp, offset)
                pending[tp].add(offset)
            elif action < 0.9:
                offset = rng.choice(sorted(pending[tp]))
                tracker.finish(tp, offset)
                pending[tp].discard(offset)
                finished[tp].add(offset)
            else:
                tracker.committed(tracker.to_commit())
                assert tracker.to_commit() == {}
            assert tracker.in_flight == sum(len(p) for p in pending.values())
            for t in tps:
                c = _committable(tracker, t)
                started = pending[t] | finished[t]
                if not started:
                    assert c is None
                    continue
                assert c is not None
                assert all(c <= p for p in pending[t])
                assert all(o in finished[t] for o in started if o < c)
                assert c <= max(started) + 1
                assert c >= last.get(t, c)  # the commit never moves backwards
                last[t] = c
        # Everything done: the commit is one past the last offset read.
        for t in tps:
            for offset in sorted(pending[t]):
                tracker.finish(t, offset)
            started = finished[t] | pending[t]
            if started:
                assert _committable(tracker, t) == max(started) + 1
        assert tracker.in_flight == 0
