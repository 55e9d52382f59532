"""Per-second windows (pure, all take `now`): the fixed-window rate limiter and the sliding-window
maximum reported in the statistics."""

from __future__ import annotations

from collections import deque


class FixedWindowLimiter:
    """At most `limit` requests per key in each 1-second window `[n, n + 1)` of the clock.

    `limit == 0` means unlimited. Rejected requests do not consume the window's budget.
    """

    __slots__ = ("_counts", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._counts: dict[str, int] = {}

    def allow(self, key: str, limit: int, now: float) -> bool:
        if limit <= 0:
            return True
        second = int(now)
        if second != self._second:
            self._second = second
            self._counts = {}
        used = self._counts.get(key, 0)
        if used >= limit:
            return False
        self._counts[key] = used + 1
        return True


class SlidingWindowMax:
    """The most arrivals within any half-open interval of length `width` (`[t, t + width)`).

    Arrivals must be fed in non-decreasing time order. Also keeps per-second counts keyed by the
    whole second of each arrival.
    """

    __slots__ = ("_recent", "max_count", "per_second", "width")

    def __init__(self, width: float = 1.0) -> None:
        self.width = width
        self._recent: deque[float] = deque()
        self.max_count = 0
        self.per_second: dict[int, int] = {}

    def add(self, now: float) -> None:
        recent = self._recent
        recent.append(now)
        edge = now - self.width
        while recent[0] <= edge:
            recent.popleft()
        self.max_count = max(self.max_count, len(recent))
        second = int(now)
        self.per_second[second] = self.per_second.get(second, 0) + 1


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
