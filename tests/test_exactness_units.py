"""The pure pieces behind the exactness guarantees: run-ahead and watermarks, the per-partition stall
watch, backoff that never overflows, and dead-letter records that always fit their topic."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingestor import backoff, dlq_format
from ingestor.deadletter import FRAMING_BYTES, DeadLetterWriter, Letter, TopicLimit, message_bytes
from ingestor.errors import Rejection
from ingestor.metrics import Metrics
from ingestor.observability import HealthState
from ingestor.offsets import OffsetTracker, TopicPartition
from ingestor.partition_health import PartitionWatch
from ingestor.transactions import due_letters
from tests.fakes import FakeClock, settle

TP = TopicPartition("t", 0)
OTHER = TopicPartition("t", 1)


@dataclass
class Rec:
    topic: str = "t"
    partition: int = 0
    offset: int = 7
    timestamp: int = 1_700_000_000_000
    key: bytes | None = b"k"
    value: bytes | None = b"{}"
    headers: tuple[tuple[str, bytes], ...] = ()


# --- run-ahead and the watermark with letters ---------------------------------------------------------


def test_ahead_counts_everything_since_the_oldest_unfinished_record() -> None:
    tracker = OffsetTracker()
    tracker.assign(TP)
    stuck = tracker.open(TP, 0, 10, 10)
    later = [tracker.open(TP, 10 * i, 10 * i + 10, 10) for i in range(1, 6)]
    for chunk in later:
        tracker.complete(chunk, 10)  # everything after the stuck chunk is done...
    tracker.complete(stuck, 9)
    assert tracker.pending == 1
    assert tracker.ahead(TP) == 60  # ...but the partition ran 60 records ahead of its watermark
    assert tracker.committable() == {}
    tracker.complete(stuck, 1)
    assert tracker.ahead(TP) == 0
    assert tracker.committable() == {TP: 60}


def test_watermark_with_letters_counts_them_done_without_completing_them() -> None:
    tracker = OffsetTracker()
    tracker.assign(TP)
    first = tracker.open(TP, 0, 5, 5)
    second = tracker.open(TP, 5, 9, 4)
    tracker.complete(first, 3)  # two records of the first chunk are letters
    tracker.complete(second, 4)
    assert tracker.watermark_with(TP, {}) is None
    assert tracker.watermark_with(TP, {first: 1}) is None
    assert tracker.watermark_with(TP, {first: 2}) == 9
    assert tracker.committable() == {}  # nothing actually completed
    assert tracker.watermark_with(OTHER, {first: 2}) is None


@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=30), st.data())
def test_ahead_matches_the_chunks_not_yet_behind_the_watermark(sizes: list[int], data: st.DataObject) -> None:
    tracker = OffsetTracker()
    tracker.assign(TP)
    chunks, start = [], 0
    for size in sizes:
        chunks.append(tracker.open(TP, start, start + size, size))
        start += size
    for chunk in chunks:
        tracker.complete(chunk, data.draw(st.integers(min_value=0, max_value=chunk.pending)))
    mark = tracker.done_up_to(TP) or 0
    assert tracker.ahead(TP) == start - mark


# --- the stall watch ------------------------------------------------------------------------------------


def test_a_partition_whose_watermark_stands_still_with_work_pending_is_stalled_the_others_not() -> None:
    watch = PartitionWatch()
    watch.observe({TP: (10, 5), OTHER: (10, 5)}, now=100.0)
    watch.observe({TP: (10, 5), OTHER: (20, 5)}, now=130.0)  # OTHER moved
    watch.observe({TP: (10, 9), OTHER: (20, 0)}, now=160.0)  # OTHER has nothing pending
    assert watch.stalled(160.0) == {TP: 60.0}
    assert watch.worst(160.0) == (TP, 60.0)
    watch.observe({TP: (11, 9)}, now=170.0)  # moved, and OTHER was revoked
    assert watch.stalled(175.0) == {TP: 5.0}


def test_readiness_names_the_stalled_partition() -> None:
    state = HealthState(stuck_after=30, monotonic=lambda: 0.0, joined=True, stripe_ok=True)
    assert state.readiness() == (True, "ok")
    state.stalled_partition = lambda: ("usage/3", 31.0)
    ok, reason = state.readiness()
    assert not ok
    assert "usage/3" in reason
    assert state.liveness()[0]  # a restart would not help a record that cannot finish


# --- backoff ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failures", [1, 2, 10, 64, 1_024, 1_025, 10**6])
def test_backoff_never_overflows_and_stays_capped(failures: int) -> None:
    assert 0.0 <= backoff.delay(failures, 0.2, 10.0, 0.999) <= 10.0


async def test_the_dead_letter_writer_backs_off_on_its_clock_after_thousands_of_failures() -> None:
    """The writer used `0.2 * 2**failures` (OverflowError after ~1,024 failed cycles) and asyncio.sleep."""

    class Refusing:
        calls = 0

        async def send(self, topic: str, value: Any = None, key: Any = None, *, headers: Any) -> Any:
            self.calls += 1
            raise OSError("unwritable")

    clock = FakeClock()
    tracker = OffsetTracker()
    tracker.assign(TP)
    chunk = tracker.open(TP, 0, 1, 1)
    producer = Refusing()
    writer = DeadLetterWriter(producer, "dlq", tracker, Metrics(), clock=clock)
    writer.submit(chunk, Rec(), Rejection("not_json", "x"))
    task = asyncio.create_task(writer.run())
    try:
        for _ in range(1_100):
            await clock.advance(10.0)  # the cap: one attempt per advance at most
        assert not task.done(), task
        assert producer.calls > 1_024
        assert writer.backlog == 1
        assert tracker.pending == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await settle()


# --- dead-letter records that fit ---------------------------------------------------------------------


def test_a_letter_that_fits_keeps_the_original_byte_for_byte() -> None:
    record = Rec(value=b'{"a":1}', headers=(("trace", b"abc"),))
    message = Letter(None, record, "not_json", "bad").kafka_message(1_000_000)  # type: ignore[arg-type]
    assert message["value"] == record.value
    assert message["key"] == record.key
    assert ("trace", b"abc") in message["headers"]
    assert dlq_format.ORIGINAL_OMITTED not in dict(message["headers"])


def test_a_letter_too_large_for_the_topic_keeps_its_coordinates_and_says_what_was_omitted() -> None:
    record = Rec(offset=4242, value=b"x" * 1_500_000, key=b"k" * 2000, headers=(("big", b"y" * 5000),))
    message = Letter(None, record, "record_too_large", "too big", identifier="id-1").kafka_message(1_048_588)  # type: ignore[arg-type]
    headers = dict(message["headers"])
    assert message["value"] == b""
    assert message["key"] is None  # over 1 KiB: dropped too
    assert "big" not in headers
    assert headers[dlq_format.ORIGINAL_OMITTED] == b"true"
    assert int(headers[dlq_format.ORIGINAL_BYTES]) > 1_500_000
    assert headers[dlq_format.SOURCE_OFFSET] == b"4242"
    assert headers[dlq_format.SOURCE_TOPIC] == b"t"
    assert headers[dlq_format.REASON] == b"record_too_large"
    assert headers[dlq_format.IDENTIFIER] == b"id-1"
    assert b"omitted" in headers[dlq_format.MESSAGE]
    assert message_bytes(message) + FRAMING_BYTES <= 1_048_588


async def test_the_limit_is_read_again_before_a_letter_is_cut() -> None:
    limits = iter([100, 1_000_000])

    async def read() -> int:
        return next(limits)

    limit = TopicLimit(read)
    await limit.refresh()
    assert limit.max_bytes == 100
    await limit.refresh()
    assert limit.max_bytes == 1_000_000


async def test_a_limit_that_cannot_be_read_keeps_the_last_one() -> None:
    async def broken() -> int:
        raise OSError("no admin")

    limit = TopicLimit(broken, initial=5000)
    await limit.refresh()
    assert limit.max_bytes == 5000


def test_a_letter_is_due_only_once_every_earlier_record_of_its_partition_is_done() -> None:

    tracker = OffsetTracker()
    tracker.assign(TP)
    first = tracker.open(TP, 0, 4, 4)  # records 0..3: record 1 is bad, the others events
    second = tracker.open(TP, 4, 6, 2)  # records 4..5: record 5 is bad
    letter_1 = Letter(first, Rec(offset=1), "not_json", "x")
    letter_5 = Letter(second, Rec(offset=5), "not_json", "x")
    assert due_letters(tracker, TP, [letter_1, letter_5]) == ([], [letter_1, letter_5])
    tracker.complete(first, 3)  # the events of the first poll are delivered
    assert due_letters(tracker, TP, [letter_1, letter_5]) == ([letter_1], [letter_5])
    tracker.complete(second, 1)
    assert due_letters(tracker, TP, [letter_1, letter_5]) == ([letter_1, letter_5], [])
