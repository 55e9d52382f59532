"""Meter event summaries (pure): aggregation formulas, event time windows, grouping windows.

- `count` counts events, `sum` adds their values, `last` takes the value of the most recent event
  (latest `timestamp`; a tie goes to the later arrival). An empty range aggregates to 0.
- With a meter `event_time_window` (`hour`/`day`), events are pre-aggregated by the sender: within
  each UTC window only the most recent event counts (the same tie rule), the rest are replaced.
- A summary covers `[start_time, end_time)`; with `value_grouping_window` the range is cut into
  UTC hours or days and one summary is returned per window, oldest first, empty windows included.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

Formula = Literal["count", "sum", "last"]
Window = Literal["hour", "day"]

MINUTE = 60
WINDOW_SECONDS: dict[str, int] = {"hour": 3600, "day": 86400}


@dataclass(frozen=True, slots=True)
class Summary:
    start_time: int
    end_time: int
    aggregated_value: int


def latest_per_window(events: Iterable[tuple[float, int]], window: Window) -> list[tuple[float, int]]:
    """Keep only the most recent event of each UTC window; input is in arrival order."""
    width = WINDOW_SECONDS[window]
    latest: dict[int, tuple[float, int]] = {}
    for timestamp, value in events:
        key = int(timestamp // width)
        kept = latest.get(key)
        if kept is None or timestamp >= kept[0]:
            latest[key] = (timestamp, value)
    return list(latest.values())


def aggregate(ordered: Sequence[tuple[float, int]], formula: Formula) -> int:
    """Aggregate events already sorted by (timestamp, arrival)."""
    if not ordered:
        return 0
    if formula == "count":
        return len(ordered)
    if formula == "sum":
        return sum(value for _, value in ordered)
    return ordered[-1][1]


def grouping_bounds(start: int, end: int, grouping: Window | None) -> list[tuple[int, int]]:
    if grouping is None:
        return [(start, end)]
    width = WINDOW_SECONDS[grouping]
    return [(low, min(low + width, end)) for low in range(start, end, width)]


@dataclass(frozen=True, slots=True)
class Query:
    start: int
    end: int
    grouping: Window | None = None


def summarize(
    events: Iterable[tuple[float, int]], formula: Formula, query: Query, event_time_window: Window | None = None
) -> list[Summary]:
    """Summaries of one customer's events on one meter; `events` are (timestamp, value) in arrival order."""
    start, end, grouping = query.start, query.end, query.grouping
    kept = latest_per_window(events, event_time_window) if event_time_window else list(events)
    # A stable sort keeps arrival order among equal timestamps, so `last` picks the later arrival.
    kept.sort(key=lambda event: event[0])
    times = [timestamp for timestamp, _ in kept]
    summaries = []
    for low, high in grouping_bounds(start, end, grouping):
        chunk = kept[bisect_left(times, low) : bisect_left(times, high)]
        summaries.append(Summary(low, high, aggregate(chunk, formula)))
    return summaries


def check_range(start: int, end: int, grouping: Window | None) -> str | None:
    """Why the query range is invalid, or None."""
    if start % MINUTE or end % MINUTE:
        return "start_time and end_time must be aligned with minute boundaries."
    if end <= start:
        return "end_time must be after start_time."
    if grouping is not None:
        width = WINDOW_SECONDS[grouping]
        if start % width or end % width:
            return f"start_time and end_time must be aligned with {grouping} boundaries for this grouping."
    return None
