"""Packs ready events into stream requests of at most `max_events` events and about `max_bytes` bytes.

Pure: the caller passes `now` and gets back the batches that are ready. A batch is ready when it is
full (events or bytes) or, on `flush_due`, when its oldest event has waited `linger` seconds. Events
keep the order in which they were added. Work is per slice of a poll, not per event, wherever the
byte cap allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ingestor.events import Record
    from ingestor.offsets import Chunk

#: Bytes an event may grow by on the way out (derived identifier, timestamp, JSON punctuation).
EVENT_OVERHEAD_BYTES = 96


@dataclass(slots=True, eq=False)
class Batch:
    """One stream request's events, the records they came from, and the chunks to complete."""

    events: list[dict[str, Any]] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    parts: list[tuple[Chunk, int]] = field(default_factory=list)
    nbytes: int = 0
    created: float = 0.0
    attempts: int = 0
    first_failure: float | None = None
    last_failure: float | None = None

    def __len__(self) -> int:
        return len(self.events)

    def oldest_timestamp_ms(self) -> int:
        return min([r.timestamp for r in self.records]) if self.records else 0

    def split(self) -> tuple[Batch, Batch]:
        """Two halves, for bisecting a rejected request; each knows which chunks its records belong to."""
        return self.split_at(len(self.events) // 2)

    def split_at(self, index: int) -> tuple[Batch, Batch]:
        """Events [0, index) and [index, len); either may be empty."""
        return self._sub(0, index), self._sub(index, len(self.events))

    def without(self, drop: Callable[[Chunk], bool]) -> Batch | None:
        """The batch less the events of chunks `drop` selects (None when nothing is left)."""
        if not any(drop(chunk) for chunk, _ in self.parts):
            return self
        kept = Batch(created=self.created, attempts=self.attempts)
        i = 0
        for chunk, count in self.parts:
            if not drop(chunk):
                kept.events.extend(self.events[i : i + count])
                kept.records.extend(self.records[i : i + count])
                kept.parts.append((chunk, count))
            i += count
        if not kept.events:
            return None
        kept.nbytes = sum(len(r.value or b"") + EVENT_OVERHEAD_BYTES for r in kept.records)
        return kept

    def entries(self) -> list[tuple[dict[str, Any], Record, Chunk]]:
        """(event, record, chunk) for every event, in order."""
        out: list[tuple[dict[str, Any], Record, Chunk]] = []
        i = 0
        for chunk, count in self.parts:
            out.extend((self.events[k], self.records[k], chunk) for k in range(i, i + count))
            i += count
        return out

    def _sub(self, lo: int, hi: int) -> Batch:
        """Events [lo, hi) with their parts: `parts` are consecutive runs of the events, in order."""
        n = len(self.events)
        lo = min(max(lo, 0), n)
        hi = min(max(hi, lo), n)
        records = self.records[lo:hi]
        parts: list[tuple[Chunk, int]] = []
        start = 0
        for chunk, count in self.parts:
            overlap = min(hi, start + count) - max(lo, start)
            if overlap > 0:
                parts.append((chunk, overlap))
            start += count
        nbytes = sum(len(r.value or b"") + EVENT_OVERHEAD_BYTES for r in records)
        return Batch(
            self.events[lo:hi],
            records,
            parts,
            nbytes,
            self.created,
            self.attempts,
            self.first_failure,
            self.last_failure,
        )


class Batcher:
    """Accumulates events; hands out full batches at once and partial ones when they have lingered."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._current = Batch()
        self.buffered = 0

    def add(self, chunk: Chunk, events: Sequence[dict[str, Any]], records: Sequence[Record], now: float) -> list[Batch]:
        """Add one poll's valid events (all from `chunk`); return the batches that became full."""
        ready: list[Batch] = []
        i, n = 0, len(events)
        while i < n:
            current = self._current
            if not current.events:
                current.created = now
            take = min(self.max_events - len(current.events), n - i)
            size = sum(len(r.value or b"") for r in records[i : i + take]) + take * EVENT_OVERHEAD_BYTES
            if current.nbytes + size > self.max_bytes:
                take, size = self._fit_bytes(records, i, take, current)
            if take:
                current.events.extend(events[i : i + take])
                current.records.extend(records[i : i + take])
                current.parts.append((chunk, take))
                current.nbytes += size
                self.buffered += take
                i += take
            if len(current.events) >= self.max_events or take == 0 or current.nbytes >= self.max_bytes:
                ready.append(self._take())
        return ready

    def _fit_bytes(self, records: Sequence[Record], i: int, take: int, current: Batch) -> tuple[int, int]:
        """How many of the next records fit the byte cap (at least one into an empty batch)."""
        size = 0
        for k in range(take):
            grown = len(records[i + k].value or b"") + EVENT_OVERHEAD_BYTES
            if current.nbytes + size + grown > self.max_bytes and (k or current.events):
                return k, size
            size += grown
        return take, size

    def _take(self) -> Batch:
        batch, self._current = self._current, Batch()
        self.buffered -= len(batch.events)
        return batch

    def flush_due(self, now: float, linger: float) -> Batch | None:
        """The partial batch, if its first event has waited `linger` seconds."""
        current = self._current
        if current.events and now - current.created >= linger:
            return self._take()
        return None

    def flush(self) -> Batch | None:
        """The partial batch, whatever its age (drain, revoke, shutdown)."""
        return self._take() if self._current.events else None

    def oldest_age(self, now: float) -> float | None:
        return now - self._current.created if self._current.events else None
