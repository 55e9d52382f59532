"""Writes rejected records to the dead-letter topic, and only then lets their offsets be committed.

Each dead-letter record carries the original key, value and headers byte for byte, followed by the
`ingestor.*` headers of `dlq_format`. The producer is idempotent with acks=all. A record whose write
fails stays pending: it is retried with capped backoff, forever, the failure counted in
`ingestor_dlq_write_failures_total` and logged; the partition's committed offset cannot pass it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ingestor import __version__, dlq_format

if TYPE_CHECKING:
    from collections.abc import Collection

    from ingestor.errors import Rejection
    from ingestor.events import Record
    from ingestor.metrics import Metrics
    from ingestor.offsets import Chunk, OffsetTracker

log = logging.getLogger("ingestor.deadletter")

RETRY_BASE_S = 0.2
RETRY_MAX_S = 10.0


class Producer(Protocol):
    """The part of aiokafka's AIOKafkaProducer the writer uses."""

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, *, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Any]: ...


@dataclass(slots=True)
class Letter:
    """One record on its way to the dead-letter topic."""

    chunk: Chunk
    record: Record
    reason: str
    message: str
    attempts: int = 0
    stripe_code: str = ""
    identifier: str = ""
    first_failure: float = 0.0
    last_failure: float = 0.0

    def kafka_message(self) -> dict[str, Any]:
        """Key, value and headers of the dead-letter record. Kafka clients refuse a record with neither
        key nor value, so a keyless tombstone is written with an empty value and `ingestor.null_value`."""
        record, headers = self.record, self.headers()
        value = record.value
        if value is None and record.key is None:
            value = b""
            headers.append((dlq_format.NULL_VALUE, b"true"))
        return {"key": record.key, "value": value, "headers": headers}

    def headers(self) -> list[tuple[str, bytes]]:
        record = self.record
        first = self.first_failure or time.time()
        own = {
            dlq_format.REASON: self.reason,
            dlq_format.MESSAGE: self.message[:1000],
            dlq_format.SOURCE_TOPIC: record.topic,
            dlq_format.SOURCE_PARTITION: str(record.partition),
            dlq_format.SOURCE_OFFSET: str(record.offset),
            dlq_format.SOURCE_TIMESTAMP: str(record.timestamp),
            dlq_format.ATTEMPTS: str(self.attempts),
            dlq_format.FIRST_FAILURE_AT: _rfc3339(first),
            dlq_format.LAST_FAILURE_AT: _rfc3339(self.last_failure or first),
            dlq_format.VERSION: __version__,
        }
        if self.identifier:
            own[dlq_format.IDENTIFIER] = self.identifier
        if self.stripe_code:
            own[dlq_format.STRIPE_CODE] = self.stripe_code
        headers = list(record.headers or ())
        original = dlq_format.strip_own_headers(headers)
        out = original + [(k, v.encode()) for k, v in own.items()]
        if not self.identifier:
            # A replayed record's identifier travels in its `ingestor.identifier` header; rejected before
            # any identifier was settled, it must keep that header (byte for byte), or the next replay
            # would derive a new identifier and Stripe could count the event twice.
            carried = next((v for k, v in headers if k == dlq_format.IDENTIFIER), None)
            if carried is not None:
                out.append((dlq_format.IDENTIFIER, carried))
        return out


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}Z"


class DeadLetterWriter:
    """Queues letters and writes them in the background; a letter is done only once Kafka acked it."""

    def __init__(self, producer: Producer, topic: str, tracker: OffsetTracker, metrics: Metrics) -> None:
        self._producer = producer
        self._topic = topic
        self._tracker = tracker
        self._metrics = metrics
        self._queue: list[Letter] = []
        self._writing: list[Letter] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.failing = False

    def submit(self, chunk: Chunk, record: Record, rejection: Rejection, **extra: Any) -> None:
        """Queue one record for the dead-letter topic (never blocks, never drops)."""
        self._queue.append(Letter(chunk, record, rejection.reason, rejection.message, **extra))
        self._idle.clear()
        self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._queue) + len(self._writing)

    def pending_for(self, tps: Collection[tuple[str, int]]) -> bool:
        """Whether a letter of one of these partitions is not acked yet."""
        return any(letter.chunk.tp in tps for letter in (*self._queue, *self._writing))

    async def run(self) -> None:
        """Write queued letters until cancelled."""
        failures = 0
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            letters, self._queue = self._queue, []
            self._writing = letters
            try:
                failed = await self._write(letters)
            finally:
                self._writing = []
            if failed:
                self._queue[:0] = failed
                failures += 1
                delay = random.uniform(0, min(RETRY_MAX_S, RETRY_BASE_S * 2**failures))  # noqa: S311
                await asyncio.sleep(delay)
            else:
                failures = 0

    async def _write(self, letters: list[Letter]) -> list[Letter]:
        """Send every letter, await the acks; return the letters that failed."""
        pending: list[tuple[Letter, asyncio.Future[Any] | None, Exception | None]] = []
        for letter in letters:
            try:
                fut = await self._producer.send(self._topic, **letter.kafka_message())
                pending.append((letter, fut, None))
            except Exception as exc:  # noqa: BLE001 - any producer error keeps the letter pending
                pending.append((letter, None, exc))
        failed: list[Letter] = []
        first_error: BaseException | None = None
        for letter, ack, send_error in pending:
            error = send_error if ack is None else await _ack_error(ack)
            if error is None:
                self._done(letter)
            else:
                failed.append(letter)
                first_error = first_error or error
        if failed:
            self.failing = True
            self._metrics.dlq_write_failures.inc(len(failed))
            log.warning(
                "dead-letter write failed; will retry: %r",
                first_error,
                extra={"topic": self._topic, "records": len(failed)},
            )
        else:
            self.failing = False
        return failed

    def _done(self, letter: Letter) -> None:
        self._tracker.complete(letter.chunk, 1)
        self._metrics.events_dead_lettered.labels(letter.record.topic, letter.reason).inc()

    async def wait_idle(self) -> None:
        """Until every submitted letter is acked."""
        await self._idle.wait()


async def _ack_error(fut: asyncio.Future[Any]) -> BaseException | None:
    try:
        await fut
    except Exception as exc:  # noqa: BLE001 - reported to the caller as a value
        return exc
    return None
