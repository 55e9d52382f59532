"""Writes rejected records to the dead-letter topic, and only then lets their offsets be committed.

Each dead-letter record carries the original key, value and headers byte for byte, followed by the
`ingestor.*` headers of `dlq_format`. A record too large for the dead-letter topic (its
`max.message.bytes`) is written without its original key, value and headers: the `ingestor.*` headers
say so (`ingestor.original_omitted`, `ingestor.original_bytes`) and keep the source coordinates, so the
original can be found on its topic. So a dead-letter write can always succeed.

Two ways to write, chosen by INGESTOR_DLQ_TRANSACTIONAL:

- transactional (the default, `ingestor.transactions`): letters wait in the queue until the next offset
  commit, which writes them and commits the offsets past them in one Kafka transaction per partition:
  a `read_committed` reader sees each bad record exactly once, whatever crashes when.
- at-least-once: `DeadLetterWriter.run` writes letters as they come with an idempotent producer
  (acks=all); a crash between the ack and the offset commit writes the letter again after a restart.

A letter whose write fails stays pending: it is retried with capped backoff, forever, the failure counted
in `ingestor_dlq_write_failures_total` and logged; the partition's committed offset cannot pass it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from ingestor import __version__, backoff, dlq_format
from ingestor.clock import SYSTEM_CLOCK
from ingestor.timefmt import format_seconds

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection

    from ingestor.clock import Clock
    from ingestor.errors import Rejection
    from ingestor.events import Record
    from ingestor.metrics import Metrics
    from ingestor.offsets import Chunk, OffsetTracker, TopicPartition

log = logging.getLogger("ingestor.deadletter")

RETRY_BASE_S = 0.2
RETRY_MAX_S = 10.0
#: Kafka's default `max.message.bytes` (1 MiB plus the record batch overhead).
DEFAULT_TOPIC_MAX_BYTES: Final = 1_048_588
#: Room kept for the record batch header and per-record framing when judging whether a letter fits.
FRAMING_BYTES: Final = 512
#: An original key longer than this is dropped from an oversized letter along with its value.
MAX_KEPT_KEY_BYTES: Final = 1024
#: The errors that mean "this record is too large for the topic or the producer".
SIZE_ERRORS: Final = (MessageSizeTooLargeError, RecordTooLargeError)


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

    def kafka_message(self, max_bytes: int = DEFAULT_TOPIC_MAX_BYTES) -> dict[str, Any]:
        """Key, value and headers of the dead-letter record, within ``max_bytes`` (the topic's limit).

        Kafka clients refuse a record with neither key nor value, so a keyless tombstone is written with
        an empty value and `ingestor.null_value`. A letter that would not fit is written without the
        original key, value and headers (see the module docstring)."""
        record, headers = self.record, self.headers()
        value = record.value
        if value is None and record.key is None:
            value = b""
            headers.append((dlq_format.NULL_VALUE, b"true"))
        message = {"key": record.key, "value": value, "headers": headers}
        if message_bytes(message) + FRAMING_BYTES > max_bytes:
            return self._without_original(message, max_bytes)
        return message

    def fits(self, max_bytes: int) -> bool:
        """Whether the letter, original included, fits a topic whose max.message.bytes is `max_bytes`."""
        return (
            message_bytes({"key": self.record.key, "value": self.record.value, "headers": self.headers()})
            + (FRAMING_BYTES)
            <= max_bytes
        )

    def _without_original(self, message: dict[str, Any], max_bytes: int) -> dict[str, Any]:
        size = message_bytes(message)
        key = self.record.key if self.record.key is not None and len(self.record.key) <= MAX_KEPT_KEY_BYTES else None
        note = (
            f" (the original record, {size} bytes with its headers, does not fit the dead-letter topic's "
            f"max.message.bytes of {max_bytes}: it is omitted; find it at its source coordinates)"
        )
        own = [(k, v) for k, v in message["headers"] if k.startswith(dlq_format.PREFIX)]
        own = [(k, (v.decode() + note).encode() if k == dlq_format.MESSAGE else v) for k, v in own]
        own += [(dlq_format.ORIGINAL_OMITTED, b"true"), (dlq_format.ORIGINAL_BYTES, str(size).encode())]
        return {"key": key, "value": b"", "headers": own}

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


def message_bytes(message: dict[str, Any]) -> int:
    """Bytes of a record's key, value and headers (without Kafka's framing)."""
    key, value = message["key"], message["value"]
    headers = sum(len(k) + len(v) for k, v in message["headers"])
    return (len(key) if key else 0) + (len(value) if value else 0) + headers


def _rfc3339(seconds: float) -> str:
    return format_seconds(seconds)


class TopicLimit:
    """The dead-letter topic's `max.message.bytes`, read at start and again after a write failed for size
    (an operator may raise or lower it while the worker runs)."""

    def __init__(
        self, read: Callable[[], Awaitable[int]] | None = None, initial: int = DEFAULT_TOPIC_MAX_BYTES
    ) -> None:
        self._read = read
        self.max_bytes = initial

    async def refresh(self) -> None:
        if self._read is None:
            return
        try:
            self.max_bytes = await self._read()
        except Exception as exc:  # noqa: BLE001 - keep the last known limit; the write is retried anyway
            log.warning("cannot read the dead-letter topic's max.message.bytes", extra={"error": repr(exc)})


class DeadLetterWriter:
    """Queues letters; a letter is done only once Kafka acked it (or its transaction committed)."""

    def __init__(  # noqa: PLR0913 - explicit collaborators
        self,
        producer: Producer | None,
        topic: str,
        tracker: OffsetTracker,
        metrics: Metrics,
        *,
        limit: TopicLimit | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._tracker = tracker
        self._metrics = metrics
        self.limit = limit or TopicLimit()
        self._clock = clock
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
    def topic(self) -> str:
        return self._topic

    @property
    def backlog(self) -> int:
        return len(self._queue) + len(self._writing)

    def pending_for(self, tps: Collection[TopicPartition]) -> bool:
        """Whether a letter of one of these partitions is not acked yet."""
        return any(letter.chunk.tp in tps for letter in (*self._queue, *self._writing))

    def partitions(self) -> set[TopicPartition]:
        """Partitions with letters waiting."""
        return {letter.chunk.tp for letter in self._queue}

    def take(self, tps: Collection[TopicPartition] | None = None) -> list[Letter]:
        """Remove and return the queued letters (of `tps` only, when given); letters of partitions no
        longer ours are dropped: their next owner reads the records again."""
        if tps is None:
            taken, self._queue = self._queue, []
        else:
            taken = [letter for letter in self._queue if letter.chunk.tp in tps]
            self._queue = [letter for letter in self._queue if letter.chunk.tp not in tps]
        self._writing = taken
        return [letter for letter in taken if not letter.chunk.released]

    def finish(self, failed: list[Letter]) -> None:
        """The letters taken last were written, except `failed`: first in line for the next attempt."""
        self._writing = []
        self._queue[:0] = failed
        if not self._queue:
            self._idle.set()

    async def run(self) -> None:
        """Write queued letters as they come (at-least-once mode), until cancelled."""
        failures = 0
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            letters = self.take()
            failed: list[Letter] = letters
            try:
                failed = await self._write(letters)
            finally:
                self.finish(failed)
            if failed:
                failures += 1
                await self._clock.sleep(backoff.delay(failures, RETRY_BASE_S, RETRY_MAX_S, random.random()))  # noqa: S311
            else:
                failures = 0

    async def _write(self, letters: list[Letter]) -> list[Letter]:
        """Send every letter, await the acks; return the letters that failed."""
        failed, errors = await self.send_all(letters)
        for letter in letters:
            if letter not in failed:
                self.done(letter)
        self.report(failed, errors)
        return failed

    async def send_all(self, letters: list[Letter]) -> tuple[list[Letter], list[BaseException]]:
        """Send letters through the producer and await the acks: (the letters that failed, their errors).
        A failure for size makes the writer re-read the topic's limit before the next attempt."""
        assert self._producer is not None
        return await send_letters(self._producer, self._topic, letters, self.limit)

    def report(self, failed: list[Letter], errors: list[BaseException]) -> None:
        """Count and log failed writes (or note that writing works again)."""
        self.failing = bool(failed)
        if failed:
            self._metrics.dlq_write_failures.inc(len(failed))
            log.warning(
                "dead-letter write failed; will retry: %r",
                errors[0] if errors else None,
                extra={"topic": self._topic, "records": len(failed)},
            )

    def done(self, letter: Letter) -> None:
        """The letter is in the dead-letter topic: its record is done."""
        self._tracker.complete(letter.chunk, 1)
        self._metrics.events_dead_lettered.labels(letter.record.topic, letter.reason).inc()

    async def wait_idle(self) -> None:
        """Until every submitted letter is acked."""
        await self._idle.wait()


async def send_letters(
    producer: Producer, topic: str, letters: list[Letter], limit: TopicLimit
) -> tuple[list[Letter], list[BaseException]]:
    """Send letters and await their acks: (the letters that failed, their errors). Before writing a letter
    without its original for want of room, the topic's limit is read again: it may have been raised."""
    if any(not letter.fits(limit.max_bytes) for letter in letters):
        await limit.refresh()
    pending: list[tuple[Letter, asyncio.Future[Any] | None, Exception | None]] = []
    for letter in letters:
        try:
            fut = await producer.send(topic, **letter.kafka_message(limit.max_bytes))
            pending.append((letter, fut, None))
        except Exception as exc:  # noqa: BLE001 - any producer error keeps the letter pending
            pending.append((letter, None, exc))
    failed: list[Letter] = []
    errors: list[BaseException] = []
    for letter, ack, send_error in pending:
        error = send_error if ack is None else await _ack_error(ack)
        if error is not None:
            failed.append(letter)
            errors.append(error)
    if any(isinstance(error, SIZE_ERRORS) for error in errors):
        await limit.refresh()
    return failed, errors


async def _ack_error(fut: asyncio.Future[Any]) -> BaseException | None:
    try:
        await fut
    except Exception as exc:  # noqa: BLE001 - reported to the caller as a value
        return exc
    return None
