"""Bad records, each with the exact reason the worker's decoder gives, and good-event builders.

`BAD_RECORDS` holds one entry per kind of bad record; `reason` is the dead-letter code
(`ingestor.reason`) the decoder gives with the default catalog (`off`: payload keys
`stripe_customer_id` / `value`) and the default INGESTOR_MAX_RECORD_BYTES. Time-dependent entries use
years 2000 and 2999, so they hold whenever the tests run. Entries without a `timestamp` field take the
Kafka record's timestamp, which must be "now" (as when they are produced for real).

`tests/test_events.py` runs every entry through `ingestor.events.Decoder`, so the corpus stays true.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

#: INGESTOR_MAX_RECORD_BYTES's default.
DEFAULT_MAX_RECORD_BYTES = 65536
CUSTOMER = "cus_corpus"


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record value (with optional key and headers) that the decoder rejects with `reason`."""

    name: str
    value: bytes | None
    reason: str
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class FakeRecord:
    """The fields of aiokafka's ConsumerRecord that the worker reads (satisfies `ingestor.events.Record`)."""

    topic: str = "meter-events"
    partition: int = 0
    offset: int = 0
    timestamp: int = 0
    key: bytes | None = None
    value: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def event_bytes(payload: Any = None, **fields: Any) -> bytes:
    """A record value: `event_name` defaults to "api_requests", `payload` to a valid one; `fields` override."""
    body: dict[str, Any] = {
        "event_name": "api_requests",
        "payload": {"stripe_customer_id": CUSTOMER, "value": "1"} if payload is None else payload,
    }
    body.update(fields)
    return orjson.dumps(body)


def with_value(value: Any) -> bytes:
    return event_bytes({"stripe_customer_id": CUSTOMER, "value": value})


def without(field: str) -> bytes:
    body = orjson.loads(event_bytes())
    del body[field]
    return orjson.dumps(body)


def good_event(
    i: int,
    *,
    customer: str,
    event_name: str,
    value: int,
    identifier: str | None = None,
    timestamp: str | float | None = None,
) -> bytes:
    """A valid record value. Its identifier is unique per (event_name, customer, i) unless given.

    Without `timestamp`, the record's Kafka timestamp is the event's time.
    """
    if identifier is None:
        identifier = f"ev-{event_name}-{customer}-{i}"
        if len(identifier) > 100:
            identifier = f"ev-{hashlib.sha256(identifier.encode()).hexdigest()[:40]}-{i}"
    body: dict[str, Any] = {
        "event_name": event_name,
        "payload": {"stripe_customer_id": customer, "value": str(value)},
        "identifier": identifier,
    }
    if timestamp is not None:
        body["timestamp"] = timestamp
    return orjson.dumps(body)


def good_events(n: int, *, customer: str, event_name: str, value: int, start: int = 0) -> list[bytes]:
    """`n` valid record values with identifiers start..start+n-1; Stripe's total for them is n * value."""
    return [good_event(i, customer=customer, event_name=event_name, value=value) for i in range(start, start + n)]


def _nested(depth: int) -> dict[str, Any]:
    inner: dict[str, Any] = {"leaf": "1"}
    for _ in range(depth):
        inner = {"child": inner}
    return inner


_OVERSIZED = event_bytes({"stripe_customer_id": CUSTOMER, "value": "1", "pad": "x" * DEFAULT_MAX_RECORD_BYTES})
_DEEP_JSON = b'{"event_name":"api_requests","payload":' + b'{"a":' * 1100 + b'"1"' + b"}" * 1101

BAD_RECORDS: tuple[BadRecord, ...] = (
    # the record as a whole
    BadRecord("tombstone", None, "tombstone", key=CUSTOMER.encode()),
    BadRecord("oversized", _OVERSIZED, "record_too_large"),
    BadRecord("not_utf8_binary", b"\xff\xfe\x00{\x00}", "not_utf8"),
    BadRecord(
        "not_utf8_latin1_in_string", event_bytes(event_name="caf\u00e9").replace(b"\xc3\xa9", b"\xe9"), "not_utf8"
    ),
    BadRecord("empty_value", b"", "not_json"),
    BadRecord("truncated_json", event_bytes()[:-7], "not_json"),
    BadRecord("bom_prefixed_json", b"\xef\xbb\xbf" + event_bytes(), "not_json"),
    BadRecord("single_quoted_json", b"{'event_name': 'api_requests'}", "not_json"),
    BadRecord("nan_literal", b'{"event_name":"api_requests","payload":NaN}', "not_json"),
    BadRecord("lone_surrogate_escape", b'{"event_name":"\\ud800","payload":{}}', "not_json"),
    BadRecord("nesting_beyond_parser_limit", _DEEP_JSON, "not_json"),
    BadRecord("json_array", b'[{"event_name":"api_requests"}]', "not_object"),
    BadRecord("json_string", b'"api_requests"', "not_object"),
    BadRecord("json_number", b"42", "not_object"),
    BadRecord("json_null", b"null", "not_object"),
    BadRecord("json_true", b"true", "not_object"),
    BadRecord("unknown_top_level_field", event_bytes(customer=CUSTOMER), "unknown_field"),
    BadRecord("stripe_v1_style_fields", event_bytes(livemode=False, object="billing.meter_event"), "unknown_field"),
    # event_name
    BadRecord("event_name_missing", without("event_name"), "event_name_missing"),
    BadRecord("event_name_null", event_bytes(event_name=None), "event_name_missing"),
    BadRecord("event_name_empty", event_bytes(event_name=""), "event_name_invalid"),
    BadRecord("event_name_101_chars", event_bytes(event_name="e" * 101), "event_name_invalid"),
    BadRecord("event_name_number", event_bytes(event_name=7), "event_name_invalid"),
    BadRecord("event_name_object", event_bytes(event_name={"name": "api_requests"}), "event_name_invalid"),
    # payload
    BadRecord("payload_missing", without("payload"), "payload_missing"),
    BadRecord("payload_null", dumps({"event_name": "api_requests", "payload": None}), "payload_missing"),
    BadRecord("payload_string", event_bytes("stripe_customer_id=cus_1"), "payload_not_object"),
    BadRecord("payload_list", event_bytes([CUSTOMER, "1"]), "payload_not_object"),
    BadRecord("payload_value_null", with_value(None), "payload_value_not_string"),
    BadRecord("payload_value_float", with_value(1.5), "payload_value_not_string"),
    BadRecord("payload_value_whole_float", with_value(3.0), "payload_value_not_string"),
    BadRecord("payload_value_bool", with_value(True), "payload_value_not_string"),  # noqa: FBT003
    BadRecord("payload_value_object", with_value({"amount": "1"}), "payload_value_not_string"),
    BadRecord("payload_value_list", with_value(["1"]), "payload_value_not_string"),
    BadRecord(
        "payload_value_beyond_64_bits",
        b'{"event_name":"x","payload":{"value":18446744073709551616}}',
        "payload_value_not_string",
    ),
    BadRecord(
        "payload_deeply_nested",
        event_bytes({"stripe_customer_id": CUSTOMER, "value": "1", "dims": _nested(50)}),
        "payload_value_not_string",
    ),
    BadRecord("customer_null", event_bytes({"stripe_customer_id": None, "value": "1"}), "payload_value_not_string"),
    # customer and value (default keys)
    BadRecord("customer_missing", event_bytes({"value": "1"}), "customer_missing"),
    BadRecord("customer_empty", event_bytes({"stripe_customer_id": "", "value": "1"}), "customer_missing"),
    BadRecord("customer_under_other_key", event_bytes({"customer": CUSTOMER, "value": "1"}), "customer_missing"),
    BadRecord("value_missing", event_bytes({"stripe_customer_id": CUSTOMER}), "value_missing"),
    BadRecord("value_decimal", with_value("1.5"), "value_invalid"),
    BadRecord("value_negative", with_value("-3"), "value_invalid"),
    BadRecord("value_negative_integer", with_value(-3), "value_invalid"),
    BadRecord("value_exponent", with_value("1e3"), "value_invalid"),
    BadRecord("value_empty", with_value(""), "value_invalid"),
    BadRecord("value_zero", with_value("0"), "value_invalid"),
    BadRecord("value_zero_integer", with_value(0), "value_invalid"),
    BadRecord("value_leading_zeros", with_value("007"), "value_invalid"),
    BadRecord("value_arabic_indic_digits", with_value("\u0661\u0662"), "value_invalid"),
    BadRecord("value_fullwidth_digits", with_value("\uff11\uff12"), "value_invalid"),
    BadRecord("value_padded", with_value(" 12"), "value_invalid"),
    BadRecord("value_plus_sign", with_value("+5"), "value_invalid"),
    BadRecord("value_16_digits", with_value("1" * 16), "value_too_many_digits"),
    BadRecord("value_16_digit_integer", with_value(10**15), "value_too_many_digits"),
    # identifier
    BadRecord("identifier_101_chars", event_bytes(identifier="i" * 101), "identifier_invalid"),
    BadRecord("identifier_empty", event_bytes(identifier=""), "identifier_invalid"),
    BadRecord("identifier_number", event_bytes(identifier=12345), "identifier_invalid"),
    BadRecord(
        "identifier_header_101_chars",
        event_bytes(),
        "identifier_invalid",
        headers=(("ingestor.identifier", b"h" * 101),),
    ),
    # timestamp
    BadRecord("timestamp_garbage", event_bytes(timestamp="yesterday"), "timestamp_invalid"),
    BadRecord("timestamp_naive", event_bytes(timestamp="2026-01-01T00:00:00"), "timestamp_invalid"),
    BadRecord("timestamp_date_only", event_bytes(timestamp="2026-01-01"), "timestamp_invalid"),
    BadRecord("timestamp_offset_without_colon", event_bytes(timestamp="2026-01-01T00:00:00+0000"), "timestamp_invalid"),
    BadRecord("timestamp_impossible_date", event_bytes(timestamp="2026-02-30T00:00:00Z"), "timestamp_invalid"),
    BadRecord("timestamp_bool", event_bytes(timestamp=True), "timestamp_invalid"),
    BadRecord("timestamp_object", event_bytes(timestamp={"seconds": 1}), "timestamp_invalid"),
    BadRecord("timestamp_too_old", event_bytes(timestamp="2000-01-01T00:00:00Z"), "timestamp_too_far_in_past"),
    BadRecord("timestamp_unix_zero", event_bytes(timestamp=0), "timestamp_too_far_in_past"),
    BadRecord("timestamp_in_future", event_bytes(timestamp="2999-01-01T00:00:00Z"), "timestamp_in_future"),
    BadRecord("timestamp_unix_milliseconds", event_bytes(timestamp=4_102_444_800_000), "timestamp_in_future"),
)
