"""Per-partition done-watermarks: which offsets may be committed.

Each poll of a partition opens a `Chunk` covering its records' offsets with a count of records still
pending. A record stops pending when Stripe accepted its event or Kafka acked its dead-letter record;
callers complete records in bulk (`complete(chunk, n)`), once per batch. A partition's committable
offset is the end of the longest run of finished chunks from the oldest: the highest offset below
which every record is done. Pure: no I/O, no clock.

How far a partition runs ahead of that watermark is bounded by the worker: `ahead(tp)` counts the
records consumed since the oldest unfinished one (finished or not), so a record that never finishes
cannot let its partition's chunk list grow without end (the worker pauses that partition at
INGESTOR_MAX_PARTITION_AHEAD). `watermark_with` answers "what could be committed if these records were
done too", so dead-letter records and the offsets past them can be committed in one Kafka transaction.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(slots=True, eq=False)
class Chunk:
    """Records [start, end) of one partition from one poll; `pending` of them are not done yet."""

    tp: TopicPartition
    start: int
    end: int
    pending: int
    released: bool = False
    #: records in the chunk, done or not
    size: int = 0


@dataclass(slots=True)
class PartitionProgress:
    chunks: deque[Chunk] = field(default_factory=deque)
    #: The committable offset: every record below it is done (None: nothing done since assignment).
    done_up_to: int | None = None
    committed: int | None = None
    #: records in `chunks` (done or not): how far the partition ran ahead of `done_up_to`
    ahead: int = 0


class OffsetTracker:
    """Done-watermarks for every assigned partition, and the count of pending records (for backpressure)."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, PartitionProgress] = {}
        self.pending = 0

    def assign(self, tp: TopicPartition) -> None:
        self._partitions.setdefault(tp, PartitionProgress())

    def revoke(self, tp: TopicPartition) -> None:
        """Forget a partition; chunks still in flight no longer move anything."""
        progress = self._partitions.pop(tp, None)
        if progress is not None:
            for chunk in progress.chunks:
                chunk.released = True
                self.pending -= chunk.pending

    def assigned(self) -> list[TopicPartition]:
        return list(self._partitions)

    def open(self, tp: TopicPartition, start: int, end: int, count: int) -> Chunk:
        """Track a poll's records: offsets [start, end) holding `count` records (gaps are allowed)."""
        progress = self._partitions.get(tp)
        chunk = Chunk(tp, start, end, count, size=count)
        if progress is None:  # not assigned (any more): nothing of it may be committed
            chunk.released = True
            return chunk
        if progress.chunks and start < progress.chunks[-1].end:
            raise ValueError(f"chunk {start}..{end} of {tp} overlaps an open chunk")
        progress.chunks.append(chunk)
        progress.ahead += count
        self.pending += count
        if count == 0:
            self._advance(progress)
        return chunk

    def complete(self, chunk: Chunk, count: int) -> None:
        """`count` more records of `chunk` are done."""
        if not 0 <= count <= chunk.pending:
            raise ValueError(f"completing {count} records of a chunk with {chunk.pending} pending")
        chunk.pending -= count
        if chunk.released:
            return
        self.pending -= count
        if chunk.pending == 0:
            progress = self._partitions.get(chunk.tp)
            if progress is not None:
                self._advance(progress)

    @staticmethod
    def _advance(progress: PartitionProgress) -> None:
        chunks = progress.chunks
        while chunks and chunks[0].pending == 0:
            chunk = chunks.popleft()
            progress.done_up_to = chunk.end
            progress.ahead -= chunk.size

    def watermark_with(self, tp: TopicPartition, extra: dict[Chunk, int]) -> int | None:
        """The committable offset of `tp` if `extra[chunk]` more records of each chunk were done."""
        progress = self._partitions.get(tp)
        if progress is None:
            return None
        mark = progress.done_up_to
        for chunk in progress.chunks:
            if chunk.pending - extra.get(chunk, 0) > 0:
                break
            mark = chunk.end
        return mark

    def ahead(self, tp: TopicPartition) -> int:
        """Records of `tp` consumed since its oldest unfinished record (0 when all are done)."""
        progress = self._partitions.get(tp)
        return 0 if progress is None else progress.ahead

    def done_up_to(self, tp: TopicPartition) -> int | None:
        progress = self._partitions.get(tp)
        return None if progress is None else progress.done_up_to

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now: partitions whose done-watermark moved past the last commit."""
        return {
            tp: p.done_up_to
            for tp, p in self._partitions.items()
            if p.done_up_to is not None and p.done_up_to != p.committed
        }

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            progress = self._partitions.get(tp)
            if progress is not None:
                progress.committed = offset

    def in_flight(self, tp: TopicPartition) -> int:
        """Records of `tp` not done yet."""
        progress = self._partitions.get(tp)
        return 0 if progress is None else sum(c.pending for c in progress.chunks)

    def committed(self, tp: TopicPartition) -> int | None:
        progress = self._partitions.get(tp)
        return None if progress is None else progress.committed
