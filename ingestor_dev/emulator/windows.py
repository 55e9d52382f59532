"""Per-second windows (pure, all take `now`): the fixed-window rate limiter and the sliding-window
maximum reported in the statistics."""

from __future__ import annotations

import heapq
import math
from collections import deque


class FixedWindowLimiter:
    """At most `limit` requests per key in each 1-second window `[n, n + 1)` of the clock.

    `limit == 0` means unlimited. Rejected requests do not consume the window's budget. Arrivals may
    come a little out of order (stamped by the wire tap, see `arrival`): each counts in its own second,
    for the last `KEPT_SECONDS` seconds.
    """

    __slots__ = ("_counts", "_latest")

    KEPT_SECONDS = 10

    def __init__(self) -> None:
        self._latest = -1
        self._counts: dict[int, dict[str, int]] = {}

    def allow(self, key: str, limit: int, now: float) -> bool:
        if limit <= 0:
            return True
        second = int(now)
        counts = self._counts.get(second)
        if counts is None:
            counts = self._counts[second] = {}
            if second > self._latest:
                self._latest = second
                for old in [s for s in self._counts if s <= second - self.KEPT_SECONDS]:
                    del self._counts[old]
        used = counts.get(key, 0)
        if used >= limit:
            return False
        counts[key] = used + 1
        return True


class SlidingWindowMax:
    """The most arrivals within any half-open interval of length `width` (`[t, t + width)`).

    Also keeps per-second counts keyed by the whole second of each arrival. Arrivals may come out of
    order by up to `REORDER_S` (several connections, stamped by the wire tap: see `arrival`): they are
    held that long and counted in time order; one later still counts as if it arrived with the last one
    counted.
    """

    __slots__ = ("_held", "_last", "_latest", "_max", "_recent", "per_second", "width")

    REORDER_S = 0.5

    def __init__(self, width: float = 1.0) -> None:
        self.width = width
        self._recent: deque[float] = deque()
        self._held: list[float] = []
        self._latest = -math.inf
        self._last = -math.inf
        self._max = 0
        self.per_second: dict[int, int] = {}

    def add(self, now: float) -> None:
        second = int(now)
        self.per_second[second] = self.per_second.get(second, 0) + 1
        heapq.heappush(self._held, now)
        self._latest = max(self._latest, now)
        edge = self._latest - self.REORDER_S
        while self._held and self._held[0] <= edge:
            self._count(heapq.heappop(self._held))

    def _count(self, moment: float) -> None:
        self._last = moment = max(moment, self._last)
        self._max = max(self._max, _slide(self._recent, moment, self.width))

    @property
    def max_count(self) -> int:
        """The most arrivals in any window so far, the held ones included."""
        if not self._held:
            return self._max
        recent, best, last = deque(self._recent), self._max, self._last
        for moment in sorted(self._held):
            last = max(last, moment)
            best = max(best, _slide(recent, last, self.width))
        return best


def _slide(recent: deque[float], moment: float, width: float) -> int:
    """Append ``moment`` (≥ every element) and drop what is ``width`` or more older; the count left."""
    recent.append(moment)
    edge = moment - width
    while recent[0] <= edge:
        recent.popleft()
    return len(recent)


def max_in_window(arrivals: list[float], width: float = 1.0) -> int:
    """Reference implementation of `SlidingWindowMax.max_count` for tests: O(n log n)."""
    ordered = sorted(arrivals)
    best = 0
    start = 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - width:
            start += 1
        best = max(best, end - start + 1)
    return best
