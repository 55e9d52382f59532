"""Prometheus metrics, on an explicit registry.

Counters and histograms are updated once per batch or request, never per event. Gauges that mirror
the state of a component (budget, session, offsets) are read at scrape time by `StateCollector`, so
they cost nothing on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ingestor import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from prometheus_client.core import Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 5, 10, 25, 50, 75, 90, 99, 100)
BYTES_BUCKETS = (1024, 4096, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)


@dataclass
class Metrics:
    """Every instrument the worker exports. A fresh `Metrics()` has a fresh registry."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        Info("ingestor_build", "Build information.", registry=r).info({"version": __version__})
        self.events_consumed = Counter(
            "ingestor_events_consumed_total", "Kafka records consumed.", ["topic"], registry=r
        )
        self.events_delivered = Counter(
            "ingestor_events_delivered_total", "Events accepted by Stripe (2xx).", ["topic"], registry=r
        )
        self.events_dead_lettered = Counter(
            "ingestor_events_dead_lettered_total",
            "Records written to the dead-letter topic and acked, by reason code.",
            ["topic", "reason"],
            registry=r,
        )
        self.requests = Counter(
            "ingestor_requests_total",
            "Meter event stream requests by outcome and HTTP status (status 0: no response).",
            ["outcome", "status"],
            registry=r,
        )
        self.rate_limited = Counter(
            "ingestor_rate_limited_total",
            "429 answers by Stripe-Rate-Limited-Reason (none: a 429 without the header, e.g. lock_timeout).",
            ["reason"],
            registry=r,
        )
        self.retries = Counter("ingestor_retries_total", "Stream requests retried, by cause.", ["cause"], registry=r)
        self.request_duration = Histogram(
            "ingestor_request_duration_seconds",
            "Duration of one meter event stream request.",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ingestor_batch_size_events", "Events per stream request.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_bytes = Histogram(
            "ingestor_batch_size_bytes", "Body bytes per stream request.", buckets=BYTES_BUCKETS, registry=r
        )
        self.requests_in_flight = Gauge(
            "ingestor_requests_in_flight", "Stream requests currently in flight.", registry=r
        )
        self.end_to_end_latency = Histogram(
            "ingestor_end_to_end_latency_seconds",
            "Record timestamp to acceptance by Stripe, observed once per request for its oldest event.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dlq_write_failures = Counter(
            "ingestor_dlq_write_failures_total",
            "Failed attempts to write a dead-letter record (the record is retried, never dropped).",
            registry=r,
        )
        self.bisections = Counter(
            "ingestor_bisections_total", "Rejected stream requests split to isolate bad events.", registry=r
        )
        self.commits = Counter("ingestor_commits_total", "Offset commits by outcome.", ["outcome"], registry=r)
        self.rebalances = Counter("ingestor_rebalances_total", "Partition assignment changes.", ["kind"], registry=r)
        self.webhook_events = Counter(
            "ingestor_webhook_events_total",
            "Stripe webhook deliveries received, by event type and outcome.",
            ["type", "outcome"],
            registry=r,
        )
        self.error_report_records = Counter(
            "ingestor_error_report_records_total",
            "Identifiers from Stripe error reports written to the error-report topic, by error code.",
            ["code"],
            registry=r,
        )

        self.adjustments = Counter(
            "ingestor_adjustments_total",
            "Cancellation requests (meter event adjustments) by outcome and HTTP status (status 0: no response).",
            ["outcome", "status"],
            registry=r,
        )
        self.adjustment_duration = Histogram(
            "ingestor_adjustment_duration_seconds",
            "Duration of one meter event adjustment request.",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )

    def export_state(
        self,
        name: str,
        help_text: str,
        sampler: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
        labels: tuple[str, ...] = (),
        *,
        counter: bool = False,
    ) -> None:
        """Export a gauge (or counter) whose samples are read from live state at scrape time."""
        self.registry.register(StateCollector(name, help_text, sampler, labels, counter=counter))


class StateCollector:
    """A gauge family computed at scrape time from a sampler function."""

    def __init__(
        self,
        name: str,
        help_text: str,
        sampler: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
        labels: tuple[str, ...] = (),
        *,
        counter: bool = False,
    ) -> None:
        self._name = name.removesuffix("_total") if counter else name
        self._help = help_text
        self._labels = list(labels)
        self._sampler = sampler
        self._counter = counter

    def _family(self) -> GaugeMetricFamily | CounterMetricFamily:
        kind = CounterMetricFamily if self._counter else GaugeMetricFamily
        return kind(self._name, self._help, labels=self._labels)

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for label_values, value in self._sampler():
            family.add_metric(list(label_values), value)
        yield family
