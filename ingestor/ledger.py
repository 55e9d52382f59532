"""What Stripe should bill: decoded usage events folded into totals per (meter, customer), as Stripe folds them.

Pure (no I/O, no clock): `ingestor audit` feeds it the events it reads back from the source topics.

- De-duplication by identifier, within Stripe's rolling 24 hours: the first arrival of an identifier
  counts, later ones within 24 hours (by the records' Kafka timestamps, standing in for arrival) do not.
  Only identifiers of the last 24 hours are kept (as hashes), so memory does not grow with the range.
- Cancellations: an event whose identifier is in `cancelled` (cancellations Stripe accepted) is left out.
- Formulas: `sum` adds values, `count` counts events, `last` takes the value of the event with the latest
  timestamp (a tie goes to the later arrival: here, the later read).
- `event_time_window` (`hour`, `day`): within each UTC window only the most recent event counts, then the
  formula applies to those events.
- Range: events count when their timestamp is in [start, end) (Stripe's summaries: unix seconds aligned to
  minutes, start inclusive, end exclusive). For windowed meters, events outside the range are still kept per
  window, since the most recent event of a window that straddles a bound decides whether an event within
  the range counts.

Memory is one entry per (meter, customer) — per (meter, customer, window) for windowed meters — plus the
identifier hashes of the last 24 hours.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from ingestor.catalog import Meter

HORIZON_S: Final = 24 * 3600
HOUR_S: Final = 3600
WINDOW_S: Final = {"hour": 3600, "day": 86400}
_SECOND_CACHE_LIMIT: Final = 65536


@dataclass(slots=True)
class Counts:
    """What the ledger did with what it was given."""

    events: int = 0
    counted: int = 0
    duplicates: int = 0
    cancelled: int = 0
    out_of_range: int = 0
    unknown_meter: int = 0


class Ledger:
    """Expected totals per (event_name, customer)."""

    def __init__(self, meters: Iterable[Meter], start: int, end: int, cancelled: set[str]) -> None:
        self._meters: Mapping[str, Meter] = {m.event_name: m for m in meters}
        self.start, self.end = start, end
        self._cancelled = cancelled
        #: hash(identifier) -> hour of arrival (the same int object for a whole hour)
        self._seen: dict[int, int] = {}
        self._hours: dict[int, int] = {}
        self._pruned_at = -1
        self._plain: dict[tuple[str, str], int] = {}
        #: (event_name, customer) or (event_name, customer, window) -> (timestamp ms, order, value)
        self._latest: dict[tuple[Any, ...], tuple[int, int, int]] = {}
        self._order = 0
        self._seconds: dict[str, int] = {}
        self.counts = Counts()

    def add(self, event: dict[str, Any], arrival_ms: int) -> None:
        """One decoded event (`ingestor.events.Decoder` output), received at `arrival_ms`."""
        counts = self.counts
        counts.events += 1
        if self._duplicate(event["identifier"], arrival_ms):
            counts.duplicates += 1
            return
        meter = self._meters.get(event["event_name"])
        if meter is None:
            counts.unknown_meter += 1
            return
        payload = event["payload"]
        customer = payload[meter.customer_key]
        if event["identifier"] in self._cancelled:
            counts.cancelled += 1
            self._plain.setdefault((meter.event_name, customer), 0)  # seen: expected 0 if all were cancelled
            return
        ts = self._timestamp_ms(event["timestamp"])
        value = 1 if meter.formula == "count" else int(payload.get(meter.value_key) or 0)
        window = meter.event_time_window
        if window is not None:
            self._keep_latest((meter.event_name, customer, ts // (WINDOW_S[window] * 1000)), ts, value)
            return
        if not self.start * 1000 <= ts < self.end * 1000:
            counts.out_of_range += 1
            return
        counts.counted += 1
        key = (meter.event_name, customer)
        if meter.formula == "last":
            self._keep_latest(key, ts, value)
        else:
            self._plain[key] = self._plain.get(key, 0) + value

    def totals(self) -> dict[tuple[str, str], int]:
        """Expected total per (event_name, customer), for every pair seen (0 when all was cancelled)."""
        out: dict[tuple[str, str], int] = dict(self._plain)
        low, high = self.start * 1000, self.end * 1000
        last: dict[tuple[str, str], tuple[int, int, int]] = {}
        for key, kept in self._latest.items():
            name, customer = key[0], key[1]
            pair = (name, customer)
            out.setdefault(pair, 0)
            meter = self._meters[name]
            if len(key) == 3 and not low <= kept[0] < high:
                continue
            if meter.formula == "last":
                if pair not in last or kept[:2] > last[pair][:2]:
                    last[pair] = kept
            else:
                out[pair] += kept[2]
        for pair, kept in last.items():
            out[pair] = kept[2]
        return out

    def meter(self, event_name: str) -> Meter:
        return self._meters[event_name]

    # -- internals ---------------------------------------------------------------------------------------

    def _keep_latest(self, key: tuple[Any, ...], ts: int, value: int) -> None:
        self._order += 1
        kept = self._latest.get(key)
        if kept is None or ts >= kept[0]:
            self._latest[key] = (ts, self._order, value)

    def _duplicate(self, identifier: str, arrival_ms: int) -> bool:
        hour = arrival_ms // (HOUR_S * 1000)
        shared = self._hours.get(hour)
        if shared is None:
            shared = self._hours[hour] = hour
            self._prune(hour)
        key = hash(identifier)
        seen = self._seen.get(key)
        if seen is not None and hour - seen <= HORIZON_S // HOUR_S:
            return True
        self._seen[key] = shared
        return False

    def _prune(self, hour: int) -> None:
        """Forget identifiers older than the horizon (an hour late at most: Stripe's window is rolling)."""
        if hour <= self._pruned_at:
            return
        self._pruned_at = hour
        oldest = hour - HORIZON_S // HOUR_S - 1
        if any(h < oldest for h in self._hours):
            self._seen = {k: h for k, h in self._seen.items() if h >= oldest}
            self._hours = {h: v for h, v in self._hours.items() if h >= oldest}

    def _timestamp_ms(self, text: str) -> int:
        """`YYYY-MM-DDTHH:MM:SS.mmmZ` (the decoder's output) -> unix milliseconds; one parse per second."""
        second = text[:19]
        base = self._seconds.get(second)
        if base is None:
            if len(self._seconds) >= _SECOND_CACHE_LIMIT:
                self._seconds.clear()
            base = self._seconds[second] = calendar.timegm(time.strptime(second, "%Y-%m-%dT%H:%M:%S")) * 1000
        return base + int(text[20:23])
