"""The consumer loop: poll Kafka, ingest what arrives, and pause partitions for backpressure.

Each poll of a partition opens one chunk in the offset tracker (a cancellation gets a chunk of its own);
decoded events go to the batcher, full batches to the senders' queue, rejections to the dead-letter
writer, cancellations to the adjuster. Records rejected as `meter_unknown` wait for one catalog refresh
(`unknown_meter_loop`) before they are dead-lettered.

Backpressure pauses every partition when INGESTOR_MAX_BUFFERED_EVENTS records are pending, and one
partition alone when it runs INGESTOR_MAX_PARTITION_AHEAD records ahead of its oldest unfinished record
(a record that cannot finish must not let its partition run on unbounded); each resumes at half.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiokafka.errors import KafkaError

from ingestor.adjustments import split_poll

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ingestor.cancellation import Cancellation
    from ingestor.clock import Clock
    from ingestor.errors import Rejection
    from ingestor.meter_refresh import UnknownMeterHold
    from ingestor.metrics import Metrics
    from ingestor.offsets import Chunk, TopicPartition
    from ingestor.settings import Settings
    from ingestor.startup import WorkerCore, WorkerParts

log = logging.getLogger("ingestor.consumer_loop")

POLL_TIMEOUT_MS = 100
RESUME_FRACTION = 0.5
#: Over INGESTOR_MAX_BUFFERED_EVENTS the worker first stops taking records for up to this long, then pauses
#: the consumer (see `_backpressure`); while it waits it looks again every HOLD_TICK_S.
HOLD_BEFORE_PAUSE_S = 10.0
HOLD_TICK_S = 0.005


class ConsumerLoop:
    """Polls until the worker stops; owns the backpressure pauses."""

    def __init__(  # noqa: PLR0913 - the loop's collaborators, each needed
        self,
        *,
        settings: Settings,
        core: WorkerCore,
        parts: WorkerParts,
        metrics: Metrics,
        clock: Clock,
        stop: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.consumer = parts.consumer
        self.tracker = core.tracker
        self.batcher = core.batcher
        self.queue = core.queue
        self.decoder = parts.decoder
        self.dead_letters = parts.dead_letters
        self.adjuster = parts.adjuster
        self.unknown_meters = core.unknown_meters
        self.metrics = metrics
        self.clock = clock
        self._stop = stop
        self._first_offsets = core.first_offsets
        self._paused = False
        #: when `_paused` last became true (monotonic)
        self._paused_at = 0.0
        #: partitions paused because they ran INGESTOR_MAX_PARTITION_AHEAD records ahead
        self._held: set[TopicPartition] = set()

    def partitions_paused(self) -> int:
        return len(self.tracker.assigned()) if self._paused else len(self._held)

    # ----------------------------------------------------------------- the hot loop

    async def poll_loop(self) -> None:
        consumer = self.consumer
        max_records = self.settings.fetch_max_records
        while not self._stop.is_set():
            if self._backpressure():  # over the buffer limit: take nothing for now (see _backpressure)
                await asyncio.sleep(HOLD_TICK_S)
                continue
            try:
                data = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=max_records)
            except KafkaError as exc:
                log.warning("fetch failed; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(0.5)
                continue
            if data:
                self._ingest(data)

    def _ingest(self, data: dict[TopicPartition, list[Any]]) -> None:
        now_wall, now = time.time(), self.clock.monotonic()
        tracker, batcher, queue = self.tracker, self.batcher, self.queue
        for tp, records in data.items():
            if not records:
                continue
            self._first_offsets.setdefault(tp, records[0].offset)
            cancels: list[Cancellation] = []
            decoded = self.decoder.decode(records, now_wall, cancels)
            # one chunk per poll; a cancellation gets a chunk of its own (see ingestor.adjustments)
            for part in split_poll(records, *decoded, cancels):
                chunk = tracker.open(tp, part.start, part.end, part.count)
                if chunk.released:
                    break
                rejected = part.rejected
                if rejected:
                    if self.unknown_meters is not None:  # they wait for one catalog refresh (see meter_refresh)
                        rejected = self.unknown_meters.hold(chunk, rejected)
                    self._dead_letter(chunk, rejected, now_wall)
                for batch in batcher.add(chunk, part.events, part.sources, now):
                    queue.put_nowait(batch)
                if part.cancellation is not None:
                    self.adjuster.submit(chunk, part.cancellation)
            self.metrics.events_consumed.labels(tp.topic).inc(len(records))

    def _dead_letter(self, chunk: Chunk, rejected: list[tuple[Any, Rejection]], now_wall: float) -> None:
        for record, rejection in rejected:
            identifier = self.decoder.identifier_of(record)
            self.dead_letters.submit(
                chunk, record, rejection, identifier=identifier, first_failure=now_wall, last_failure=now_wall
            )

    def _backpressure(self) -> bool:
        """Pause everything above INGESTOR_MAX_BUFFERED_EVENTS pending records, and each partition that
        ran INGESTOR_MAX_PARTITION_AHEAD records ahead of its oldest unfinished one; resume at half.

        Above the limit the worker first only stops polling, for up to HOLD_BEFORE_PAUSE_S (True: do not
        poll now): pausing makes aiokafka drop the fetch it holds for each partition (up to
        max_partition_fetch_bytes), to fetch it again on resume; without the hold a backlog's peak RSS was
        about 15 MB higher (BENCHMARKS.md). A longer stall (an outage) pauses the consumer
        as before, which keeps polling within max.poll.interval.ms.
        """
        limit = self.settings.max_buffered_events
        if not self._paused and self.tracker.pending >= limit:
            self._paused = True
            self._paused_at = self.clock.monotonic()
        elif self._paused and self.tracker.pending < limit * RESUME_FRACTION:
            self._paused = False
        holding = self._paused and self.clock.monotonic() - self._paused_at < HOLD_BEFORE_PAUSE_S
        assignment = self.consumer.assignment()
        self._hold_partitions_ahead(assignment)
        wanted = assignment if self._paused and not holding else self._held & assignment
        now_paused = self.consumer.paused()
        if wanted - now_paused:
            self.consumer.pause(*(wanted - now_paused))
        if now_paused - wanted:
            self.consumer.resume(*(now_paused - wanted))
        return holding

    def _hold_partitions_ahead(self, assignment: set[TopicPartition]) -> None:
        ahead, limit = self.tracker.ahead, self.settings.max_partition_ahead
        held = self._held
        held &= assignment
        for tp in assignment:
            n = ahead(tp)
            if tp in held:
                if n < limit * RESUME_FRACTION:
                    held.discard(tp)
            elif n >= limit:
                held.add(tp)
                log.warning(
                    "partition ran ahead of its oldest unfinished record; pausing it",
                    extra={
                        "partition": f"{tp.topic}/{tp.partition}",
                        "ahead": n,
                        "commit": self.tracker.done_up_to(tp),
                    },
                )

    # ----------------------------------------------------------------- unknown meters

    async def unknown_meter_loop(self, hold: UnknownMeterHold, refresh: Callable[[], Awaitable[None]]) -> None:
        """Held `meter_unknown` records: refresh the catalog (rate-limited), then decode them again."""
        while True:
            await hold.waiting.wait()
            await asyncio.sleep(max(0.0, hold.refresh_in(self.clock.monotonic())))
            held = hold.take(self.clock.monotonic())
            await refresh()
            waited = sum(len(records) for _, records in held)
            log.info("meter catalog refreshed for unknown event names", extra={"records": waited})
            now_wall, now = time.time(), self.clock.monotonic()
            for chunk, records in held:
                if chunk.released:  # revoked meanwhile: the partition's next owner reads them again
                    continue
                events, sources, rejected = self.decoder.decode(records, now_wall)
                self._dead_letter(chunk, rejected, now_wall)
                for batch in self.batcher.add(chunk, events, sources, now):
                    self.queue.put_nowait(batch)
