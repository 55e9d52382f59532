"""Per-partition stall detection: one partition whose commit cannot move, while the others flow.

A worker-wide "no progress" check misses one stuck partition: deliveries on the others keep it green.
`PartitionWatch` remembers, per partition, since when its commit watermark has stood still while it
had records pending. The worker feeds it every commit interval; readiness fails and
`ingestor_partition_stalled_seconds{topic,partition}` rises (the `IngestorPartitionStuck` alert names the
partition) once one stalls for INGESTOR_STUCK_AFTER_S. Pure: it takes `now`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ingestor.offsets import TopicPartition


class PartitionWatch:
    """Since when each partition's watermark has not moved while it had pending records."""

    def __init__(self) -> None:
        self._since: dict[TopicPartition, tuple[int | None, float]] = {}

    def observe(self, marks: Mapping[TopicPartition, tuple[int | None, int]], now: float) -> None:
        """`marks`: every assigned partition -> (its done-watermark, its records still pending)."""
        for tp in [tp for tp in self._since if tp not in marks]:
            del self._since[tp]
        for tp, (mark, pending) in marks.items():
            seen = self._since.get(tp)
            if pending == 0:
                self._since.pop(tp, None)
            elif seen is None or seen[0] != mark:
                self._since[tp] = (mark, now)

    def stalled(self, now: float) -> dict[TopicPartition, float]:
        """Seconds each partition with pending records has been without a watermark move."""
        return {tp: now - since for tp, (_, since) in self._since.items()}

    def worst(self, now: float) -> tuple[TopicPartition | None, float]:
        stalled = self.stalled(now)
        if not stalled:
            return None, 0.0
        tp = max(stalled, key=stalled.__getitem__)
        return tp, stalled[tp]
