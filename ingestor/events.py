"""Kafka record -> meter event for the stream, or a rejection with its reason.

The topic's message contract (public; see README and `ingestor/schemas/meter-event.schema.json`):
the record value is a UTF-8 JSON object `{"event_name", "payload", "identifier"?, "timestamp"?}`.

- `payload` values are strings; a JSON integer is accepted and sent as its decimal string.
- `timestamp` is an RFC 3339 string with a time zone, or unix seconds (a number); it is sent as
  RFC 3339 UTC with milliseconds. When absent, the record's Kafka timestamp is used, so a redelivered
  record keeps the time it was produced.
- When `identifier` is absent, the `ingestor.identifier` header is used if present (set by
  `ingestor dlq replay`), else one is derived from the record's coordinates within a namespace unique to
  the Kafka cluster (INGESTOR_IDENTIFIER_NAMESPACE, by default the cluster id):
  `kafka-<namespace>.<topic>-<partition>-<offset>` (the topic replaced by a hash when that would exceed
  100 characters). A redelivery after a crash carries the same identifier, and Stripe counts it once; the
  same coordinates on another cluster give another identifier.
- `Decoder.identifier_of` gives a rejected record the identifier its event would have been billed with,
  by the same rules, so that its dead-letter record, replayed any number of times, is billed once.

`Decoder.decode` works on a whole poll of one partition; its loop is the hot path: no allocation beyond
the parsed dict, which is reused as the outgoing event.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from ingestor import cancellation, dlq_format
from ingestor.errors import Rejection
from ingestor.timefmt import format_ms

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ingestor.cancellation import Cancellation
    from ingestor.catalog import Meter, MeterCatalog

MAX_NAME_CHARS = 100
MAX_IDENTIFIER_CHARS = 100
#: Stripe does not document the limit behind `meter_event_value_too_many_digits`; 15 digits keep every
#: value exact in a double, the conservative reading.
MAX_VALUE_DIGITS = 15
PAST_WINDOW_S = 35 * 86400
FUTURE_WINDOW_S = 5 * 60
ALLOWED_FIELDS = frozenset({"event_name", "payload", "identifier", "timestamp"})
_TS_CACHE_LIMIT = 4096
#: RFC 3339 `date-time` (section 5.6), with `T`/`Z` in either case; `datetime.fromisoformat` alone also
#: takes ISO 8601 forms RFC 3339 does not (no seconds, `+0530`, `+05`, `,5`, a space before the offset).
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d+)?(?:[Zz]|[+-]\d\d:\d\d)", re.ASCII)
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))
#: "000".."999" -> 0..999: looks up and validates a canonical timestamp's milliseconds in one step.
_MS_DIGITS = {f"{ms:03d}": ms for ms in range(1000)}
#: Lengths of `YYYY-MM-DDTHH:MM:SS.mmmZ` and `YYYY-MM-DDTHH:MM:SS.mmm+hh:mm`, the forms with a fast path.
_MS_Z_LEN, _MS_OFFSET_LEN = 24, 29
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class Record(Protocol):
    """The parts of a Kafka consumer record the worker reads (aiokafka's ConsumerRecord has them)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


def identifier_prefix(topic: str, partition: int, namespace: str = "") -> str:
    """The derived identifier's prefix; the offset follows. Never longer than 100 characters in all.

    `kafka-<namespace>.<topic>-<partition>-`: a namespace has no `.` (see settings), so it ends at the first
    one whatever the topic's name. Without a namespace (earlier versions): `kafka-<topic>-<partition>-`.
    """
    scope = f"{namespace}." if namespace else ""
    prefix = f"kafka-{scope}{topic}-{partition}-"
    if len(prefix) + 20 > MAX_IDENTIFIER_CHARS:
        digest = hashlib.sha256(topic.encode()).hexdigest()[:24]
        prefix = f"kafka-{scope}{digest}-{partition}-"
    return prefix


def parse_timestamp(text: str) -> float:
    """An RFC 3339 date-time with a zone -> unix seconds. Raises ValueError otherwise."""
    if _RFC3339.fullmatch(text) is None:
        raise ValueError(text)
    parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1] in "Zz" else text)
    if parsed.tzinfo is None:
        raise ValueError(text)
    return parsed.timestamp()


def check_value(value: str) -> None:
    """Stripe's rule for a meter value: a positive whole number in ASCII digits."""
    if not (value.isascii() and value.isdigit()):
        raise Rejection("value_invalid", f"value {value[:40]!r} is not a positive whole number in ASCII digits")
    if len(value) > MAX_VALUE_DIGITS:
        raise Rejection("value_too_many_digits", f"value has {len(value)} digits, more than {MAX_VALUE_DIGITS}")
    if value[0] == "0":
        reason = "is zero" if value.strip("0") == "" else "has leading zeros"
        raise Rejection("value_invalid", f"value {value!r} {reason}; it must be a positive whole number")


def _stringify_payload(payload: dict[str, Any]) -> None:
    """Payload values must be strings; whole numbers become their decimal string."""
    for key, value in payload.items():
        if type(value) is str:
            continue
        if type(value) is int:
            payload[key] = str(value)
        else:
            kind = "null" if value is None else type(value).__name__
            raise Rejection("payload_value_not_string", f"payload[{key!r}] is {kind}, not a string")


class Decoder:
    """Turns records into stream events. Holds caches; one per worker."""

    def __init__(self, catalog: MeterCatalog, *, max_record_bytes: int, namespace: str = "") -> None:
        self.catalog = catalog
        self.max_record_bytes = max_record_bytes
        self.namespace = namespace
        self._ts_cache: dict[str, tuple[float, str]] = {}
        #: `YYYY-MM-DDTHH:MM:SS` + zone -> unix milliseconds of that second (see `_millisecond_form`)
        self._second_ms: dict[str, int] = {}
        self._prefixes: dict[tuple[str, int], str] = {}
        self._last_second = -1
        self._last_second_text = ""

    def decode(  # noqa: C901, PLR0912, PLR0915 - the hot loop is inline on purpose (one call per event)
        self, records: Sequence[Record], now: float, cancellations: list[Cancellation] | None = None
    ) -> tuple[list[dict[str, Any]], list[Record], list[tuple[Record, Rejection]]]:
        """Decode one poll of one partition: (events, their records, rejected records with reasons).

        With a `cancellations` list, records holding an adjustment (`ingestor.cancellation`) are validated
        and the valid ones appended to it, in order; without one they are events with unknown fields."""
        events: list[dict[str, Any]] = []
        sources: list[Record] = []
        rejected: list[tuple[Record, Rejection]] = []
        if not records:
            return events, sources, rejected
        first = records[0]
        key = (first.topic, first.partition)
        prefix = self._prefixes.get(key) or self._prefix(*key)
        lowest, highest = now - PAST_WINDOW_S, now + FUTURE_WINDOW_S
        loads, max_bytes, lookup = orjson.loads, self.max_record_bytes, self.catalog.lookup
        # Per poll: meters already looked up (the catalog does not change during a synchronous poll),
        # and the last record timestamp formatted and found within the window.
        meters: dict[str, Meter] = {}
        last_ms: int | None = None
        last_text = ""
        allowed, str_, dict_ = ALLOWED_FIELDS, str, dict
        ms_digits, seconds = _MS_DIGITS, self._second_ms
        append_event, append_source = events.append, sources.append
        # The whole of the checks inline for the common case (no call per event); anything unusual
        # takes the same checks in the same order, so the rejections are the same.
        for record in records:
            value = record.value
            try:
                if value is None:
                    raise Rejection("tombstone", "the record value is null")  # noqa: TRY301 - one handler for all
                if len(value) > max_bytes:
                    raise Rejection("record_too_large", f"{len(value)} bytes, more than {max_bytes}")  # noqa: TRY301
                try:
                    event = loads(value)
                except orjson.JSONDecodeError as exc:
                    raise _not_json(value, exc) from None
                if type(event) is not dict_:
                    raise _not_object(event)
                if not event.keys() <= allowed:
                    if cancellations is not None and cancellation.is_adjustment(event):
                        cancellations.append(cancellation.parse(record, event))
                        continue
                    raise _unknown_fields(event)
                name = event.get("event_name")
                if type(name) is not str_ or not 0 < len(name) <= MAX_NAME_CHARS:
                    raise _bad_name(name)
                payload = event.get("payload")
                if type(payload) is not dict_:
                    raise _bad_payload(payload)
                meter = meters.get(name)
                if meter is None:
                    meter = meters[name] = lookup(name)
                for item in payload.values():
                    if type(item) is not str_:
                        _stringify_payload(payload)
                        break
                if not payload.get(meter.customer_key):
                    raise Rejection(  # noqa: TRY301
                        "customer_missing", f"payload lacks the customer key {meter.customer_key!r}"
                    )
                amount = payload.get(meter.value_key)
                if amount is not None:
                    if not (
                        len(amount) <= MAX_VALUE_DIGITS and amount.isdigit() and amount.isascii() and amount[0] != "0"
                    ):
                        check_value(amount)  # raises the precise rejection
                elif meter.needs_value:
                    raise Rejection("value_missing", f"payload lacks the value key {meter.value_key!r}")  # noqa: TRY301
                if len(event) == 4:  # identifier and timestamp given: fast when already in Stripe's form
                    identifier = event["identifier"]
                    raw = event["timestamp"]
                    if not (
                        type(identifier) is str_
                        and 0 < len(identifier) <= MAX_IDENTIFIER_CHARS
                        and type(raw) is str_
                        and len(raw) == _MS_Z_LEN
                        and raw[10] == "T"
                        and raw[19] == "."
                        and raw[23] == "Z"
                        and (millis := ms_digits.get(raw[20:23])) is not None
                        and (second_ms := seconds.get(raw[:19])) is not None
                        and lowest <= (second_ms + millis) / 1000 <= highest
                    ):
                        self._fill_optional(event, record, prefix, lowest, highest)
                    # else: valid and canonical, passed through as it came
                elif len(event) == 2 and not record.headers:  # the common producer: no identifier, no timestamp
                    event["identifier"] = f"{prefix}{record.offset}"
                    ms = record.timestamp
                    if ms != last_ms:
                        self._fill_timestamp(event, record, lowest, highest)
                        last_ms, last_text = ms, event["timestamp"]
                    else:
                        event["timestamp"] = last_text
                else:
                    self._fill_optional(event, record, prefix, lowest, highest)
            except Rejection as rejection:
                rejected.append((record, rejection))
            else:
                append_event(event)
                append_source(record)
        return events, sources, rejected

    def _prefix(self, topic: str, partition: int) -> str:
        prefix = self._prefixes.get((topic, partition))
        if prefix is None:
            prefix = self._prefixes[topic, partition] = identifier_prefix(topic, partition, self.namespace)
        return prefix

    def identifier_of(self, record: Record) -> str:
        """The identifier `record`'s event is billed with, for a rejected record ("" when it can have none).

        The producer's `identifier` when the value is a JSON object that has one, else the record's
        `ingestor.identifier` header, else the one derived from its coordinates: as `decode` decides.
        Rejections are rare: the value is parsed again here rather than slowing the hot loop.
        """
        identifier = _given_identifier(record.value)
        if identifier is None:
            carried = record.headers and _header(record, dlq_format.IDENTIFIER)
            identifier = carried or f"{self._prefix(record.topic, record.partition)}{record.offset}"
        if type(identifier) is not str or not 0 < len(identifier) <= MAX_IDENTIFIER_CHARS:
            return ""
        return identifier

    def _fill_optional(self, event: dict[str, Any], record: Record, prefix: str, lowest: float, highest: float) -> None:
        """Identifier and timestamp when the producer gave either."""
        identifier = event.get("identifier")
        if identifier is None:
            identifier = (record.headers and _header(record, dlq_format.IDENTIFIER)) or f"{prefix}{record.offset}"
            event["identifier"] = identifier
        if type(identifier) is not str or not 0 < len(identifier) <= MAX_IDENTIFIER_CHARS:
            raise Rejection("identifier_invalid", "identifier must be a string of 1 to 100 characters")
        self._fill_timestamp(event, record, lowest, highest)

    def _fill_timestamp(self, event: dict[str, Any], record: Record, lowest: float, highest: float) -> None:
        raw = event.get("timestamp")
        if raw is None:
            seconds, text = record.timestamp / 1000, ""
        elif type(raw) is str:
            seconds, text = self._millisecond_form(raw) or self._parse_cached(raw)
        elif type(raw) in (int, float) and math.isfinite(raw):
            seconds, text = float(raw), ""
        else:
            raise Rejection("timestamp_invalid", "timestamp must be an RFC 3339 string or unix seconds")
        if seconds < lowest:
            raise Rejection("timestamp_too_far_in_past", f"{_shown(raw, record)} is more than 35 days old")
        if seconds > highest:
            raise Rejection("timestamp_in_future", f"{_shown(raw, record)} is more than 5 minutes ahead")
        if not text:
            text = self._format_record_ms(record.timestamp if raw is None else round(seconds * 1000))
        event["timestamp"] = text

    def _millisecond_form(self, raw: str) -> tuple[float, str] | None:
        """(seconds, text) of `YYYY-MM-DDTHH:MM:SS.mmm` + `Z` or `±hh:mm` without a parse per event.

        The second and its zone are parsed once (by `parse_timestamp`, the reference) and cached as unix
        milliseconds; the milliseconds are added. Seconds are `unix ms / 1000`, the same correctly
        rounded float `datetime.timestamp` gives. A canonical UTC string (`T`, `Z`) is passed through;
        the others are formatted as `format_ms` would. None: not this form, or not valid (the caller
        takes the reference path, which gives the precise rejection).
        """
        size = len(raw)
        if size not in {_MS_Z_LEN, _MS_OFFSET_LEN} or raw[19] != ".":
            return None
        millis = _MS_DIGITS.get(raw[20:23])
        if millis is None:
            return None
        zone = raw[23:]
        key = raw[:19] if zone == "Z" else raw[:19] + zone  # the hot loop looks `Z` seconds up by raw[:19]
        second_ms = self._second_ms.get(key)
        if second_ms is None:
            try:
                second_ms = round(parse_timestamp(raw[:19] + zone)) * 1000
            except (ValueError, OverflowError):
                return None
            if len(self._second_ms) >= _TS_CACHE_LIMIT:
                self._second_ms.clear()
            self._second_ms[key] = second_ms
        ms = second_ms + millis
        if size == _MS_Z_LEN and raw[10] == "T" and raw[23] == "Z":
            return ms / 1000, raw
        return ms / 1000, self._format_record_ms(ms)

    def _format_record_ms(self, ms: int) -> str:
        second, millis = divmod(ms, 1000)
        if second != self._last_second:
            self._last_second = second
            self._last_second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._last_second_text + _MILLIS[millis]

    def _parse_cached(self, raw: str) -> tuple[float, str]:
        hit = self._ts_cache.get(raw)
        if hit is not None:
            return hit
        try:
            seconds = parse_timestamp(raw)
        except (ValueError, OverflowError):
            raise Rejection("timestamp_invalid", f"timestamp {raw[:64]!r} is not RFC 3339 with a time zone") from None
        if len(self._ts_cache) >= _TS_CACHE_LIMIT:
            self._ts_cache.clear()
        hit = self._ts_cache[raw] = (seconds, format_ms(round(seconds * 1000)))
        return hit


def _given_identifier(value: bytes | None) -> object:
    """The value's `identifier` field, if the value is a JSON object (None otherwise)."""
    if value is None:
        return None
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return event.get("identifier") if type(event) is dict else None


def _header(record: Record, name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name and value:
            try:
                return value.decode()
            except UnicodeDecodeError:
                return None
    return None


def _shown(raw: object, record: Record) -> str:
    if raw is None:
        return f"the record's timestamp ({record.timestamp} ms)"
    return f"timestamp {str(raw)[:64]!r}" if type(raw) is str else f"timestamp {raw!r}"


def _unknown_fields(event: dict[str, Any]) -> Rejection:
    extra = sorted(set(event) - ALLOWED_FIELDS)
    return Rejection("unknown_field", f"unexpected field(s) {', '.join(map(repr, extra))[:200]}")


def _bad_name(name: object) -> Rejection:
    if name is None:
        return Rejection("event_name_missing", "event_name is required")
    return Rejection("event_name_invalid", "event_name must be a string of 1 to 100 characters")


def _bad_payload(payload: object) -> Rejection:
    if payload is None:
        return Rejection("payload_missing", "payload is required")
    return Rejection("payload_not_object", "payload must be an object of strings")


def _not_object(event: object) -> Rejection:
    kind = _JSON_TYPES.get(type(event), type(event).__name__)
    return Rejection("not_object", f"the value is a JSON {kind}, not an object")


def _not_json(value: bytes, exc: orjson.JSONDecodeError) -> Rejection:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as bad:
        return Rejection("not_utf8", f"the value is not UTF-8 (byte {bad.start})")
    return Rejection("not_json", f"the value is not JSON: {exc}")
