"""The emulator's in-memory state: meters, sessions, accepted events, validation, reports.

Accepting a stream request only de-duplicates identifiers and queues the batch (`pending`);
`flush()` validates the queue against the meters, stores valid events under their meter and turns
failures into error reports. The server flushes every `validation_interval` seconds, and every read
(statistics, summaries, events, reports) and every meter change flushes first, so what is read is
exact and deterministic: events are validated against the meters as they were when the events
arrived.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass, field
from itertools import repeat
from operator import sub
from typing import TYPE_CHECKING, Any

from ingestor_dev.emulator.errors import ApiError, invalid
from ingestor_dev.emulator.idempotency import IdempotencyStore
from ingestor_dev.emulator.limits import CANCEL_WINDOW_S, DEDUP_WINDOW_S
from ingestor_dev.emulator.meters import Meter, MeterRegistry
from ingestor_dev.emulator.reports import Failure, build_reports
from ingestor_dev.emulator.sessions import SessionStore
from ingestor_dev.emulator.stats import Stats
from ingestor_dev.emulator.validation import (
    Problem,
    check_customer_known,
    check_event,
    check_timestamp,
    columns_valid,
    decode_columns,
    event_value,
    no_meter_problem,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ingestor_dev.emulator.config import Clock, EmulatorConfig
    from ingestor_dev.emulator.ids import IdFactory
    from ingestor_dev.emulator.stream_body import EventBatch, SingleEvent


@dataclass(slots=True)
class ModeState:
    """Everything that belongs to one mode (test or live) of the account."""

    meters: MeterRegistry = field(default_factory=MeterRegistry)
    #: identifiers accepted within the de-duplication window (a set: half the memory traffic of a
    #: dict per lookup; the CLI raises the collector's thresholds so full collections, which walk
    #: it, stay rare). It still pauses the event loop when it grows: every entry is rehashed (measured
    #: 0.05-0.25 s at 1.3 million entries, 0.1-0.4 s at 2.5 million, 1.2 s at 5 million on a busy
    #: machine), and in-process, under the default thresholds, full collections walk it (0.26 s at
    #: 5 million). Sharded dicts the collector does not walk removed both pauses but cost 3-5 times the
    #: CPU per request here; arrival is measured around the pauses instead (`arrival`, the wire tap).
    seen: set[str] = field(default_factory=set)
    #: (arrival, identifiers) per accepted request, oldest first: what leaves `seen` when
    arrivals: deque[tuple[float, tuple[str, ...]]] = field(default_factory=deque)
    duplicates: dict[str, int] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    failures: dict[str, Failure] = field(default_factory=dict)


class EmulatorState:
    def __init__(self, config: EmulatorConfig, clock: Clock, ids: IdFactory) -> None:
        self.config = config
        self.clock = clock
        self.ids = ids
        self.customers = config.known_customers
        self.report_listeners: list[Callable[[list[dict[str, Any]]], None]] = []
        self.reset()

    def reset(self) -> None:
        self.modes: dict[bool, ModeState] = {False: ModeState(), True: ModeState()}
        self.sessions = SessionStore()
        self.stats = Stats(record_latency=self.config.record_latency)
        self.pending: list[EventBatch] = []
        self.pending_events = 0
        self.reports: list[dict[str, Any]] = []
        self.inflight: set[tuple[bool, str, str]] = set()
        self.idempotency = IdempotencyStore()

    def mode(self, livemode: bool) -> ModeState:
        return self.modes[livemode]

    # -- the stream (hot path) ------------------------------------------------------------------

    def accept_stream(self, batch: EventBatch) -> None:
        """Count a 200-answered stream request: drop duplicate identifiers, queue the rest."""
        mode = self.modes[batch.livemode]
        stats = self.stats
        count = len(batch.identifiers)
        stats.events_received += count
        stats.max_events_per_request = max(stats.max_events_per_request, count)
        seen = mode.seen
        if seen.isdisjoint(batch.identifiers):
            before = len(seen)
            seen.update(batch.identifiers)
            if len(seen) - before != count:  # an identifier repeated within the request
                batch = self._drop_duplicates(mode, batch, set())
        else:
            batch = self._drop_duplicates(mode, batch, seen)
            seen.update(batch.identifiers)
        accepted = len(batch.identifiers)
        if accepted:
            mode.arrivals.append((batch.arrival, batch.identifiers))
            self.pending.append(batch)
            self.pending_events += accepted
            stats.events_accepted += accepted
            if stats.record_latency:
                stats.latencies.extend(map(sub, repeat(batch.arrival, accepted), batch.timestamps))

    def _drop_duplicates(self, mode: ModeState, batch: EventBatch, seen: set[str]) -> EventBatch:
        """Keep the first of each identifier not in `seen`; count the others as duplicates."""
        keep: list[int] = []
        fresh: set[str] = set()
        for index, identifier in enumerate(batch.identifiers):
            if identifier in seen or identifier in fresh:
                self._count_duplicate(mode, identifier)
            else:
                fresh.add(identifier)
                keep.append(index)
        return batch.select(keep)

    def _count_duplicate(self, mode: ModeState, identifier: str) -> None:
        mode.duplicates[identifier] = mode.duplicates.get(identifier, 0) + 1
        self.stats.duplicates_dropped += 1

    # -- asynchronous validation ----------------------------------------------------------------

    def flush(self) -> int:
        """Validate every queued stream event; returns how many were validated."""
        now = self.clock()
        self._expire(now)
        if not self.pending:
            return 0
        pending, self.pending = self.pending, []
        validated, self.pending_events = self.pending_events, 0
        failures: list[Failure] = []
        for batch in pending:
            self._validate(batch, failures)
        if failures:
            self._report(failures, now)
        return validated

    def _validate(self, batch: EventBatch, failures: list[Failure]) -> None:
        if batch.meter_id is not None:
            mode = self.modes[batch.livemode]
            self._validate_columns(mode.meters.by_id[batch.meter_id], batch, failures)
            return
        names = batch.names
        if names.count(names[0]) == len(names):
            self._validate_group(names[0], batch, failures)
            return
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(names):
            groups.setdefault(name, []).append(index)
        for name, indexes in groups.items():
            self._validate_group(name, batch.select(indexes), failures)

    def _validate_group(self, name: str, batch: EventBatch, failures: list[Failure]) -> None:
        """Validate undecoded events of one name (a batch of several names, or a failing one)."""
        mode = self.modes[batch.livemode]
        meter, archived = mode.meters.lookup(name)
        if meter is None:
            self._fail_all(
                mode, batch, name, self._any_meter_id(mode, name), no_meter_problem(name, archived), failures
            )
            return
        columns = decode_columns(meter, batch.payloads)
        if columns is not None:
            batch.owners, batch.numbers = columns
            self._validate_columns(meter, batch, failures)
            return
        for payload, identifier, timestamp in zip(batch.payloads, batch.identifiers, batch.timestamps, strict=True):
            found = check_event(meter, payload, timestamp, batch.arrival, self.customers)
            if found is None:
                self._store(meter, payload[meter.customer_key], event_value(meter, payload), identifier, timestamp)
            else:
                failure = Failure(identifier, name, meter.id, batch.livemode, found.code, found.message, batch.arrival)
                self._fail(mode, failure, failures)

    def _validate_columns(self, meter: Meter, batch: EventBatch, failures: list[Failure]) -> None:
        """Validate decoded events: the meter still active, known customers, timestamps in the window."""
        mode = self.modes[batch.livemode]
        owners, numbers = batch.owners or (), batch.numbers if batch.numbers is not None else array("q")
        if meter.status != "active":
            problem = no_meter_problem(meter.event_name, archived=True)
            self._fail_all(mode, batch, meter.event_name, meter.id, problem, failures)
            return
        if columns_valid(owners, batch.timestamps, batch.arrival, self.customers):
            meter.events.extend(batch.timestamps, numbers, owners, batch.identifiers)
            self.stats.events_valid += len(numbers)
            return
        rows = zip(owners, numbers, batch.identifiers, batch.timestamps, strict=True)
        for owner, number, identifier, timestamp in rows:
            found = check_customer_known(owner, self.customers) or check_timestamp(timestamp, batch.arrival)
            if found is None:
                self._store(meter, owner, number, identifier, timestamp)
            else:
                failure = Failure(
                    identifier, meter.event_name, meter.id, batch.livemode, found.code, found.message, batch.arrival
                )
                self._fail(mode, failure, failures)

    def _fail_all(  # noqa: PLR0913, PLR0917 - the failure's fields
        self,
        mode: ModeState,
        batch: EventBatch,
        name: str,
        meter_id: str | None,
        problem: Problem,
        failures: list[Failure],
    ) -> None:
        for identifier in batch.identifiers:
            failure = Failure(identifier, name, meter_id, batch.livemode, problem.code, problem.message, batch.arrival)
            self._fail(mode, failure, failures)

    @staticmethod
    def _any_meter_id(mode: ModeState, name: str) -> str | None:
        """The id of an inactive meter with this event name (an `archived_meter` failure), if any."""
        return next((meter.id for meter in mode.meters.by_id.values() if meter.event_name == name), None)

    def _store(self, meter: Meter, customer: str, value: int, identifier: str, timestamp: float) -> None:
        meter.events.extend((timestamp,), (value,), (customer,), (identifier,))
        self.stats.events_valid += 1

    def _fail(self, mode: ModeState, failure: Failure, failures: list[Failure]) -> None:
        mode.failures[failure.identifier] = failure
        self.stats.events_invalid += 1
        failures.append(failure)

    def _report(self, failures: list[Failure], now: float) -> None:
        reports = build_reports(failures, now, self.ids.new)
        self.reports.extend(reports)
        for listener in self.report_listeners:
            listener(reports)

    def _expire(self, now: float) -> None:
        cutoff = now - DEDUP_WINDOW_S
        for mode in self.modes.values():
            arrivals = mode.arrivals
            while arrivals and arrivals[0][0] <= cutoff:
                mode.seen.difference_update(arrivals.popleft()[1])
        self.sessions.prune(now)

    # -- synchronous endpoints ------------------------------------------------------------------

    def record_sync(self, livemode: bool, event: SingleEvent, arrival: float) -> Meter:
        """Validate and store one event now (v1 and v2 synchronous endpoints); 400 on any problem."""
        name, payload, identifier, timestamp = event
        self.flush()
        mode = self.modes[livemode]
        self.stats.events_received += 1
        if identifier in mode.seen:
            self._count_duplicate(mode, identifier)
            raise ApiError(
                400,
                "duplicate_meter_event",
                f"A meter event with identifier `{identifier}` has already been submitted.",
                param="identifier",
            )
        meter, archived = mode.meters.lookup(name)
        problem: Problem | None = no_meter_problem(name, archived) if meter is None else None
        if meter is not None:
            problem = check_event(meter, payload, timestamp, arrival, self.customers)
        if problem is not None or meter is None:
            raise _sync_error(problem)
        mode.seen.add(identifier)
        mode.arrivals.append((arrival, (identifier,)))
        self.stats.events_accepted += 1
        self._store(meter, payload[meter.customer_key], event_value(meter, payload), identifier, timestamp)
        return meter

    def cancel(self, livemode: bool, name: str, identifier: str, now: float) -> None:
        """Cancel an event received within the last 24 hours; 400 invalid_cancel_configuration otherwise."""
        self.flush()
        mode = self.modes[livemode]
        arrival = _arrival_of(mode, identifier)
        usable = (
            arrival is not None
            and now - arrival <= CANCEL_WINDOW_S
            and identifier not in mode.cancelled
            and identifier not in mode.failures
            and any(meter.event_name == name and meter.events.holds(identifier) for meter in mode.meters.by_id.values())
        )
        if not usable:
            raise ApiError(
                400,
                "invalid_cancel_configuration",
                f"No meter event `{identifier}` for `{name}` received within the last 24 hours can be cancelled.",
                param="cancel.identifier",
            )
        mode.cancelled.add(identifier)
        self.stats.events_cancelled += 1

    # -- reads ----------------------------------------------------------------------------------

    def identifier_info(self, identifier: str) -> dict[str, Any]:
        self.flush()
        for livemode, mode in self.modes.items():
            accepted = identifier in mode.seen
            duplicates = mode.duplicates.get(identifier, 0)
            if accepted or duplicates:
                failure = mode.failures.get(identifier)
                status = "invalid" if failure else "cancelled" if identifier in mode.cancelled else "valid"
                return {
                    "identifier": identifier,
                    "livemode": livemode,
                    "accepted": int(accepted),
                    "duplicates": duplicates,
                    "received": int(accepted) + duplicates,
                    "status": status if accepted else "expired",
                    "error_code": failure.code if failure else None,
                }
        return {
            "identifier": identifier,
            "livemode": None,
            "accepted": 0,
            "duplicates": 0,
            "received": 0,
            "status": "unknown",
            "error_code": None,
        }

    def failures_json(self) -> list[dict[str, Any]]:
        self.flush()
        return [failure.to_json() for mode in self.modes.values() for failure in mode.failures.values()]

    def stats_json(self) -> dict[str, Any]:
        self.flush()
        data = self.stats.to_json()
        data["unique_identifiers"] = sum(len(mode.seen) for mode in self.modes.values())
        data["sessions_created"] = self.sessions.created
        data["error_reports"] = len(self.reports)
        data["meters"] = sum(len(mode.meters.by_id) for mode in self.modes.values())
        return data


def _arrival_of(mode: ModeState, identifier: str) -> float | None:
    """When an identifier was accepted (a linear scan: cancellations are rare)."""
    if identifier not in mode.seen:
        return None
    return next((arrival for arrival, ids in reversed(mode.arrivals) if identifier in ids), None)


def _sync_error(problem: Problem | None) -> ApiError:
    if problem is None:  # pragma: no cover - a missing meter always has a problem
        return invalid("The meter event is invalid.")
    return ApiError(400, problem.sync_code, problem.message)
