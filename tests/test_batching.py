"""ingestor.batching: batches of at most max_events events and about max_bytes bytes, in order."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor.batching import EVENT_OVERHEAD_BYTES, Batch, Batcher
from ingestor.offsets import Chunk, TopicPartition
from tests.corpus import FakeRecord

TP = TopicPartition("meter-events", 0)
OVERHEAD = EVENT_OVERHEAD_BYTES


class Poll:
    """One poll's chunk, records and events; events carry their record's offset as `n`."""

    def __init__(self, start: int, sizes: list[int], tp: TopicPartition = TP, timestamp: int = 1000) -> None:
        self.chunk = Chunk(tp, start, start + len(sizes), len(sizes))
        self.records = [
            FakeRecord(tp.topic, tp.partition, start + i, timestamp + i, None, b"x" * size, ())
            for i, size in enumerate(sizes)
        ]
        self.events: list[dict[str, Any]] = [{"n": r.offset} for r in self.records]

    def add_to(self, batcher: Batcher, now: float = 0.0) -> list[Batch]:
        return batcher.add(self.chunk, self.events, self.records, now)


def check_parts(batch: Batch) -> None:
    """`parts` are consecutive runs of the batch's records, each run inside its chunk."""
    assert sum(n for _, n in batch.parts) == len(batch.events) == len(batch.records)
    assert all(n > 0 for _, n in batch.parts)
    i = 0
    for chunk, n in batch.parts:
        for record in batch.records[i : i + n]:
            assert (record.topic, record.partition) == chunk.tp
            assert chunk.start <= record.offset < chunk.end
        i += n
    assert [e["n"] for e in batch.events] == [r.offset for r in batch.records]
    assert batch.nbytes == sum(len(r.value or b"") + OVERHEAD for r in batch.records)


def test_partial_batch_waits_for_flush() -> None:
    batcher = Batcher(100, 1_000_000)
    poll = Poll(0, [10] * 5)
    assert poll.add_to(batcher, now=5.0) == []
    assert batcher.buffered == 5
    batch = batcher.flush()
    assert batch is not None
    assert batch.events == poll.events
    assert batch.records == poll.records
    assert batch.parts == [(poll.chunk, 5)]
    assert batch.created == 5.0
    assert batch.nbytes == 5 * (10 + OVERHEAD)
    assert batcher.buffered == 0
    assert batcher.flush() is None


def test_full_batches_are_handed_out_at_once() -> None:
    batcher = Batcher(100, 10_000_000)
    poll = Poll(0, [10] * 250)
    ready = poll.add_to(batcher)
    assert [len(b) for b in ready] == [100, 100]
    assert batcher.buffered == 50
    rest = batcher.flush()
    assert rest is not None
    assert len(rest) == 50
    assert [e for b in [*ready, rest] for e in b.events] == poll.events
    for batch in [*ready, rest]:
        assert batch.parts == [(poll.chunk, len(batch))]
        check_parts(batch)


def test_polls_fill_one_batch_across_chunks() -> None:
    batcher = Batcher(10, 10_000_000)
    a, b, c = Poll(0, [1] * 4), Poll(4, [1] * 4), Poll(8, [1] * 4)
    assert a.add_to(batcher) == []
    assert b.add_to(batcher) == []
    [full] = c.add_to(batcher)
    assert full.parts == [(a.chunk, 4), (b.chunk, 4), (c.chunk, 2)]
    check_parts(full)
    rest = batcher.flush()
    assert rest is not None
    assert rest.parts == [(c.chunk, 2)]


def test_byte_cap() -> None:
    per_event = 1000 + OVERHEAD
    batcher = Batcher(100, 4 * per_event + 10)
    poll = Poll(0, [1000] * 10)
    ready = poll.add_to(batcher)
    assert [len(b) for b in ready] == [4, 4]
    assert all(b.nbytes <= batcher.max_bytes for b in ready)
    assert batcher.buffered == 2


def test_exactly_full_bytes_is_ready() -> None:
    batcher = Batcher(100, 3 * (100 + OVERHEAD))
    [batch] = Poll(0, [100] * 3).add_to(batcher)
    assert len(batch) == 3
    assert batcher.flush() is None


def test_oversized_event_goes_alone() -> None:
    batcher = Batcher(100, 1000)
    poll = Poll(0, [10, 10, 5000, 10])
    ready = poll.add_to(batcher)
    assert [[e["n"] for e in b.events] for b in ready] == [[0, 1], [2]]
    assert ready[1].nbytes == 5000 + OVERHEAD
    rest = batcher.flush()
    assert rest is not None
    assert [e["n"] for e in rest.events] == [3]


def test_oversized_event_into_an_empty_batch() -> None:
    batcher = Batcher(100, 1000)
    [alone] = Poll(0, [5000]).add_to(batcher)
    assert len(alone) == 1
    assert batcher.flush() is None


def test_linger() -> None:
    batcher = Batcher(100, 1_000_000)
    assert batcher.flush_due(100.0, 0.5) is None
    assert batcher.oldest_age(100.0) is None
    Poll(0, [1] * 3).add_to(batcher, now=10.0)
    Poll(3, [1] * 3).add_to(batcher, now=10.4)
    assert batcher.oldest_age(10.4) == pytest.approx(0.4)
    assert batcher.flush_due(10.49, 0.5) is None
    batch = batcher.flush_due(10.5, 0.5)
    assert batch is not None
    assert len(batch) == 6
    assert batcher.flush_due(99.0, 0.5) is None
    Poll(6, [1]).add_to(batcher, now=20.0)
    assert batcher.flush_due(20.1, 0.5) is None
    assert batcher.oldest_age(20.25) == 0.25


def test_batch_after_a_full_one_starts_its_own_clock() -> None:
    batcher = Batcher(3, 1_000_000)
    Poll(0, [1] * 2).add_to(batcher, now=1.0)
    [full] = Poll(2, [1] * 2).add_to(batcher, now=7.0)
    assert full.created == 1.0
    rest = batcher.flush_due(7.0, 0.0)
    assert rest is not None
    assert rest.created == 7.0


def test_oldest_timestamp() -> None:
    assert Batch().oldest_timestamp_ms() == 0
    batch = Poll(0, [1] * 3, timestamp=500).add_to(Batcher(3, 10**6))[0]
    assert batch.oldest_timestamp_ms() == 500


def test_split_halves() -> None:
    batcher = Batcher(100, 10**7)
    polls = [Poll(0, [5] * 3), Poll(10, [7] * 4), Poll(20, [9] * 3)]
    for poll in polls:
        poll.add_to(batcher)
    batch = batcher.flush()
    assert batch is not None
    batch.attempts, batch.first_failure, batch.last_failure, batch.created = 3, 1.0, 2.0, 0.5
    head, tail = batch.split()
    assert (len(head), len(tail)) == (5, 5)
    assert head.parts == [(polls[0].chunk, 3), (polls[1].chunk, 2)]
    assert tail.parts == [(polls[1].chunk, 2), (polls[2].chunk, 3)]
    assert head.events + tail.events == batch.events
    assert head.records + tail.records == batch.records
    assert head.nbytes + tail.nbytes == batch.nbytes
    for half in (head, tail):
        check_parts(half)
        assert (half.attempts, half.first_failure, half.last_failure, half.created) == (3, 1.0, 2.0, 0.5)


def test_split_at_edges() -> None:
    poll = Poll(0, [1] * 4)
    poll.add_to(batcher := Batcher(100, 10**6))
    batch = batcher.flush()
    assert batch is not None
    for index in range(-1, 6):
        head, tail = batch.split_at(index)
        assert head.events + tail.events == batch.events
        check_parts(head)
        check_parts(tail)
    head, tail = batch.split_at(0)
    assert (head.parts, tail.parts) == ([], [(poll.chunk, 4)])
    empty, same = batch.split_at(1)[0].split()
    assert len(empty) == 0
    assert same.parts == [(poll.chunk, 1)]


def test_split_keeps_chunks_apart_that_share_offsets() -> None:
    """After a revoke and a reassignment, a re-polled record has the offset of one still in flight."""
    old, new = Poll(0, [1] * 3), Poll(0, [1] * 3)
    batcher = Batcher(100, 10**6)
    old.add_to(batcher)
    new.add_to(batcher)
    batch = batcher.flush()
    assert batch is not None
    head, tail = batch.split()
    assert head.parts == [(old.chunk, 3)]
    assert tail.parts == [(new.chunk, 3)]


def test_entries_pair_each_event_with_its_chunk() -> None:
    a, b = Poll(0, [1] * 2), Poll(5, [1])
    batcher = Batcher(100, 10**6)
    a.add_to(batcher)
    b.add_to(batcher)
    batch = batcher.flush()
    assert batch is not None
    assert [(e["n"], r.offset, c) for e, r, c in batch.entries()] == [(0, 0, a.chunk), (1, 1, a.chunk), (5, 5, b.chunk)]


polls_strategy = st.lists(st.lists(st.integers(0, 400), max_size=40), min_size=1, max_size=8)


def build(sizes: list[list[int]], max_events: int, max_bytes: int) -> tuple[list[Poll], list[Batch]]:
    batcher = Batcher(max_events, max_bytes)
    polls, batches, start = [], [], 0
    for i, poll_sizes in enumerate(sizes):
        poll = Poll(start, poll_sizes, TopicPartition("t", i % 2))
        start += len(poll_sizes) + 1
        polls.append(poll)
        batches.extend(poll.add_to(batcher, now=float(i)))
        assert batcher.buffered == sum(len(p.events) for p in polls) - sum(len(b) for b in batches)
    rest = batcher.flush()
    if rest is not None:
        batches.append(rest)
    assert batcher.buffered == 0
    return polls, batches


@settings(max_examples=150, deadline=None)
@given(polls_strategy, st.integers(1, 100), st.integers(1, 6000))
def test_batches_respect_both_caps_and_keep_order(sizes: list[list[int]], max_events: int, max_bytes: int) -> None:
    polls, batches = build(sizes, max_events, max_bytes)
    assert [e for b in batches for e in b.events] == [e for p in polls for e in p.events]
    for batch in batches:
        assert 0 < len(batch) <= max_events
        assert batch.nbytes <= max_bytes or len(batch) == 1
        check_parts(batch)
    completed: dict[int, int] = {}
    for batch in batches:
        for chunk, n in batch.parts:
            completed[id(chunk)] = completed.get(id(chunk), 0) + n
    assert completed == {id(p.chunk): len(p.events) for p in polls if p.events}


@settings(max_examples=150, deadline=None)
@given(polls_strategy, st.data())
def test_bisecting_maps_every_record_to_its_chunk(sizes: list[list[int]], data: st.DataObject) -> None:
    _, batches = build(sizes, 100, 10**9)
    for batch in batches:
        pieces = [batch]
        while any(len(p) > 1 for p in pieces):
            piece = data.draw(st.sampled_from([p for p in pieces if len(p) > 1]))
            if data.draw(st.booleans()):
                halves = piece.split()
            else:
                halves = piece.split_at(data.draw(st.integers(1, len(piece) - 1)))
            for half in halves:
                check_parts(half)
            assert halves[0].events + halves[1].events == piece.events
            index = pieces.index(piece)
            pieces[index : index + 1] = halves
        assert [p.records[0] for p in pieces] == batch.records
        chunks = [c for p in pieces for c, _ in p.parts]
        assert chunks == [c for c, n in batch.parts for _ in range(n)]


def test_without_drops_the_events_of_selected_chunks_and_keeps_the_rest_in_order():
    a, b, c = (Chunk(TopicPartition("t", p), 0, 3, 3) for p in range(3))
    records = [FakeRecord("t", p, o, 0, None, b"{}", ()) for p in range(3) for o in range(3)]
    events = [{"identifier": f"{r.partition}-{r.offset}"} for r in records]
    batch = Batch(events, records, [(a, 3), (b, 3), (c, 3)], 9 * 10)
    kept = batch.without(lambda chunk: chunk is b)
    assert kept is not None
    assert [e["identifier"] for e in kept.events] == ["0-0", "0-1", "0-2", "2-0", "2-1", "2-2"]
    assert [r.partition for r in kept.records] == [0, 0, 0, 2, 2, 2]
    assert kept.parts == [(a, 3), (c, 3)]
    assert batch.without(lambda chunk: False) is batch
    assert batch.without(lambda chunk: True) is None
