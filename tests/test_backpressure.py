"""Backpressure above INGESTOR_MAX_BUFFERED_EVENTS: stop polling first, pause the consumer only if it lasts.

Pausing a partition makes aiokafka drop the fetch it already holds for it, to fetch it again on resume
(its `FetchResult.check_assignment`), which raised a backlog's peak RSS by about 15 MB. So a short
overflow only stops the polls; an overflow that outlasts `HOLD_BEFORE_PAUSE_S` pauses every partition
as before (the consumer then keeps polling, within max.poll.interval.ms).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from ingestor.consumer_loop import HOLD_BEFORE_PAUSE_S, ConsumerLoop
from ingestor.metrics import Metrics
from ingestor.offsets import TopicPartition
from ingestor.settings import load
from ingestor.startup import build_core
from tests.fakes import FakeClock

LIMIT = 1000
ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "INGESTOR_TOPICS": "usage",
    "STRIPE_API_KEY": "sk_test_backpressure",
    "INGESTOR_MAX_BUFFERED_EVENTS": str(LIMIT),
}
PARTITIONS = {TopicPartition("usage", 0), TopicPartition("usage", 1)}


class Consumer:
    """aiokafka's consumer as the poll loop sees it: assignment, pause state and polls (which return nothing)."""

    def __init__(self) -> None:
        self._paused: set[TopicPartition] = set()
        self.polls = 0

    def assignment(self) -> set[TopicPartition]:
        return set(PARTITIONS)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def pause(self, *tps: TopicPartition) -> None:
        self._paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused.difference_update(tps)

    def highwater(self, tp: TopicPartition) -> int | None:
        del tp
        return None

    async def getmany(self, **_: Any) -> dict[TopicPartition, list[Any]]:
        self.polls += 1
        await asyncio.sleep(0.001)
        return {}


def worker(clock: FakeClock) -> tuple[ConsumerLoop, Consumer]:
    """The worker's consumer loop over a fake consumer (its other collaborators are never reached here)."""
    settings = load(ENV)
    consumer = Consumer()
    core = build_core(settings, clock)  # type: ignore[arg-type]
    parts = SimpleNamespace(consumer=consumer, decoder=None, dead_letters=None, adjuster=None)
    loop = ConsumerLoop(
        settings=settings,
        core=core,
        parts=parts,  # type: ignore[arg-type]
        metrics=Metrics(),
        clock=clock,  # type: ignore[arg-type]
        stop=asyncio.Event(),
    )
    for tp in PARTITIONS:
        loop.tracker.assign(tp)
    return loop, consumer


def test_an_overflow_stops_the_polls_first_and_pauses_the_consumer_only_when_it_lasts() -> None:
    clock = FakeClock()
    w, consumer = worker(clock)
    assert w._backpressure() is False  # nothing pending: poll
    chunk = w.tracker.open(("usage", 0), 0, LIMIT, LIMIT)  # type: ignore[arg-type]
    assert w._backpressure() is True  # over the limit: do not poll ...
    assert consumer.paused() == set()  # ... but keep what aiokafka has fetched
    clock.now += HOLD_BEFORE_PAUSE_S / 2
    assert w._backpressure() is True
    assert consumer.paused() == set()
    clock.now += HOLD_BEFORE_PAUSE_S / 2
    assert w._backpressure() is False  # it lasted: pause everything and poll on, as before
    assert consumer.paused() == PARTITIONS
    w.tracker.complete(chunk, LIMIT)
    assert w._backpressure() is False
    assert consumer.paused() == set()


def test_an_overflow_that_drains_in_time_never_pauses() -> None:
    clock = FakeClock()
    w, consumer = worker(clock)
    chunk = w.tracker.open(("usage", 1), 0, LIMIT, LIMIT)  # type: ignore[arg-type]
    assert w._backpressure() is True
    w.tracker.complete(chunk, LIMIT // 2)  # still at half the limit: hold on
    assert w._backpressure() is True
    w.tracker.complete(chunk, 1)  # below half
    assert w._backpressure() is False
    assert consumer.paused() == set()
    clock.now += HOLD_BEFORE_PAUSE_S * 2
    assert w._backpressure() is False
    assert consumer.paused() == set()


def test_paused_partitions_are_reported_while_the_polls_are_held() -> None:
    clock = FakeClock()
    w, _ = worker(clock)
    w.tracker.open(("usage", 0), 0, LIMIT, LIMIT)  # type: ignore[arg-type]
    assert w._backpressure() is True
    assert w.partitions_paused() == len(PARTITIONS)  # what ingestor_partitions_paused reads


async def test_the_poll_loop_does_not_poll_while_held_and_polls_again_once_drained() -> None:
    clock = FakeClock()
    w, consumer = worker(clock)
    chunk = w.tracker.open(("usage", 0), 0, LIMIT, LIMIT)  # type: ignore[arg-type]
    loop = asyncio.create_task(w.poll_loop())
    try:
        for _ in range(20):
            await asyncio.sleep(0.002)
        assert consumer.polls == 0
        w.tracker.complete(chunk, LIMIT)
        for _ in range(500):  # bounded: until the loop polls again
            if consumer.polls:
                break
            await asyncio.sleep(0.002)
        assert consumer.polls > 0
        assert consumer.paused() == set()
    finally:
        w._stop.set()
        await asyncio.wait_for(loop, 5)
