"""ingestor.offsets: done-watermarks advance only over fully done chunks, from the oldest."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor.offsets import Chunk, OffsetTracker, TopicPartition

TP = TopicPartition("meter-events", 0)
OTHER = TopicPartition("meter-events", 1)


def tracker(*tps: TopicPartition) -> OffsetTracker:
    t = OffsetTracker()
    for tp in tps or (TP,):
        t.assign(tp)
    return t


def test_nothing_committable_before_anything_is_done() -> None:
    t = tracker()
    t.open(TP, 0, 10, 10)
    assert t.committable() == {}
    assert t.pending == 10
    assert t.in_flight(TP) == 10
    assert t.committed(TP) is None


def test_in_order_completion() -> None:
    t = tracker()
    chunk = t.open(TP, 0, 10, 10)
    t.complete(chunk, 4)
    assert t.committable() == {}
    assert (t.pending, t.in_flight(TP), chunk.pending) == (6, 6, 6)
    t.complete(chunk, 6)
    assert t.committable() == {TP: 10}
    assert t.pending == 0


def test_watermark_waits_for_the_oldest_chunk() -> None:
    t = tracker()
    a, b, c = t.open(TP, 0, 10, 10), t.open(TP, 10, 20, 10), t.open(TP, 20, 25, 5)
    t.complete(b, 10)
    t.complete(c, 5)
    assert t.committable() == {}
    t.complete(a, 9)
    assert t.committable() == {}
    t.complete(a, 1)
    assert t.committable() == {TP: 25}
    assert t.in_flight(TP) == 0


def test_watermark_stops_at_the_first_unfinished_chunk() -> None:
    t = tracker()
    a, b, c = t.open(TP, 0, 10, 10), t.open(TP, 10, 20, 10), t.open(TP, 20, 30, 10)
    t.complete(a, 10)
    t.complete(c, 10)
    assert t.committable() == {TP: 10}
    t.complete(b, 10)
    assert t.committable() == {TP: 30}


def test_gaps_between_and_within_chunks() -> None:
    """Compacted topics and transaction markers leave offsets without records."""
    t = tracker()
    a = t.open(TP, 100, 110, 3)
    b = t.open(TP, 150, 152, 2)
    t.complete(a, 3)
    assert t.committable() == {TP: 110}
    t.complete(b, 2)
    assert t.committable() == {TP: 152}


def test_empty_chunk_is_done_at_once_but_waits_its_turn() -> None:
    t = tracker()
    empty = t.open(TP, 0, 5, 0)
    assert empty.pending == 0
    assert t.committable() == {TP: 5}
    a = t.open(TP, 5, 10, 5)
    t.open(TP, 10, 12, 0)
    assert t.committable() == {TP: 5}
    t.complete(a, 5)
    assert t.committable() == {TP: 12}


def test_overlapping_chunk_is_refused() -> None:
    t = tracker()
    t.open(TP, 0, 10, 10)
    with pytest.raises(ValueError, match="overlaps"):
        t.open(TP, 9, 12, 3)
    t.open(TP, 10, 12, 2)


@pytest.mark.parametrize("count", [11, -1])
def test_completing_more_than_pending_or_negative_raises(count: int) -> None:
    t = tracker()
    chunk = t.open(TP, 0, 10, 10)
    with pytest.raises(ValueError, match="pending"):
        t.complete(chunk, count)
    assert (t.pending, chunk.pending) == (10, 10)


def test_over_completion_after_done_raises() -> None:
    t = tracker()
    chunk = t.open(TP, 0, 2, 2)
    t.complete(chunk, 2)
    with pytest.raises(ValueError, match="pending"):
        t.complete(chunk, 1)
    t.complete(chunk, 0)
    assert t.committable() == {TP: 2}


def test_partitions_are_independent() -> None:
    t = tracker(TP, OTHER)
    a, b = t.open(TP, 0, 10, 10), t.open(OTHER, 500, 510, 10)
    t.complete(b, 10)
    assert t.committable() == {OTHER: 510}
    assert t.pending == 10
    t.complete(a, 10)
    assert t.committable() == {TP: 10, OTHER: 510}
    assert sorted(t.assigned()) == [TP, OTHER]


def test_mark_committed_hides_until_the_watermark_moves() -> None:
    t = tracker()
    a, b = t.open(TP, 0, 10, 10), t.open(TP, 10, 20, 10)
    t.complete(a, 10)
    offsets = t.committable()
    t.mark_committed(offsets)
    assert t.committed(TP) == 10
    assert t.committable() == {}
    t.complete(b, 10)
    assert t.committable() == {TP: 20}
    t.mark_committed({TP: 20, OTHER: 7})  # a partition not assigned is ignored
    assert t.committable() == {}
    assert t.committed(OTHER) is None


def test_late_commit_of_an_older_offset_leaves_the_newer_committable() -> None:
    t = tracker()
    a, b = t.open(TP, 0, 10, 10), t.open(TP, 10, 20, 10)
    t.complete(a, 10)
    snapshot = t.committable()
    t.complete(b, 10)
    t.mark_committed(snapshot)  # the commit of 10 returns after 20 became done
    assert t.committable() == {TP: 20}


def test_revoke_releases_chunks_and_their_pending_count() -> None:
    t = tracker(TP, OTHER)
    a, b = t.open(TP, 0, 10, 10), t.open(TP, 10, 20, 10)
    c = t.open(OTHER, 0, 5, 5)
    t.complete(a, 3)
    t.revoke(TP)
    assert a.released
    assert b.released
    assert not c.released
    assert t.pending == 5
    assert t.assigned() == [OTHER]
    assert t.in_flight(TP) == 0
    t.complete(a, 7)  # in-flight batches finishing late move nothing
    t.complete(b, 10)
    assert t.pending == 5
    assert t.committable() == {}
    assert t.committed(TP) is None
    t.revoke(TP)  # twice is harmless
    with pytest.raises(ValueError, match="pending"):
        t.complete(b, 1)


def test_reassignment_starts_fresh() -> None:
    t = tracker()
    old = t.open(TP, 0, 10, 10)
    t.complete(old, 10)
    t.mark_committed(t.committable())
    t.revoke(TP)
    t.assign(TP)
    assert t.committed(TP) is None
    assert t.committable() == {}
    new = t.open(TP, 10, 15, 5)
    t.complete(new, 5)
    assert t.committable() == {TP: 15}


def test_assign_twice_keeps_progress() -> None:
    t = tracker()
    chunk = t.open(TP, 0, 10, 10)
    t.assign(TP)
    t.complete(chunk, 10)
    assert t.committable() == {TP: 10}


def test_chunk_of_an_unassigned_partition_is_released() -> None:
    t = tracker()
    chunk = t.open(OTHER, 0, 10, 10)
    assert chunk.released
    assert t.pending == 0
    assert t.in_flight(OTHER) == 0
    t.complete(chunk, 10)
    assert t.committable() == {}
    assert t.pending == 0


@st.composite
def chunk_layouts(draw: st.DrawFn) -> list[tuple[int, int, int]]:
    """(start, end, count) of consecutive chunks, with gaps between and within them."""
    layout, offset = [], draw(st.integers(0, 1000))
    for _ in range(draw(st.integers(1, 8))):
        offset += draw(st.integers(0, 3))
        count = draw(st.integers(0, 6))
        end = offset + count + draw(st.integers(0 if count else 1, 3))
        layout.append((offset, end, count))
        offset = end
    return layout


@settings(max_examples=200, deadline=None)
@given(chunk_layouts(), st.data())
def test_any_interleaving_commits_the_longest_done_prefix(
    layout: list[tuple[int, int, int]], data: st.DataObject
) -> None:
    t = tracker(TP, OTHER)
    noise = t.open(OTHER, 0, 3, 3)
    chunks: list[Chunk] = [t.open(TP, start, end, count) for start, end, count in layout]
    committed: int | None = None

    def check() -> None:
        done_prefix = None
        for chunk, (_, end, _) in zip(chunks, layout, strict=True):
            if chunk.pending:
                break
            done_prefix = end
        expected = {} if done_prefix is None or done_prefix == committed else {TP: done_prefix}
        assert {tp: o for tp, o in t.committable().items() if tp == TP} == expected
        assert t.in_flight(TP) == sum(c.pending for c in chunks)
        assert t.pending == t.in_flight(TP) + noise.pending

    check()
    while any(c.pending for c in chunks):
        chunk = data.draw(st.sampled_from([c for c in chunks if c.pending]))
        t.complete(chunk, data.draw(st.integers(1, chunk.pending)))
        if data.draw(st.booleans()):
            offsets = t.committable()
            t.mark_committed(offsets)
            committed = offsets.get(TP, committed)
        check()
    assert t.committable().get(TP, committed) == layout[-1][1]
