"""Dead-letter records and the offsets past them, committed together: one Kafka transaction per partition.

Why: with a plain producer, a crash between the dead-letter write and the offset commit writes the same
bad record again after the restart. Here a partition's letters and its new committed offset are one
transaction, so a `read_committed` reader of the dead-letter topic sees each bad record exactly once.

How:

- Each assigned partition has its own transactional producer, `transactional.id` =
  ``<prefix>-<topic>-<partition>``. Starting it on assignment fences any earlier owner of the partition
  (a replica that was cut off and does not know it yet): Kafka aborts that owner's open transaction and
  refuses its later ones. (aiokafka's `send_offsets_to_transaction` does not carry the group generation,
  so the transactional id per partition is what keeps a zombie from committing.)
- `commit(tp, letters)` writes the letters, computes the offset that may be committed once they are done
  (`OffsetTracker.watermark_with`), adds it to the transaction and commits. Only then are the letters'
  records done. On any failure the transaction is aborted and the letters stay pending.
- Partitions with no letters commit through the consumer as before (the group generation fences those).

Cost: one producer (one connection and one background task) per assigned partition, and a transaction
per partition per commit interval while it has letters; measured in BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any, Protocol

from aiokafka.errors import KafkaError, ProducerFenced

from ingestor import backoff
from ingestor.clock import SYSTEM_CLOCK
from ingestor.deadletter import RETRY_BASE_S, RETRY_MAX_S, Producer, send_letters

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ingestor.clock import Clock
    from ingestor.deadletter import DeadLetterWriter, Letter
    from ingestor.offsets import OffsetTracker, TopicPartition

log = logging.getLogger("ingestor.transactions")

#: How long one partition's transaction may take before it is aborted (the DLQ or Kafka is in trouble).
TRANSACTION_TIMEOUT_S = 30.0


class TransactionalProducer(Producer, Protocol):
    """The part of aiokafka's transactional AIOKafkaProducer used here."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def begin_transaction(self) -> None: ...
    async def commit_transaction(self) -> None: ...
    async def abort_transaction(self) -> None: ...
    async def send_offsets_to_transaction(self, offsets: dict[Any, int], group_id: str) -> None: ...


class PartitionTransactions:
    """One transactional producer per assigned partition; commits letters with offsets."""

    def __init__(  # noqa: PLR0913 - explicit collaborators
        self,
        make_producer: Callable[[str], TransactionalProducer],
        *,
        prefix: str,
        group_id: str,
        letters: DeadLetterWriter,
        tracker: OffsetTracker,
        topic_partition: Callable[[str, int], Any],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._make = make_producer
        self._prefix = prefix
        self._group = group_id
        self._letters = letters
        self._tracker = tracker
        self._tp = topic_partition
        self._producers: dict[TopicPartition, TransactionalProducer] = {}
        self._fenced: set[TopicPartition] = set()
        self._starting: dict[TopicPartition, asyncio.Task[TransactionalProducer]] = {}
        self._failures: dict[TopicPartition, int] = {}
        self._retry_at: dict[TopicPartition, float] = {}
        self._clock = clock

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self._prefix}-{tp.topic}-{tp.partition}"

    async def assign(self, tps: Iterable[TopicPartition]) -> None:
        """Start (and so fence earlier owners of) a producer for each new partition."""
        await asyncio.gather(*(self._producer_for(tp) for tp in tps))

    async def _producer_for(self, tp: TopicPartition) -> TransactionalProducer:
        """The partition's producer, started once however many callers ask at the same time, and started
        again if a failure closed it; never after a fence: another replica owns the partition then, and
        starting again would fence it in turn."""
        producer = self._producers.get(tp)
        if producer is not None:
            return producer
        if tp in self._fenced:
            raise ProducerFenced
        task = self._starting.get(tp)
        if task is None:
            task = self._starting[tp] = asyncio.create_task(self._start(tp), name=f"ingestor-txn-start-{tp}")
            task.add_done_callback(lambda _: self._starting.pop(tp, None))
        return await asyncio.shield(task)

    async def _start(self, tp: TopicPartition) -> TransactionalProducer:
        producer = self._make(self.transactional_id(tp))
        await producer.start()
        try:
            await producer.begin_transaction()  # waits for the producer id: the fence
        except BaseException:
            await _close(producer)
            raise
        self._producers[tp] = producer
        return producer

    async def release(self, tps: Iterable[TopicPartition]) -> None:
        """Stop the producers of revoked partitions (their open transactions hold nothing)."""
        tps = list(tps)
        starting = [self._starting[tp] for tp in tps if tp in self._starting]
        await asyncio.gather(*starting, return_exceptions=True)
        self._fenced.difference_update(tps)
        for tp in tps:
            self._failures.pop(tp, None)
            self._retry_at.pop(tp, None)
        gone = [self._producers.pop(tp) for tp in tps if tp in self._producers]
        await asyncio.gather(*(_close(p) for p in gone))

    async def stop(self) -> None:
        await self.release(list(self._producers))

    @property
    def partitions(self) -> list[TopicPartition]:
        return list(self._producers)

    async def commit(self, tp: TopicPartition, letters: list[Letter]) -> int | None:
        """Write `letters` (all of partition `tp`) and commit the offset past them, atomically.

        Returns the committed offset (None when there was none to commit); on failure the transaction is
        aborted and the error raised (the caller keeps the letters for the next attempt)."""
        producer = None
        try:
            producer = await self._producer_for(tp)
            offset = await asyncio.wait_for(self._transact(producer, tp, letters), TRANSACTION_TIMEOUT_S)
        except BaseException:
            if producer is not None:
                await self._recover(tp, producer)
            raise
        self._failures.pop(tp, None)
        self._retry_at.pop(tp, None)
        for letter in letters:
            self._letters.done(letter)
        if offset is not None:
            self._tracker.mark_committed({tp: offset})
        return offset

    async def _transact(self, producer: TransactionalProducer, tp: TopicPartition, letters: list[Letter]) -> int | None:
        failed, errors = await send_letters(producer, self._letters.topic, letters, self._letters.limit)
        if failed:
            raise errors[0]
        extra: dict[Any, int] = {}
        for letter in letters:
            extra[letter.chunk] = extra.get(letter.chunk, 0) + 1
        offset = self._tracker.watermark_with(tp, extra)
        if offset is not None:
            await producer.send_offsets_to_transaction({self._tp(tp.topic, tp.partition): offset}, self._group)
        await producer.commit_transaction()
        await producer.begin_transaction()
        return offset

    async def _recover(self, tp: TopicPartition, producer: TransactionalProducer) -> None:
        """After a failed transaction: close the producer (its sequence numbers may no longer match the
        broker's after a refused write); the next attempt, after a backoff, starts a new one, whose epoch
        fences this one. A fenced producer is not started again: another replica owns the partition, and
        a rebalance is on its way."""
        self._failures[tp] = failures = self._failures.get(tp, 0) + 1
        pause = backoff.delay(failures, RETRY_BASE_S, RETRY_MAX_S, random.random())  # noqa: S311 - jitter
        self._retry_at[tp] = self._clock.monotonic() + pause
        if self._producers.get(tp) is producer:
            del self._producers[tp]
        try:
            await producer.abort_transaction()
        except ProducerFenced:
            log.warning("fenced: another replica owns the partition", extra={"partition": f"{tp.topic}/{tp.partition}"})
            self._fenced.add(tp)
        except (KafkaError, OSError, TimeoutError, AssertionError) as exc:  # aiokafka asserts on bad states
            log.info("aborting a failed transaction failed; its producer is replaced", extra={"error": repr(exc)})
        await _close(producer)

    def ready(self, tp: TopicPartition) -> bool:
        """Whether `tp` may try a transaction now (not backing off after a failure)."""
        return self._retry_at.get(tp, 0.0) <= self._clock.monotonic()


async def _close(producer: TransactionalProducer) -> None:
    try:
        await producer.stop()
    except (KafkaError, OSError) as exc:
        log.warning("closing a transactional producer failed", extra={"error": repr(exc)})
