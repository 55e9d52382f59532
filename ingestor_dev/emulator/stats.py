"""Counters for the emulator's statistics endpoint (cheap to update on the hot path)."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

from ingestor_dev.emulator.windows import SlidingWindowMax

RESET = "reset"


@dataclass(slots=True)
class Stats:
    record_latency: bool = False
    requests: dict[tuple[str, int | str], int] = field(default_factory=dict)
    events_received: int = 0
    events_accepted: int = 0
    duplicates_dropped: int = 0
    events_valid: int = 0
    events_invalid: int = 0
    events_cancelled: int = 0
    max_events_per_request: int = 0
    rate_limited: int = 0
    faults_injected: int = 0
    webhooks_sent: int = 0
    webhooks_failed: int = 0
    stream_window: SlidingWindowMax = field(default_factory=SlidingWindowMax)
    latencies: array[float] = field(default_factory=lambda: array("d"))

    def count_request(self, route: str, status: int | str) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def requests_json(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for (route, status), count in sorted(self.requests.items(), key=lambda item: (item[0][0], str(item[0][1]))):
            result.setdefault(route, {})[str(status)] = count
        return result

    def latency_json(self) -> dict[str, float] | None:
        if not self.record_latency:
            return None
        return latency_percentiles(self.latencies)

    def to_json(self) -> dict[str, Any]:
        window = self.stream_window
        return {
            "requests": self.requests_json(),
            "events_received": self.events_received,
            "events_accepted": self.events_accepted,
            "duplicates_dropped": self.duplicates_dropped,
            "events_valid": self.events_valid,
            "events_invalid": self.events_invalid,
            "events_cancelled": self.events_cancelled,
            "max_events_per_request": self.max_events_per_request,
            "rate_limited": self.rate_limited,
            "faults_injected": self.faults_injected,
            "webhooks_sent": self.webhooks_sent,
            "webhooks_failed": self.webhooks_failed,
            "stream_requests": sum(window.per_second.values()),
            "stream_max_requests_per_1s_window": window.max_count,
            "stream_requests_per_second": {str(second): n for second, n in sorted(window.per_second.items())},
            "latency_ms": self.latency_json(),
        }


def latency_percentiles(seconds: array[float]) -> dict[str, float]:
    """p50/p90/p99 (nearest rank) and max in milliseconds; zeros when empty."""
    if not seconds:
        return {"count": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(seconds)
    last = len(ordered) - 1

    def rank(fraction: float) -> float:
        return round(ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] * 1000.0, 3)

    return {
        "count": len(ordered),
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": round(ordered[last] * 1000.0, 3),
    }
