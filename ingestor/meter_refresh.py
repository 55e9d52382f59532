"""Unknown event names wait for one catalog refresh before they are dead-lettered as `meter_unknown`.

With INGESTOR_METER_CATALOG=stripe the catalog is re-read every INGESTOR_METER_REFRESH_S (300 s): a meter
created meanwhile would see its first events dead-lettered. Instead, the decoder's `meter_unknown`
rejections are held here (their records stay pending, so no offset moves past them), and the worker
refreshes the catalog, at most once per `MIN_INTERVAL_S`, then decodes the held records again: those
whose meter now exists are billed, the others are dead-lettered as before. The hot path only filters
the (rare) rejections of a poll; known event names never wait.

A record waits for a refresh that started after it was held (`take` hands out only what was held
before the refresh begins), so a meter created before its events were produced is always seen.
Pure: the worker supplies the clock's `now` and runs the refresh.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingestor.errors import Rejection
    from ingestor.events import Record
    from ingestor.offsets import Chunk

#: At most one refresh triggered by unknown event names per this many seconds.
MIN_INTERVAL_S = 10.0
UNKNOWN = "meter_unknown"


class UnknownMeterHold:
    """Records rejected as `meter_unknown`, by chunk, until the next refresh."""

    def __init__(self, min_interval: float = MIN_INTERVAL_S) -> None:
        self.min_interval = min_interval
        self._held: list[tuple[Chunk, list[Record]]] = []
        self._last_refresh = -math.inf
        #: set while records are held
        self.waiting = asyncio.Event()

    def __len__(self) -> int:
        return sum(len(records) for _, records in self._held)

    def hold(self, chunk: Chunk, rejected: list[tuple[Record, Rejection]]) -> list[tuple[Record, Rejection]]:
        """Keep `chunk`'s `meter_unknown` records for the next refresh; return the other rejections."""
        if not any(rejection.reason == UNKNOWN for _, rejection in rejected):
            return rejected
        self._held.append((chunk, [record for record, rejection in rejected if rejection.reason == UNKNOWN]))
        self.waiting.set()
        return [(record, rejection) for record, rejection in rejected if rejection.reason != UNKNOWN]

    def refresh_in(self, now: float) -> float:
        """Seconds until the next refresh may start (≤ 0: now)."""
        return self._last_refresh + self.min_interval - now

    def take(self, now: float) -> list[tuple[Chunk, list[Record]]]:
        """Everything held so far, as a refresh starts at `now` (records held later wait for the next)."""
        taken, self._held = self._held, []
        self.waiting.clear()
        self._last_refresh = now
        return taken
