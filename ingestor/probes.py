"""What the worker watches and exports: the Kafka probe, the facts health judges, lag, and the state
families /metrics reads at scrape time.

- `kafka_probe_loop`: readiness needs Kafka reachable, a metadata round trip every few seconds.
- `HealthObserver`: after each commit tick, the facts `HealthState` judges (last delivery, a valid
  session, lag appearing, each partition's commit moving).
- `Lags`: records behind each partition's end (from its committed offset, or from the first offset
  consumed since its assignment before a first commit).
- `export_core_state` binds the state families to what exists from the worker's creation (offsets, the
  budget, health); `export_started_state` binds the rest once the worker started (session, lag, pauses,
  dead letters, adjustments, the exchange). Until then they report what a worker not started has: 0, or no
  sample for the session's expiry.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiokafka.errors import KafkaError

from ingestor.demand import Mode

if TYPE_CHECKING:
    from collections.abc import Callable

    from ingestor.clock import Clock
    from ingestor.consumer_loop import ConsumerLoop
    from ingestor.metrics import Samples, WorkerState
    from ingestor.observability import HealthState
    from ingestor.offsets import OffsetTracker, TopicPartition
    from ingestor.partition_health import PartitionWatch
    from ingestor.startup import WorkerCore, WorkerParts

log = logging.getLogger("ingestor.probes")

KAFKA_PROBE_INTERVAL_S = 5.0
KAFKA_PROBE_TIMEOUT_S = 10.0


async def kafka_probe_loop(consumer: Any, health: HealthState) -> None:
    """Readiness needs Kafka reachable: a metadata round trip every few seconds."""
    while True:
        try:
            await asyncio.wait_for(consumer.topics(), KAFKA_PROBE_TIMEOUT_S)
        except (KafkaError, TimeoutError, OSError) as exc:
            if health.kafka_ok:
                log.warning("Kafka unreachable", extra={"error": repr(exc)})
            health.kafka_ok = False
        else:
            health.kafka_ok = True
        await asyncio.sleep(KAFKA_PROBE_INTERVAL_S)


class HealthObserver:
    """Keeps the facts of `HealthState` current (called after every commit tick)."""

    def __init__(self, core: WorkerCore, parts: WorkerParts, clock: Clock) -> None:
        self.health = core.health
        self.tracker = core.tracker
        self.partition_watch = core.partition_watch
        self.delivery = parts.delivery
        self.sessions = parts.sessions
        self.clock = clock

    def observe(self) -> None:
        health = self.health
        health.last_progress = max(health.last_progress, self.delivery.last_delivery)
        expiry = self.sessions.seconds_until_expiry(self.clock.monotonic())
        health.stripe_ok = expiry is not None and expiry > 0
        health.stuck_for()  # notices lag appearing even when nobody probes
        tracker = self.tracker
        marks = {tp: (tracker.done_up_to(tp), tracker.in_flight(tp)) for tp in tracker.assigned()}
        self.partition_watch.observe(marks, self.clock.monotonic())


def stalled_partition(watch: PartitionWatch, clock: Clock) -> Callable[[], tuple[str, float] | None]:
    """The partition stalled longest, for /readyz: ("topic/partition", seconds), or None."""

    def worst() -> tuple[str, float] | None:
        tp, seconds = watch.worst(clock.monotonic())
        return None if tp is None else (f"{tp.topic}/{tp.partition}", seconds)

    return worst


class Lags:
    """Records behind each assigned partition's end."""

    def __init__(self, consumer: Any, tracker: OffsetTracker, first_offsets: dict[TopicPartition, int]) -> None:
        self._consumer = consumer
        self._tracker = tracker
        self._first_offsets = first_offsets

    def __call__(self) -> dict[TopicPartition, int]:
        out: dict[TopicPartition, int] = {}
        for tp in self._tracker.assigned():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            base = self._tracker.committed(tp)
            if base is None:
                base = self._first_offsets.get(tp, high)
            out[tp] = max(0, high - base)
        return out

    def total(self) -> int:
        return sum(self().values())


def _one(value: float) -> Samples:
    return [((), float(value))]


def _per_partition(values: dict[TopicPartition, Any]) -> Samples:
    return [((tp.topic, str(tp.partition)), float(v)) for tp, v in values.items()]


def export_core_state(state: WorkerState, core: WorkerCore, clock: Clock) -> None:
    """Bind every state family: to the core, or to what a worker not started yet reports."""
    tracker, budget, health, now = core.tracker, core.budget, core.health, clock.monotonic

    def committed() -> dict[TopicPartition, int]:
        out = {}
        for tp in tracker.assigned():
            value = tracker.committed(tp)
            if value is not None:
                out[tp] = value
        return out

    state.budget_demand.read_from(lambda: _one(0))
    state.budget_granted.read_from(lambda: _one(budget.quota))
    state.exchange_members.read_from(lambda: _one(1))
    state.exchange_fallback.read_from(lambda: _one(0))
    state.consumer_lag.read_from(lambda: ())
    state.partition_stalled.read_from(lambda: _per_partition(core.partition_watch.stalled(now())))
    state.partition_ahead.read_from(lambda: _per_partition({tp: tracker.ahead(tp) for tp in tracker.assigned()}))
    state.committed_offset.read_from(lambda: _per_partition(committed()))
    state.partitions_assigned.read_from(lambda: _one(len(tracker.assigned())))
    state.partitions_paused.read_from(lambda: _one(0))
    state.buffered_events.read_from(lambda: _one(tracker.pending))
    state.last_progress_age.read_from(lambda: _one(health.progress_age()))
    state.ready.read_from(lambda: _one(health.readiness()[0]))
    state.session_expiry.read_from(lambda: ())
    state.session_rotations.read_from(lambda: _one(0))
    state.session_refresh_failures.read_from(lambda: _one(0))
    state.budget_rate.read_from(lambda: _one(budget.rate))
    state.budget_total.read_from(lambda: _one(budget.total_rps))
    state.budget_share.read_from(lambda: _one(budget.share))
    state.budget_factor.read_from(lambda: _one(budget.factor))
    state.budget_utilization.read_from(lambda: _one(budget.utilization(now())))
    state.budget_saturated.read_from(lambda: _one(budget.saturated(now())))
    state.budget_wait.read_from(lambda: _one(budget.waited_seconds_total))
    state.adjustments_pending.read_from(lambda: _one(0))
    state.dlq_backlog.read_from(lambda: _one(0))


def export_started_state(
    state: WorkerState, parts: WorkerParts, consumer_loop: ConsumerLoop, lags: Lags, clock: Clock
) -> None:
    """Bind the state families whose sources exist once the worker started."""
    sessions, adjuster, dead_letters, exchange = parts.sessions, parts.adjuster, parts.dead_letters, parts.exchange

    def expiry() -> Samples:
        left = sessions.seconds_until_expiry(clock.monotonic())
        return [] if left is None else _one(left)

    if exchange is not None:
        state.budget_demand.read_from(lambda: _one(exchange.demand))
        state.exchange_members.read_from(lambda: _one(exchange.decision.members))
        state.exchange_fallback.read_from(lambda: _one(exchange.decision.mode is not Mode.EXCHANGE))
    state.consumer_lag.read_from(lambda: _per_partition(lags()))
    state.partitions_paused.read_from(lambda: _one(consumer_loop.partitions_paused()))
    state.session_expiry.read_from(expiry)
    state.session_rotations.read_from(lambda: _one(sessions.rotations_total))
    state.session_refresh_failures.read_from(lambda: _one(sessions.refresh_failures_total))
    state.adjustments_pending.read_from(lambda: _one(adjuster.pending))
    state.dlq_backlog.read_from(lambda: _one(dead_letters.backlog))
