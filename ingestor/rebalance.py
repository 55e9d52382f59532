"""Rebalances and drains: partitions revoked and assigned by the consumer group, and the wait for work in
flight (on revoke, and when the worker stops).

On revoke, the revoked partitions' requests under way are waited for (up to INGESTOR_DRAIN_TIMEOUT_S),
what is done is committed, and the rest is forgotten: events consumed but not yet sent are left to the
partition's next owner, which reads them again from the committed offset. On assign, the partitions are
tracked before any await, transactional dead letters fence the partitions' earlier owners, and the
budget's share follows the partitions owned (unless the demand exchange sets it).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from aiokafka import ConsumerRebalanceListener

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable

    from ingestor.batching import Batch, Batcher
    from ingestor.clock import Clock
    from ingestor.committer import Committer
    from ingestor.metrics import Metrics
    from ingestor.offsets import OffsetTracker, TopicPartition
    from ingestor.senders import Senders
    from ingestor.settings import Settings
    from ingestor.startup import WorkerCore, WorkerParts

log = logging.getLogger("ingestor.rebalance")


class PartitionMetadata(Protocol):
    """What the ownership reads from the consumer: how many partitions a topic has."""

    def partitions_for_topic(self, topic: str) -> set[int] | None: ...


class Ownership:
    """(partitions this replica owns, partitions of all its topics): the budget's share. Owned as the
    tracker sees it: a partition being revoked counts until it is released (its drain needs budget)."""

    def __init__(self, tracker: OffsetTracker, metadata: PartitionMetadata, topics: Collection[str]) -> None:
        self._tracker = tracker
        self._metadata = metadata
        self._topics = topics

    def __call__(self) -> tuple[int, int]:
        owned = len(self._tracker.assigned())
        return owned, sum(len(self._metadata.partitions_for_topic(t) or ()) for t in self._topics)


async def wait_until(done: Callable[[], bool], limit: float, clock: Clock) -> None:
    """Poll `done` every 10 ms for up to `limit` seconds (completions are many and small: polling
    costs less than signalling each one)."""
    deadline = clock.monotonic() + limit
    while not done() and clock.monotonic() < deadline:  # noqa: ASYNC110 - see docstring
        await asyncio.sleep(0.01)


async def drain(core: WorkerCore, limit: float, clock: Clock) -> None:
    """Send what is buffered and wait for everything in flight, up to `limit` seconds."""
    batch = core.batcher.flush()
    if batch is not None:
        core.queue.put_nowait(batch)
    tracker = core.tracker
    await wait_until(lambda: tracker.pending == 0, limit, clock)
    if tracker.pending:
        log.warning("drain deadline passed with work in flight", extra={"pending": tracker.pending})


class Rebalancer(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """The consumer group's listener."""

    def __init__(  # noqa: PLR0913 - the rebalance's collaborators, each needed
        self,
        *,
        settings: Settings,
        core: WorkerCore,
        parts: WorkerParts,
        senders: Senders,
        committer: Committer,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.tracker = core.tracker
        self.batcher: Batcher = core.batcher
        self.queue: asyncio.Queue[Batch] = core.queue
        self.health = core.health
        self.gate = core.gate
        self._first_offsets = core.first_offsets
        self.consumer: Any = parts.consumer
        self.dead_letters = parts.dead_letters
        self.transactions = parts.transactions
        self.exchange = parts.exchange
        self._ownership = parts.ownership
        self.senders = senders
        self.committer = committer
        self.metrics = metrics
        self.clock = clock

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.on_assigned(list(assigned))

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Release revoked partitions: finish what is in flight, commit, forget the rest.

        Only requests already under way are waited for (up to the drain deadline): events consumed but
        not yet sent are dropped and left to the partition's next owner, which reads them again from the
        committed offset. Waiting for a whole buffer would hold the group's rebalance hostage.
        """
        self.metrics.rebalances.labels("revoked").inc()
        gone = set(revoked)
        senders = self.senders
        senders.revoking |= gone
        batch = self.batcher.flush()
        if batch is not None:
            self.queue.put_nowait(batch)

        transactional = self.transactions is not None

        def settled() -> bool:
            busy = any(chunk.tp in gone for b in senders.inflight for chunk, _ in b.parts)
            # transactional letters are written by the commit below, with the offsets
            return not busy and (transactional or not self.dead_letters.pending_for(gone))

        await wait_until(settled, self.settings.drain_timeout_s, self.clock)
        await self.committer.commit(revoked)
        for tp in revoked:
            self.tracker.revoke(tp)
            self._first_offsets.pop(tp, None)
        if self.transactions is not None:
            await self.transactions.release(revoked)
        senders.released_seen = True
        senders.revoking -= gone
        log.info("partitions revoked", extra={"partitions": [f"{tp.topic}/{tp.partition}" for tp in revoked]})

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("assigned").inc()
        for tp in assigned:  # before any await: a poll may already return these partitions' records
            self.tracker.assign(tp)
        if self.transactions is not None:
            await self.transactions.assign(assigned)  # fences earlier owners of these partitions
        self.health.joined = True
        owned, total = len(self.consumer.assignment()), self._ownership()[1]
        if self.exchange is None:
            self.gate.set_share(owned, total)
        log.info(
            "partitions assigned",
            extra={"partitions": [f"{tp.topic}/{tp.partition}" for tp in assigned], "owned": owned, "total": total},
        )
