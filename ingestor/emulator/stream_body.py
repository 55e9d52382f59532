"""Parsing and checking a meter event stream body (pure; the hot path).

A whole request is rejected with one 400 naming the first offending event (`events[17].payload.value`)
in `param` and in the message, so a client bisecting a batch always gets the same answer. The fast
path checks whole columns with C-level `map`/`set`; only a batch that fails it (or lacks identifiers)
is walked event by event, which also finds the exact offending index; timestamps
missing from the parse cache are parsed one by one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from itertools import chain, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import orjson

from ingestor.emulator.errors import ApiError, invalid
from ingestor.emulator.limits import MAX_EVENTS_PER_REQUEST, MAX_NAME_LENGTH
from ingestor.emulator.timefmt import TimestampError, cached_lookup, parse_rfc3339

if TYPE_CHECKING:
    from array import array

_NAME = itemgetter("event_name")
_PAYLOAD = itemgetter("payload")
_IDENTIFIER = itemgetter("identifier")


@dataclass(slots=True)
class EventBatch:
    """Accepted events as columns; `timestamps` are unix seconds."""

    names: list[str]
    payloads: list[dict[str, str]]
    identifiers: tuple[str, ...]
    timestamps: list[float]
    arrival: float
    livemode: bool = False
    #: set at intake when the batch has one event name with an active meter and its customers and
    #: values decode cleanly (see `validation.decode_columns`)
    meter_id: str | None = None
    owners: tuple[str, ...] | None = None
    numbers: array[int] | None = None

    def __len__(self) -> int:
        return len(self.identifiers)

    def select(self, keep: list[int]) -> EventBatch:
        return EventBatch(
            [self.names[i] for i in keep],
            [self.payloads[i] for i in keep],
            tuple([self.identifiers[i] for i in keep]),
            [self.timestamps[i] for i in keep],
            self.arrival,
            self.livemode,
        )


def decode_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid("Invalid JSON received in the request body.", code="invalid_json") from exc


def parse_stream_body(body: bytes, arrival: float) -> EventBatch:
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
    batch = _fast(events, arrival)
    return batch if batch is not None else _slow(events, arrival)


def _fast(events: list[Any], arrival: float) -> EventBatch | None:
    """The batch when every event is well-formed and carries an identifier, else None.

    `str.join` raises TypeError on any non-string, `dict.values` on any non-dict, `itemgetter` KeyError
    on a missing field: each check is one C-level pass over the batch.
    """
    try:
        names: list[Any] = list(map(_NAME, events))
        payloads: list[Any] = list(map(_PAYLOAD, events))
        ids: tuple[Any, ...] = tuple(map(_IDENTIFIER, events))
        "".join(ids)
        "".join(chain.from_iterable(map(dict.values, payloads)))
        unique_names = set(names)
    except (KeyError, TypeError):
        return None
    if not all(type(name) is str and 0 < len(name) <= MAX_NAME_LENGTH for name in unique_names):
        return None
    if max(map(len, ids)) > MAX_NAME_LENGTH or "" in ids:
        return None
    raw_times: list[Any] = list(map(dict.get, events, repeat("timestamp", len(events))))
    unique_times = set(raw_times) if raw_times[0] == raw_times[-1] else ()
    if len(unique_times) == 1:
        return EventBatch(names, payloads, ids, [_timestamp(events[0], "events[0].", arrival)] * len(events), arrival)
    lookup: Any = cached_lookup().get
    times: list[float | None] = list(map(lookup, raw_times))
    if None in times:
        _fill_times(raw_times, times, arrival)
    return EventBatch(names, payloads, ids, cast("list[float]", times), arrival)


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
