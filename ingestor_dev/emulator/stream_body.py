"""Parsing and checking a meter event stream body (pure; the hot path).

A whole request is rejected with one 400 naming the first offending event (`events[17].payload.value`)
in `param` and in the message, so a client bisecting a batch always gets the same answer. The fast
path checks whole columns with C-level `map`/`join`; only a batch that fails it (or lacks identifiers)
is walked event by event, which also finds the exact offending index; timestamps
missing from the parse cache are parsed one by one. A batch of one event name with an active meter
is decoded in the same pass (customers and values as columns), and the payloads are dropped.
"""

from __future__ import annotations

import uuid
from array import array
from dataclasses import dataclass
from itertools import chain, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import orjson

from ingestor_dev.emulator.errors import ApiError, invalid
from ingestor_dev.emulator.limits import MAX_EVENTS_PER_REQUEST, MAX_NAME_LENGTH
from ingestor_dev.emulator.timefmt import TimestampError, cached_lookup, parse_rfc3339
from ingestor_dev.emulator.validation import decode_columns, decode_owners_and_values

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ingestor_dev.emulator.meters import Meter

_NAME = itemgetter("event_name")
_PAYLOAD = itemgetter("payload")
_IDENTIFIER = itemgetter("identifier")


@dataclass(slots=True)
class EventBatch:
    """Accepted events as columns; `timestamps` are unix seconds."""

    names: list[str]
    payloads: list[dict[str, str]]
    identifiers: tuple[str, ...]
    timestamps: Sequence[float]
    arrival: float
    livemode: bool = False
    #: set at intake when the batch has one event name with an active meter and its customers and
    #: values decode cleanly (see `validation.decode_columns`); `names` and `payloads` are then empty
    meter_id: str | None = None
    owners: tuple[str, ...] | None = None
    numbers: array[int] | None = None

    def __len__(self) -> int:
        return len(self.identifiers)

    def select(self, keep: list[int]) -> EventBatch:
        identifiers = tuple([self.identifiers[i] for i in keep])
        timestamps = [self.timestamps[i] for i in keep]
        if self.meter_id is not None and self.owners is not None and self.numbers is not None:
            owners, numbers = self.owners, self.numbers
            return EventBatch(
                [],
                [],
                identifiers,
                timestamps,
                self.arrival,
                self.livemode,
                self.meter_id,
                tuple([owners[i] for i in keep]),
                array("q", [numbers[i] for i in keep]),
            )
        return EventBatch(
            [self.names[i] for i in keep],
            [self.payloads[i] for i in keep],
            identifiers,
            timestamps,
            self.arrival,
            self.livemode,
        )


def decode_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid("Invalid JSON received in the request body.", code="invalid_json") from exc


def parse_stream_body(body: bytes, arrival: float, meters: Mapping[str, Meter] | None = None) -> EventBatch:
    """The checked batch, or a 400 naming the first offending event.

    With `meters` (the mode's active meters by event name), a batch of one event name with an active
    meter is also decoded here (customers and values as columns, see `validation.decode_columns`):
    the payloads are still in the CPU cache, and the same columns prove the payloads hold strings.
    """
    document = decode_json(body)
    if type(document) is not dict:
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    events = document.get("events")
    if type(events) is not list:
        raise ApiError(400, "parameter_missing", "Missing required param: events.", param="events")
    if not events:
        raise invalid("events must contain at least one event.", param="events")
    if len(events) > MAX_EVENTS_PER_REQUEST:
        raise invalid(
            f"events must contain at most {MAX_EVENTS_PER_REQUEST} events, got {len(events)}.", param="events"
        )
    batch = _fast(events, arrival, meters)
    return batch if batch is not None else _slow(events, arrival)


def _fast(events: list[Any], arrival: float, meters: Mapping[str, Meter] | None) -> EventBatch | None:
    """The batch when every event is well-formed and carries an identifier, else None.

    `str.join` raises TypeError on any non-string, `dict.values` on any non-dict, `itemgetter` KeyError
    on a missing field: each check is one C-level pass over the batch.
    """
    columns = _columns(events)
    if columns is None:
        return None
    names, payloads, ids = columns
    valid, name = _check_names(names)
    if not valid:
        return None
    meter = meters.get(name) if meters and name is not None else None
    pair = _payload_columns(meter, payloads) if meter is not None else None
    if pair is None and not _payload_strings(payloads):
        return None
    times = _times(events, arrival)
    if times is None:
        return None
    batch = EventBatch(names, payloads, ids, times, arrival)
    if meter is not None:
        decoded = decode_owners_and_values(*pair) if pair is not None else decode_columns(meter, payloads)
        if decoded is not None:
            batch.meter_id = meter.id
            batch.owners, batch.numbers = decoded
            batch.names = []
            batch.payloads = []
    return batch


def _columns(events: list[Any]) -> tuple[list[Any], list[Any], tuple[str, ...]] | None:
    """(names, payloads, identifiers) when every event is an object with all three and the identifiers
    are non-empty strings of at most `MAX_NAME_LENGTH` characters; else None."""
    try:
        names: list[Any] = list(map(_NAME, events))
        payloads: list[Any] = list(map(_PAYLOAD, events))
        ids: tuple[Any, ...] = tuple(map(_IDENTIFIER, events))
        "".join(ids)
    except (KeyError, TypeError):
        return None
    if max(map(len, ids)) > MAX_NAME_LENGTH or not all(ids):
        return None
    return names, payloads, ids


def _check_names(names: list[Any]) -> tuple[bool, str | None]:
    """Whether every name is valid, and the batch's one name (None when it has several)."""
    name = names[0]
    if names.count(name) == len(names):
        return type(name) is str and 0 < len(name) <= MAX_NAME_LENGTH, name
    try:
        unique_names = set(names)
    except TypeError:  # an unhashable name
        return False, None
    return all(type(name) is str and 0 < len(name) <= MAX_NAME_LENGTH for name in unique_names), None


def _payload_strings(payloads: list[Any]) -> bool:
    """Whether every payload is an object of strings."""
    try:
        "".join(chain.from_iterable(map(dict.values, payloads)))
    except TypeError:
        return False
    return True


def _payload_columns(meter: Meter, payloads: list[Any]) -> tuple[tuple[str, ...], list[str]] | None:
    """(customers, values) when every payload holds exactly the meter's two keys, with string values.

    Then those two columns are every payload value, so joining them proves the payloads hold only
    strings (cheaper than walking every payload's values); else None.
    """
    if meter.customer_key == meter.value_key:
        return None
    try:
        owners: tuple[Any, ...] = tuple(map(itemgetter(meter.customer_key), payloads))
        values: list[Any] = list(map(itemgetter(meter.value_key), payloads))
        "".join(owners)
        "".join(values)
    except (KeyError, TypeError):
        return None
    if sum(map(len, payloads)) != 2 * len(payloads):
        return None
    return owners, values


def _times(events: list[Any], arrival: float) -> Sequence[float] | None:
    """Each event's timestamp (the arrival time when it has none); None when one is not a string.

    A batch sharing one timestamp (the usual case) is parsed once and repeated as an `array("d")`,
    which the meter's columns take in one copy.
    """
    count = len(events)
    raw_times: list[Any] = list(map(dict.get, events, repeat("timestamp", count)))
    first = raw_times[0]
    if raw_times.count(first) == count:
        return array("d", (_timestamp(events[0], "events[0].", arrival),)) * count
    try:
        times: list[float | None] = list(map(cached_lookup().get, raw_times))
    except TypeError:  # an unhashable timestamp: the slow path names the first offending event
        return None
    if None in times:
        _fill_times(raw_times, times, arrival)
    return cast("list[float]", times)


def _fill_times(raw_times: list[Any], times: list[float | None], arrival: float) -> None:
    """Parse the timestamps the cache did not know (or default them to the arrival time)."""
    for index, parsed in enumerate(times):
        if parsed is None:
            times[index] = _timestamp({"timestamp": raw_times[index]}, f"events[{index}].", arrival)


def _slow(events: list[Any], arrival: float) -> EventBatch:
    names, payloads, ids, times = [], [], [], []
    for index, event in enumerate(events):
        where = f"events[{index}]."
        if type(event) is not dict:
            raise invalid(f"events[{index}] must be an object.", param=f"events[{index}]")
        names.append(_name(event, where))
        payloads.append(_payload(event, where))
        ids.append(_identifier(event, where))
        times.append(_timestamp(event, where, arrival))
    return EventBatch(names, payloads, tuple(ids), times, arrival)


def _name(event: dict[str, Any], where: str) -> str:
    name = event.get("event_name")
    if name is None:
        raise ApiError(
            400, "parameter_missing", f"Missing required param: {where}event_name.", param=f"{where}event_name"
        )
    if type(name) is not str or not name or len(name) > MAX_NAME_LENGTH:
        raise invalid(
            f"{where}event_name must be a non-empty string of at most {MAX_NAME_LENGTH} characters.",
            param=f"{where}event_name",
        )
    return name


def _payload(event: dict[str, Any], where: str) -> dict[str, str]:
    payload = event.get("payload")
    if payload is None:
        raise ApiError(400, "parameter_missing", f"Missing required param: {where}payload.", param=f"{where}payload")
    if type(payload) is not dict:
        raise invalid(f"{where}payload must be an object of strings.", param=f"{where}payload")
    for key, value in payload.items():
        if type(value) is not str:
            param = f"{where}payload.{key}"
            raise invalid(f"{param} must be a string.", param=param)
    return payload


def _identifier(event: dict[str, Any], where: str) -> str:
    identifier = event.get("identifier")
    if identifier is None:
        return f"emu_{uuid.uuid4().hex}"
    if type(identifier) is not str or not identifier or len(identifier) > MAX_NAME_LENGTH:
        raise invalid(
            f"{where}identifier must be a non-empty string of at most {MAX_NAME_LENGTH} characters.",
            param=f"{where}identifier",
        )
    return identifier


def _timestamp(event: dict[str, Any], where: str, arrival: float) -> float:
    raw = event.get("timestamp")
    if raw is None:
        return arrival
    if type(raw) is str:
        try:
            return parse_rfc3339(raw)
        except TimestampError:
            pass
    raise invalid(f"{where}timestamp must be an RFC 3339 date-time string, got {raw!r}.", param=f"{where}timestamp")


class SingleEvent(NamedTuple):
    name: str
    payload: dict[str, str]
    identifier: str
    timestamp: float


def parse_single_event(event: Any, arrival: float) -> SingleEvent:
    """A synchronous meter event body, checked like one stream event (params without a prefix)."""
    if type(event) is not dict:
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    return SingleEvent(_name(event, ""), _payload(event, ""), _identifier(event, ""), _timestamp(event, "", arrival))
