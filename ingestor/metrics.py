"""Prometheus metrics, on an explicit registry.

Counters and histograms are updated once per batch or request, never per event. Gauges that mirror
the state of a component (budget, session, offsets) are read at scrape time by `StateCollector`, so
they cost nothing on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ingestor import __version__

if TYPE_CHECKING:
    from collections.abc import Iterator

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
        self, name: str, help_text: str, labels: tuple[str, ...] = (), *, counter: bool = False
    ) -> StateCollector:
        """Export a gauge (or counter) whose samples are read from live state at scrape time; the returned
        handle is told where to read them (`read_from`). Until then it has no samples."""
        collector = StateCollector(name, help_text, labels, counter=counter)
        self.registry.register(collector)
        return collector


#: What a state family reads at scrape time: (label values, value) pairs.
Samples = Iterable[tuple[tuple[str, ...], float]]
Sampler = Callable[[], Samples]
PARTITION_LABELS = ("topic", "partition")


def _no_samples() -> Samples:
    return ()


class StateCollector:
    """A gauge family computed at scrape time from a sampler function."""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (), *, counter: bool = False) -> None:
        self._name = name.removesuffix("_total") if counter else name
        self._help = help_text
        self._labels = list(labels)
        self._sampler: Sampler = _no_samples
        self._counter = counter

    def read_from(self, sampler: Sampler) -> None:
        """Read the family's samples from `sampler` from now on (a source that exists only once the worker
        started replaces the stand-in that reports what a worker not started yet has)."""
        self._sampler = sampler

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


@dataclass(frozen=True)
class WorkerState:
    """The worker's state families, one typed handle each (a misspelt family is a type error). Their names,
    help and labels are here, with every other family; what they read is the worker's (`ingestor.probes`)."""

    budget_demand: StateCollector
    budget_granted: StateCollector
    exchange_members: StateCollector
    exchange_fallback: StateCollector
    consumer_lag: StateCollector
    partition_stalled: StateCollector
    partition_ahead: StateCollector
    committed_offset: StateCollector
    partitions_assigned: StateCollector
    partitions_paused: StateCollector
    buffered_events: StateCollector
    last_progress_age: StateCollector
    ready: StateCollector
    session_expiry: StateCollector
    session_rotations: StateCollector
    session_refresh_failures: StateCollector
    budget_rate: StateCollector
    budget_total: StateCollector
    budget_share: StateCollector
    budget_factor: StateCollector
    budget_utilization: StateCollector
    budget_saturated: StateCollector
    budget_wait: StateCollector
    adjustments_pending: StateCollector
    dlq_backlog: StateCollector

    @classmethod
    def register(cls, metrics: Metrics) -> WorkerState:
        """Register every state family on `metrics`' registry (in the order /metrics lists them)."""
        m, partition = metrics, PARTITION_LABELS
        return cls(
            budget_demand=m.export_state(
                "ingestor_budget_demand_requests_per_second",
                "This replica's demand as published to the exchange: requests/s it could use.",
            ),
            budget_granted=m.export_state(
                "ingestor_budget_granted_requests_per_second",
                "Requests this replica may send in any 1-second window (its grant, or its fallback share).",
            ),
            exchange_members=m.export_state(
                "ingestor_budget_exchange_members",
                "Replicas in this replica's picture of the demand exchange, itself included.",
            ),
            exchange_fallback=m.export_state(
                "ingestor_budget_exchange_fallback",
                "1 when cut off from the demand exchange (leaving it, or paced at owned/all partitions).",
            ),
            consumer_lag=m.export_state(
                "ingestor_consumer_lag_records", "Records behind the partition's end.", partition
            ),
            partition_stalled=m.export_state(
                "ingestor_partition_stalled_seconds",
                "Seconds the partition's commit has not moved while it had records pending.",
                partition,
            ),
            partition_ahead=m.export_state(
                "ingestor_partition_ahead_records",
                "Records consumed past the partition's oldest unfinished record.",
                partition,
            ),
            committed_offset=m.export_state("ingestor_committed_offset", "Last committed offset.", partition),
            partitions_assigned=m.export_state("ingestor_partitions_assigned", "Partitions this replica owns."),
            partitions_paused=m.export_state("ingestor_partitions_paused", "Partitions paused for backpressure."),
            buffered_events=m.export_state("ingestor_buffered_events", "Records consumed and not yet done."),
            last_progress_age=m.export_state(
                "ingestor_last_progress_age_seconds", "Seconds since the last delivery or commit."
            ),
            ready=m.export_state("ingestor_ready", "1 when /readyz passes."),
            session_expiry=m.export_state(
                "ingestor_session_expiry_seconds", "Seconds until the session token expires."
            ),
            session_rotations=m.export_state(
                "ingestor_session_rotations_total", "Session tokens created.", counter=True
            ),
            session_refresh_failures=m.export_state(
                "ingestor_session_refresh_failures_total", "Failed session creations.", counter=True
            ),
            budget_rate=m.export_state("ingestor_budget_requests_per_second", "This replica's current pace."),
            budget_total=m.export_state(
                "ingestor_budget_total_requests_per_second", "The account's budget, all replicas."
            ),
            budget_share=m.export_state("ingestor_budget_share_ratio", "This replica's share of the budget."),
            budget_factor=m.export_state("ingestor_budget_factor_ratio", "Backoff factor after 429s (1: none)."),
            budget_utilization=m.export_state(
                "ingestor_budget_utilization_ratio", "Requests sent / allowed, last 10 s."
            ),
            budget_saturated=m.export_state(
                "ingestor_budget_saturated", "1 when the budget, not the worker, limits throughput."
            ),
            budget_wait=m.export_state(
                "ingestor_budget_wait_seconds_total", "Time requests waited for the budget.", counter=True
            ),
            adjustments_pending=m.export_state(
                "ingestor_adjustments_pending",
                "Cancellations consumed and not yet done (waiting for earlier records of their partition, "
                "or in flight).",
            ),
            dlq_backlog=m.export_state(
                "ingestor_dlq_backlog_records",
                "Dead-letter records not written yet (transactional: until the commit that passes them).",
            ),
        )
