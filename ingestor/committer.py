"""Commits: what is done, every INGESTOR_COMMIT_INTERVAL_MS, on revoke and once more at shutdown.

Partitions with dead-letter records waiting commit them with their offsets in one transaction per
partition (`ingestor.transactions`, unless INGESTOR_DLQ_TRANSACTIONAL=false); the others commit through
the consumer. One commit at a time. The final commit gets a bounded time: past it, the next owner
resends what it would have covered (same identifiers, so Stripe counts them once).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition as KafkaTopicPartition

from ingestor.transactions import PartitionTransactions, due_letters

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ingestor.deadletter import DeadLetterWriter, Letter
    from ingestor.metrics import Metrics
    from ingestor.observability import HealthState
    from ingestor.offsets import OffsetTracker, TopicPartition

log = logging.getLogger("ingestor.committer")


class Committer:
    """Dead letters with their offsets, then the consumer's offsets."""

    def __init__(  # noqa: PLR0913 - the committer's collaborators, each needed
        self,
        *,
        consumer: Any,
        tracker: OffsetTracker,
        dead_letters: DeadLetterWriter,
        transactions: PartitionTransactions | None,
        metrics: Metrics,
        health: HealthState,
    ) -> None:
        self.consumer = consumer
        self.tracker = tracker
        self.dead_letters = dead_letters
        self.transactions = transactions
        self.metrics = metrics
        self.health = health
        self._commit_lock = asyncio.Lock()

    async def commit_loop(self, interval_ms: int, after_each: Callable[[], None]) -> None:
        interval = interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            # Shielded: stopping the loop must not cut a commit short. A transaction cancelled after the
            # broker committed it would hand its letters back, and the final commit would write them again.
            # The final commit waits for this one on the commit lock.
            await asyncio.shield(self.commit())
            after_each()

    async def final_commit(self, limit: float) -> None:
        try:
            await asyncio.wait_for(self.commit(), limit)
        except TimeoutError:
            log.error("the final commit did not finish in time; the next owner resends what it covered")  # noqa: TRY400

    async def commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit what is done: dead-letter records with their offsets first (transactions), then the
        consumer's offsets of the other partitions. One commit at a time."""
        wanted = None if only is None else set(only)
        async with self._commit_lock:
            if self.transactions is not None:
                await self._commit_letters(self.transactions, wanted)
            await self._commit_offsets(wanted)

    async def _commit_letters(self, transactions: PartitionTransactions, wanted: set[TopicPartition] | None) -> None:
        """Each partition's waiting dead-letter records, with its offset, in one transaction."""
        ready = {tp for tp in self.dead_letters.partitions() if transactions.ready(tp)}
        if wanted is not None:
            ready &= wanted
        taken: dict[TopicPartition, list[Letter]] = {}
        for letter in self.dead_letters.take(ready):
            taken.setdefault(letter.chunk.tp, []).append(letter)
        by_partition: dict[TopicPartition, list[Letter]] = {}
        waiting: list[Letter] = []  # their partitions' earlier records are not all done yet
        for tp, group in taken.items():
            due, later = due_letters(self.tracker, tp, group)
            waiting += later
            if due:
                by_partition[tp] = due
        failed: list[Letter] = [letter for group in by_partition.values() for letter in group]
        try:
            results = await asyncio.gather(
                *(transactions.commit(tp, group) for tp, group in by_partition.items()), return_exceptions=True
            )
            failed, errors = [], []
            for group, result in zip(by_partition.values(), results, strict=True):
                if isinstance(result, BaseException):
                    failed += group
                    errors.append(result)
                else:
                    self.metrics.commits.labels("ok").inc()
                    self.health.progressed()
        finally:
            self.dead_letters.finish(failed + waiting)
        self.dead_letters.report(failed, errors)

    async def _commit_offsets(self, wanted: set[TopicPartition] | None) -> None:
        offsets = self.tracker.committable()
        if wanted is not None:
            offsets = {tp: o for tp, o in offsets.items() if tp in wanted}
        if not offsets:
            return
        try:
            # aiokafka takes its own TopicPartition class only
            await self.consumer.commit({KafkaTopicPartition(*tp): o for tp, o in offsets.items()})
        except KafkaError as exc:
            self.metrics.commits.labels("failed").inc()
            log.warning("offset commit failed; will retry", extra={"error": repr(exc)})
            return
        self.tracker.mark_committed(offsets)
        self.metrics.commits.labels("ok").inc()
        self.health.progressed()
