"""The senders: INGESTOR_MAX_IN_FLIGHT tasks taking batches off the queue and delivering them, and the linger
loop that sends a partly filled batch once it waited INGESTOR_LINGER_MS.

A batch taken while a revoke is under way, or after one released chunks, leaves out the events of
partitions that are no longer ours (their next owner sends them). `inflight` is what the senders deliver
now: a revoke waits for its partitions' requests to finish before it commits.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ingestor.batching import Batch, Batcher
    from ingestor.clock import Clock
    from ingestor.offsets import Chunk, TopicPartition


class Senders:
    """The sender tasks' shared state and loops."""

    def __init__(
        self,
        *,
        queue: asyncio.Queue[Batch],
        batcher: Batcher,
        deliver: Callable[[Batch], Awaitable[None]],
        clock: Clock,
        linger_ms: int,
    ) -> None:
        self.queue = queue
        self.batcher = batcher
        self._deliver = deliver
        self.clock = clock
        self._linger_ms = linger_ms
        self.inflight: set[Batch] = set()
        #: partitions being revoked: their events are not sent any more
        self.revoking: set[TopicPartition] = set()
        #: set once a revoke released chunks: queued batches may hold events that are no longer ours
        self.released_seen = False

    async def sender(self) -> None:
        deliver, queue, inflight = self._deliver, self.queue, self.inflight
        while True:
            taken = await queue.get()
            batch = taken.without(self._not_ours) if self.revoking or self.released_seen else taken
            try:
                if batch is not None:
                    inflight.add(batch)
                    await deliver(batch)
            finally:
                if batch is not None:
                    inflight.discard(batch)
                queue.task_done()

    def _not_ours(self, chunk: Chunk) -> bool:
        """Events not to send: their partition was revoked or is being revoked (the new owner sends them)."""
        return chunk.released or chunk.tp in self.revoking

    async def linger_loop(self) -> None:
        linger = self._linger_ms / 1000
        tick = max(0.002, linger / 4)
        while True:
            await asyncio.sleep(tick)
            batch = self.batcher.flush_due(self.clock.monotonic(), linger)
            if batch is not None:
                self.queue.put_nowait(batch)
