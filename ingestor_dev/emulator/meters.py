"""Meters and the accepted events stored under each, in compact columns.

Events are stored per meter in arrival order as four parallel columns: timestamps as `array("d")`,
values as `array("q")`, interned customer ids and identifiers as one tuple per stored batch. About
32 bytes per event beyond the identifier string itself, so millions of events fit in memory; and
the garbage collector never walks them (arrays are not tracked, and tuples of strings are untracked
by the collector the first time it sees them), so full collections stay cheap however much is stored.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ingestor_dev.emulator.aggregation import Formula, Window

Status = Literal["active", "inactive"]


@dataclass(slots=True)
class EventColumns:
    timestamps: array[float] = field(default_factory=lambda: array("d"))
    values: array[int] = field(default_factory=lambda: array("q"))
    customers: list[tuple[str, ...]] = field(default_factory=list)
    identifiers: list[tuple[str, ...]] = field(default_factory=list)
    count: int = 0

    def extend(
        self, timestamps: Sequence[float], values: Sequence[int], customers: tuple[str, ...], ids: tuple[str, ...]
    ) -> None:
        self.timestamps.extend(timestamps)
        self.values.extend(values)
        self.customers.append(customers)
        self.identifiers.append(ids)
        self.count += len(ids)

    def for_customer(self, customer: str, cancelled: set[str]) -> list[tuple[float, int]]:
        """(timestamp, value) of one customer's events, arrival order, cancelled ones left out."""
        owners = chain.from_iterable(self.customers)
        ids = chain.from_iterable(self.identifiers)
        return [
            (timestamp, value)
            for timestamp, value, owner, identifier in zip(self.timestamps, self.values, owners, ids, strict=True)
            if owner == customer and identifier not in cancelled
        ]

    def holds(self, identifier: str) -> bool:
        return any(identifier in chunk for chunk in self.identifiers)

    def __len__(self) -> int:
        return self.count


@dataclass(slots=True)
class Meter:
    id: str
    display_name: str
    event_name: str
    formula: Formula
    customer_key: str
    value_key: str
    event_time_window: Window | None
    livemode: bool
    created: int
    status: Status = "active"
    updated: int = 0
    deactivated_at: int | None = None
    events: EventColumns = field(default_factory=EventColumns)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "billing.meter",
            "created": self.created,
            "customer_mapping": {"type": "by_id", "event_payload_key": self.customer_key},
            "default_aggregation": {"formula": self.formula},
            "display_name": self.display_name,
            "event_name": self.event_name,
            "event_time_window": self.event_time_window,
            "livemode": self.livemode,
            "status": self.status,
            "status_transitions": {"deactivated_at": self.deactivated_at},
            "updated": self.updated or self.created,
            "value_settings": {"event_payload_key": self.value_key},
        }


@dataclass(slots=True)
class MeterRegistry:
    """The meters of one mode (test or live); at most one active meter per event name."""

    by_id: dict[str, Meter] = field(default_factory=dict)
    active_by_name: dict[str, Meter] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)

    def add(self, meter: Meter) -> None:
        self.by_id[meter.id] = meter
        self.active_by_name[meter.event_name] = meter
        self.names.add(meter.event_name)

    def lookup(self, event_name: str) -> tuple[Meter | None, bool]:
        """The active meter for a name, and whether an inactive one exists (an archived meter)."""
        meter = self.active_by_name.get(event_name)
        return meter, meter is None and event_name in self.names

    def set_status(self, meter: Meter, status: Status, now: int) -> None:
        meter.status = status
        meter.updated = now
        if status == "active":
            meter.deactivated_at = None
            self.active_by_name[meter.event_name] = meter
        else:
            meter.deactivated_at = now
            self.active_by_name.pop(meter.event_name, None)
