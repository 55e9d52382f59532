"""ingestor.events: decoding and validating records, one reason code per way of failing."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor import events as events_module
from ingestor.catalog import Meter, MeterCatalog, from_static
from ingestor.errors import REASONS, Rejection
from ingestor.events import (
    FUTURE_WINDOW_S,
    MAX_IDENTIFIER_CHARS,
    PAST_WINDOW_S,
    Decoder,
    format_ms,
    identifier_prefix,
    parse_timestamp,
)
from tests.corpus import (
    BAD_RECORDS,
    DEFAULT_MAX_RECORD_BYTES,
    FakeRecord,
    event_bytes,
    good_event,
    good_events,
    with_value,
)

#: 2026-01-01T00:00:00Z
NOW = 1_767_225_600.0
NOW_MS = int(NOW * 1000)
TOPIC = "meter-events"
#: Reason codes only the delivery path gives (Stripe's answers), never the decoder.
DELIVERY_REASONS = {"stripe_rejected", "retries_exhausted", "stripe_async_error", "cancel_rejected"}
FIELDS = {"event_name", "payload", "identifier", "timestamp"}
FAST = settings(max_examples=150, deadline=None)


def rec(
    value: bytes | None,
    *,
    offset: int = 0,
    topic: str = TOPIC,
    partition: int = 0,
    timestamp: int = NOW_MS,
    headers: tuple[tuple[str, bytes], ...] = (),
) -> FakeRecord:
    return FakeRecord(topic, partition, offset, timestamp, None, value, headers)


def decoder(catalog: MeterCatalog | None = None, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Decoder:
    return Decoder(catalog or MeterCatalog(), max_record_bytes=max_record_bytes)


def decode_one(value: bytes | None, dec: Decoder | None = None, now: float = NOW, **kw: Any) -> dict[str, Any]:
    events, records, rejected = (dec or decoder()).decode([rec(value, **kw)], now)
    assert not rejected, rejected[0][1].reason
    assert len(events) == len(records) == 1
    return events[0]


def reject_one(value: bytes | None, dec: Decoder | None = None, now: float = NOW, **kw: Any) -> Rejection:
    record = rec(value, **kw)
    events, records, rejected = (dec or decoder()).decode([record], now)
    assert events == records == []
    assert len(rejected) == 1
    assert rejected[0][0] is record
    return rejected[0][1]


def payload(**values: Any) -> dict[str, Any]:
    return {"stripe_customer_id": "cus_1", "value": "1"} | values


# --- the corpus and the reason codes -------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_RECORDS, ids=[b.name for b in BAD_RECORDS])
def test_corpus_entry_gets_its_reason(bad: Any) -> None:
    now = time.time()
    record = FakeRecord(TOPIC, 0, 7, int(now * 1000), bad.key, bad.value, bad.headers)
    events, _, rejected = decoder().decode([record], now)
    assert events == []
    assert [(r, rej.reason) for r, rej in rejected] == [(record, bad.reason)]
    assert rejected[0][1].message


def test_corpus_is_well_formed() -> None:
    names = [b.name for b in BAD_RECORDS]
    assert len(names) == len(set(names)) >= 30
    assert {b.reason for b in BAD_RECORDS} <= set(REASONS)


def test_every_decoder_reason_is_produced_somewhere() -> None:
    """The corpus plus the catalog's two codes and the cancellation shape's (tests/test_adjustments.py) cover
    every code that is not Stripe's."""
    cancellation_shape = {"adjustment_type_invalid", "cancel_invalid"}
    covered = {b.reason for b in BAD_RECORDS} | {"meter_unknown", "meter_inactive"} | cancellation_shape
    assert covered == set(REASONS) - DELIVERY_REASONS


def test_good_event_helpers_decode() -> None:
    values = [
        *good_events(3, customer="cus_9", event_name="tokens", value=5),
        good_event(0, customer="c", event_name="e" * 100, value=1),
    ]
    events, _, rejected = decoder().decode([rec(v, offset=i) for i, v in enumerate(values)], NOW)
    assert rejected == []
    assert [e["payload"] for e in events[:3]] == [{"stripe_customer_id": "cus_9", "value": "5"}] * 3
    identifiers = [e["identifier"] for e in events]
    assert len(set(identifiers)) == 4
    assert all(len(i) <= 100 for i in identifiers)
    stamped = decode_one(good_event(1, customer="c", event_name="e", value=2, timestamp=NOW - 60))
    assert stamped["timestamp"] == "2025-12-31T23:59:00.000Z"


# --- whole-record rejections ----------------------------------------------------------------------


def test_tombstone() -> None:
    assert reject_one(None).reason == "tombstone"


def test_record_size_limit_is_inclusive() -> None:
    value = event_bytes()
    assert decode_one(value, decoder(max_record_bytes=len(value)))
    rejection = reject_one(value, decoder(max_record_bytes=len(value) - 1))
    assert rejection.reason == "record_too_large"
    assert str(len(value)) in rejection.message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\x80", "not_utf8"),
        (b'{"event_name":"\xc3"}', "not_utf8"),
        (b"{", "not_json"),
        (b"", "not_json"),
        (b"   ", "not_json"),
        (b'{"a":1,}', "not_json"),
        (b"\xef\xbb\xbf{}", "not_json"),
        (b"Infinity", "not_json"),
        (b"1e400", "not_json"),
    ],
)
def test_not_utf8_or_not_json(value: bytes, reason: str) -> None:
    assert reject_one(value).reason == reason


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (b"[]", "array"),
        (b'"x"', "string"),
        (b"1", "number"),
        (b"1.5", "number"),
        (b"null", "null"),
        (b"false", "boolean"),
    ],
)
def test_not_object_names_the_json_type(value: bytes, kind: str) -> None:
    rejection = reject_one(value)
    assert rejection.reason == "not_object"
    assert f"a JSON {kind}," in rejection.message


def test_unknown_field_is_named() -> None:
    rejection = reject_one(event_bytes(extra=1, another=2))
    assert rejection.reason == "unknown_field"
    assert "'another', 'extra'" in rejection.message


def test_unknown_field_is_checked_before_anything_else() -> None:
    assert reject_one(orjson.dumps({"bogus": 1})).reason == "unknown_field"


# --- event_name and payload -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (None, "event_name_missing"),
        ("", "event_name_invalid"),
        ("x" * 101, "event_name_invalid"),
        (1, "event_name_invalid"),
        (["a"], "event_name_invalid"),
    ],
)
def test_event_name_rejections(name: Any, reason: str) -> None:
    assert reject_one(event_bytes(event_name=name)).reason == reason


def test_event_name_of_100_characters_is_accepted() -> None:
    assert decode_one(event_bytes(event_name="n" * 100))["event_name"] == "n" * 100


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"event_name": "e"}, "payload_missing"),
        ({"event_name": "e", "payload": None}, "payload_missing"),
        ({"event_name": "e", "payload": "x"}, "payload_not_object"),
        ({"event_name": "e", "payload": []}, "payload_not_object"),
        ({"event_name": "e", "payload": 1}, "payload_not_object"),
        ({"event_name": "e", "payload": {}}, "customer_missing"),
    ],
)
def test_payload_rejections(body: dict[str, Any], reason: str) -> None:
    assert reject_one(orjson.dumps(body)).reason == reason


@pytest.mark.parametrize("bad", [None, 1.5, 2.0, True, False, {"a": "1"}, ["1"], {}])
def test_payload_values_must_be_strings_or_integers(bad: Any) -> None:
    rejection = reject_one(event_bytes(payload(region=bad)))
    assert rejection.reason == "payload_value_not_string"
    assert "'region'" in rejection.message


def test_integer_payload_values_are_stringified() -> None:
    event = decode_one(event_bytes({"stripe_customer_id": 42, "value": 5, "region": -7, "big": 10**18}))
    assert event["payload"] == {"stripe_customer_id": "42", "value": "5", "region": "-7", "big": "1000000000000000000"}


def test_extra_payload_keys_are_kept() -> None:
    assert decode_one(event_bytes(payload(model="gpt", tier="")))["payload"] == payload(model="gpt", tier="")


@pytest.mark.parametrize("customer", ["", None])
def test_customer_missing(customer: Any) -> None:
    body = {"value": "1"} if customer is None else {"stripe_customer_id": customer, "value": "1"}
    rejection = reject_one(event_bytes(body))
    assert rejection.reason == "customer_missing"
    assert "'stripe_customer_id'" in rejection.message


def test_value_missing() -> None:
    rejection = reject_one(event_bytes({"stripe_customer_id": "cus_1"}))
    assert rejection.reason == "value_missing"
    assert "'value'" in rejection.message


@pytest.mark.parametrize("value", ["1", "7", "10", "100", "9" * 15, "1" + "0" * 14, 1, 999_999_999_999_999])
def test_valid_values(value: Any) -> None:
    assert decode_one(with_value(value))["payload"]["value"] == str(value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("9" * 16, "value_too_many_digits"),
        ("1" + "0" * 15, "value_too_many_digits"),
        (10**15, "value_too_many_digits"),
        ("0" * 16, "value_too_many_digits"),
        ("0", "value_invalid"),
        ("00", "value_invalid"),
        ("007", "value_invalid"),
        ("1.5", "value_invalid"),
        ("1.0", "value_invalid"),
        ("-3", "value_invalid"),
        ("+3", "value_invalid"),
        ("1e3", "value_invalid"),
        ("", "value_invalid"),
        (" 1", "value_invalid"),
        ("1 ", "value_invalid"),
        ("1_000", "value_invalid"),
        ("0x10", "value_invalid"),
        ("\u0661\u0662", "value_invalid"),  # Arabic-Indic digits: isdigit() but not ASCII
        ("\u00b2", "value_invalid"),  # superscript two
        ("\uff15", "value_invalid"),  # fullwidth five
        (0, "value_invalid"),
        (-3, "value_invalid"),
    ],
)
def test_invalid_values(value: Any, reason: str) -> None:
    assert reject_one(with_value(value)).reason == reason


def test_count_meter_needs_no_value_but_checks_one_given() -> None:
    dec = decoder(from_static('{"calls": {"formula": "count"}}'))
    event = decode_one(orjson.dumps({"event_name": "calls", "payload": {"stripe_customer_id": "c"}}), dec)
    assert event["payload"] == {"stripe_customer_id": "c"}
    bad = orjson.dumps({"event_name": "calls", "payload": {"stripe_customer_id": "c", "value": "0"}})
    assert reject_one(bad, dec).reason == "value_invalid"


def test_default_catalog_needs_a_value() -> None:
    assert (
        reject_one(orjson.dumps({"event_name": "calls", "payload": {"stripe_customer_id": "c"}})).reason
        == "value_missing"
    )


def test_meter_keys_come_from_the_catalog() -> None:
    dec = decoder(MeterCatalog([Meter("tokens", customer_key="account", value_key="n")], known=True))
    event = decode_one(orjson.dumps({"event_name": "tokens", "payload": {"account": "a1", "n": 3}}), dec)
    assert event["payload"] == {"account": "a1", "n": "3"}
    assert reject_one(event_bytes(event_name="tokens"), dec).reason == "customer_missing"
    body = {"event_name": "tokens", "payload": {"account": "a1", "value": "3"}}
    assert reject_one(orjson.dumps(body), dec).reason == "value_missing"


def test_known_catalog_rejects_unknown_and_inactive_meters() -> None:
    catalog = MeterCatalog([Meter("live"), Meter("old", active=False)], known=True)
    assert decode_one(event_bytes(event_name="live"), decoder(catalog))
    assert reject_one(event_bytes(event_name="other"), decoder(catalog)).reason == "meter_unknown"
    assert reject_one(event_bytes(event_name="old"), decoder(catalog)).reason == "meter_inactive"


# --- identifier -----------------------------------------------------------------------------------


def test_identifier_derived_from_coordinates() -> None:
    assert decode_one(event_bytes(), offset=42, partition=3)["identifier"] == "kafka-meter-events-3-42"


def test_null_identifier_is_the_same_as_absent() -> None:
    assert decode_one(event_bytes(identifier=None), offset=5)["identifier"] == "kafka-meter-events-0-5"


def test_given_identifier_is_kept_and_100_characters_is_the_limit() -> None:
    assert decode_one(event_bytes(identifier="id-1"))["identifier"] == "id-1"
    assert decode_one(event_bytes(identifier="i" * 100))["identifier"] == "i" * 100


@pytest.mark.parametrize("bad", ["", "i" * 101, 1, 1.5, True, ["a"], {"a": "b"}])
def test_invalid_identifier(bad: Any) -> None:
    assert reject_one(event_bytes(identifier=bad)).reason == "identifier_invalid"


def test_identifier_header_used_when_the_value_has_none() -> None:
    header = (("other", b"x"), ("ingestor.identifier", b"from-dlq-7"))
    assert decode_one(event_bytes(), headers=header)["identifier"] == "from-dlq-7"
    assert decode_one(event_bytes(identifier="own"), headers=header)["identifier"] == "own"


@pytest.mark.parametrize("value", [b"", b"\xff\xfe"])
def test_empty_or_undecodable_identifier_header_falls_back_to_coordinates(value: bytes) -> None:
    event = decode_one(event_bytes(), offset=9, headers=(("ingestor.identifier", value),))
    assert event["identifier"] == "kafka-meter-events-0-9"


def test_long_topic_gets_a_hashed_prefix() -> None:
    # "kafka-" + topic + "-0-" + a 20-digit offset: the plain prefix is used up to 100 characters in all.
    plain, hashed = "t" * 71, "t" * 72
    assert identifier_prefix(plain, 0) == f"kafka-{plain}-0-"
    prefix = identifier_prefix(hashed, 0)
    assert prefix.startswith("kafka-")
    assert plain not in prefix
    assert prefix == identifier_prefix(hashed, 0) != identifier_prefix(hashed + "x", 0)
    assert identifier_prefix(hashed, 0) != identifier_prefix(hashed, 1)
    for topic, partition in [(plain, 0), (hashed, 0), ("t" * 249, 0), ("t" * 249, 2**31 - 1), ("a" * 60, 99999)]:
        assert len(identifier_prefix(topic, partition) + str(2**63 - 1)) <= MAX_IDENTIFIER_CHARS


def test_long_topic_identifier_through_the_decoder() -> None:
    topic = "billing." + "x" * 240
    event = decode_one(event_bytes(), topic=topic, partition=11, offset=2**63 - 1)
    assert len(event["identifier"]) <= MAX_IDENTIFIER_CHARS
    assert event["identifier"] == identifier_prefix(topic, 11) + str(2**63 - 1)


def test_prefix_follows_the_partition_across_polls() -> None:
    dec = decoder()
    assert decode_one(event_bytes(), dec, partition=1, offset=1)["identifier"] == "kafka-meter-events-1-1"
    assert decode_one(event_bytes(), dec, partition=2, offset=1)["identifier"] == "kafka-meter-events-2-1"
    assert decode_one(event_bytes(), dec, topic="b", partition=1, offset=1)["identifier"] == "kafka-b-1-1"


# --- timestamp ------------------------------------------------------------------------------------


def test_absent_timestamp_uses_the_record_timestamp() -> None:
    assert decode_one(event_bytes(), timestamp=NOW_MS + 123)["timestamp"] == "2026-01-01T00:00:00.123Z"
    assert decode_one(event_bytes(timestamp=None), timestamp=NOW_MS - 1)["timestamp"] == "2025-12-31T23:59:59.999Z"


def test_record_timestamps_across_seconds_in_one_poll() -> None:
    stamps = [NOW_MS, NOW_MS + 5, NOW_MS + 1000, NOW_MS + 1005, NOW_MS + 5, NOW_MS - 60_000]
    events, _, _ = decoder().decode([rec(event_bytes(), offset=i, timestamp=t) for i, t in enumerate(stamps)], NOW)
    assert [e["timestamp"] for e in events] == [format_ms(t) for t in stamps]
    assert events[2]["timestamp"] == "2026-01-01T00:00:01.000Z"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1_767_225_600, "2026-01-01T00:00:00.000Z"),
        (1_767_225_600.5, "2026-01-01T00:00:00.500Z"),
        (1_767_225_599.9994, "2025-12-31T23:59:59.999Z"),
        (1_767_225_599.9996, "2026-01-01T00:00:00.000Z"),
        ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00.000Z"),
        ("2026-01-01T00:00:00.1Z", "2026-01-01T00:00:00.100Z"),
        ("2026-01-01T00:00:00.123456789Z", "2026-01-01T00:00:00.123Z"),
        ("2026-01-01t00:00:00.25z", "2026-01-01T00:00:00.250Z"),
        ("2026-01-01T05:30:00+05:30", "2026-01-01T00:00:00.000Z"),
        ("2025-12-31T16:00:00.007-08:00", "2026-01-01T00:00:00.007Z"),
        ("2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00.000Z"),
        ("2026-01-01T00:00:00-00:00", "2026-01-01T00:00:00.000Z"),
    ],
)
def test_timestamps_normalised_to_utc_milliseconds(raw: Any, expected: str) -> None:
    dec = decoder()
    assert decode_one(event_bytes(timestamp=raw), dec)["timestamp"] == expected
    assert decode_one(event_bytes(timestamp=raw), dec)["timestamp"] == expected  # from the cache


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "now",
        "2026-01-01",
        "2026-01-01T00:00:00",
        "2026-01-01T00:00:00.000",
        "2026-01-01 00:00:00Z",
        "2026-01-01T00:00Z",
        "2026-01-01T00:00+00:00",
        "2026-01-01T00:00:00+0000",
        "2026-01-01T00:00:00+00",
        "2026-01-01T00:00:00 +00:00",
        "2026-01-01T00:00:00,5Z",
        "2026-01-01T00:00:00.Z",
        "20260101T000000Z",
        "2026-13-01T00:00:00Z",
        "2026-02-29T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T23:59:60Z",
        "2026-01-01T00:00:00+24:00",
        "\u0662026-01-01T00:00:00Z",
        "2026-01-01T00:00:00Z\n",
        "Thu, 01 Jan 2026 00:00:00 GMT",
        True,
        False,
        [],
        {},
    ],
)
def test_invalid_timestamps(raw: Any) -> None:
    assert reject_one(event_bytes(timestamp=raw)).reason == "timestamp_invalid"


def test_invalid_timestamp_message_is_bounded() -> None:
    assert len(reject_one(event_bytes(timestamp="x" * 10_000)).message) < 200


@pytest.mark.parametrize("kind", ["string", "number", "record"])
def test_window_boundaries_are_inclusive(kind: str) -> None:
    lowest, highest = NOW - PAST_WINDOW_S, NOW + FUTURE_WINDOW_S
    assert lowest == NOW - 35 * 86400
    assert highest == NOW + 300

    def value_and_kw(seconds: float) -> tuple[bytes, dict[str, Any]]:
        if kind == "record":
            return event_bytes(), {"timestamp": round(seconds * 1000)}
        raw: Any = format_ms(round(seconds * 1000)) if kind == "string" else seconds
        return event_bytes(timestamp=raw), {}

    for seconds in (lowest, highest):
        value, kw = value_and_kw(seconds)
        assert decode_one(value, **kw)["timestamp"] == format_ms(round(seconds * 1000))
    value, kw = value_and_kw(lowest - 0.001)
    assert reject_one(value, **kw).reason == "timestamp_too_far_in_past"
    value, kw = value_and_kw(highest + 0.001)
    assert reject_one(value, **kw).reason == "timestamp_in_future"


def test_window_follows_now_for_cached_timestamps() -> None:
    dec = decoder()
    value = event_bytes(timestamp="2026-01-01T00:00:00Z")
    assert decode_one(value, dec)
    assert reject_one(value, dec, now=NOW + PAST_WINDOW_S + 1).reason == "timestamp_too_far_in_past"
    assert reject_one(value, dec, now=NOW - FUTURE_WINDOW_S - 1).reason == "timestamp_in_future"


def test_window_rejection_messages() -> None:
    assert "35 days" in reject_one(event_bytes(timestamp=0)).message
    message = reject_one(event_bytes(), timestamp=0).message
    assert "record's timestamp (0 ms)" in message


def test_timestamp_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "_TS_CACHE_LIMIT", 4)
    dec = decoder()
    stamps = [format_ms(NOW_MS - i * 1000) for i in range(10)]
    events, _, rejected = dec.decode([rec(event_bytes(timestamp=s), offset=i) for i, s in enumerate(stamps)], NOW)
    assert rejected == []
    assert [e["timestamp"] for e in events] == stamps
    assert len(dec._ts_cache) <= 4


def test_format_ms_and_parse_timestamp() -> None:
    assert format_ms(0) == "1970-01-01T00:00:00.000Z"
    assert format_ms(NOW_MS + 7) == "2026-01-01T00:00:00.007Z"
    assert parse_timestamp("2026-01-01T00:00:00Z") == NOW
    assert parse_timestamp("2026-01-01T01:00:00+01:00") == NOW
    for bad in ("2026-01-01T00:00:00", "2026-01-01T00:00+00:00"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


# --- the shape of the output ----------------------------------------------------------------------


def test_output_event_has_exactly_the_stream_fields() -> None:
    event = decode_one(event_bytes(payload(region="eu")), offset=3)
    assert event == {
        "event_name": "api_requests",
        "payload": {"stripe_customer_id": "cus_1", "value": "1", "region": "eu"},
        "identifier": "kafka-meter-events-0-3",
        "timestamp": "2026-01-01T00:00:00.000Z",
    }
    full = decode_one(event_bytes(identifier="x", timestamp="2026-01-01T00:00:00.5Z"))
    assert set(full) == FIELDS
    assert orjson.loads(orjson.dumps(full)) == full


def test_mixed_poll_keeps_order_and_accounts_for_every_record() -> None:
    bad = [b.value for b in BAD_RECORDS if not b.headers]
    values = [event_bytes(payload(n=str(i))) if i % 3 else bad[i] for i in range(30)]
    records = [rec(v, offset=100 + i) for i, v in enumerate(values)]
    events, sources, rejected = decoder().decode(records, NOW)
    assert len(events) + len(rejected) == len(records)
    assert sources == [r for i, r in enumerate(records) if i % 3]
    assert [e["payload"]["n"] for e in events] == [str(i) for i in range(30) if i % 3]
    assert [e["identifier"] for e in events] == [f"kafka-meter-events-0-{r.offset}" for r in sources]
    assert [r for r, _ in rejected] == [r for i, r in enumerate(records) if not i % 3]
    assert not {id(r) for r in sources} & {id(r) for r, _ in rejected}


def test_empty_poll() -> None:
    assert decoder().decode([], NOW) == ([], [], [])


# --- properties -----------------------------------------------------------------------------------

#: orjson takes integers from -2**63 to 2**64 - 1 (wider ones are parsed as floats, never written).
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
field_values = st.one_of(
    json_values,
    st.text(max_size=120),
    st.dictionaries(st.sampled_from(["stripe_customer_id", "value", "region"]), json_values, max_size=3),
)
near_valid = st.dictionaries(
    st.sampled_from(["event_name", "payload", "identifier", "timestamp", "extra"]), field_values, max_size=5
)


def check_accounting(values: list[bytes | None]) -> tuple[list[dict[str, Any]], list[tuple[Any, Rejection]]]:
    records = [rec(v, offset=i) for i, v in enumerate(values)]
    events, sources, rejected = decoder(max_record_bytes=512).decode(records, NOW)
    assert len(events) == len(sources)
    assert len(events) + len(rejected) == len(records)
    assert sorted([r.offset for r in sources] + [r.offset for r, _ in rejected]) == list(range(len(records)))
    assert [r.offset for r in sources] == sorted(r.offset for r in sources)
    for _, rejection in rejected:
        assert rejection.reason in REASONS
        assert rejection.reason not in DELIVERY_REASONS
    for event in events:
        assert set(event) == FIELDS
        assert all(type(v) is str for v in event["payload"].values())
    return events, rejected


@FAST
@given(st.lists(st.none() | st.binary(max_size=600), max_size=8))
def test_arbitrary_bytes_never_raise(values: list[bytes | None]) -> None:
    check_accounting(values)


@FAST
@given(st.lists(json_values, max_size=8))
def test_arbitrary_json_never_raises(values: list[Any]) -> None:
    check_accounting([orjson.dumps(v) for v in values])


@FAST
@given(st.lists(near_valid, max_size=8))
def test_arbitrary_event_shapes_never_raise(values: list[dict[str, Any]]) -> None:
    check_accounting([orjson.dumps(v) for v in values])


text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=100)
zones = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))


@st.composite
def valid_events(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A valid event and the unix milliseconds its timestamp should come out as."""
    body: dict[str, Any] = {
        "event_name": draw(text),
        "payload": {
            "stripe_customer_id": draw(text),
            "value": draw(st.integers(1, 10**15 - 1).flatmap(lambda n: st.sampled_from([n, str(n)]))),
        }
        | draw(
            st.dictionaries(
                st.text(max_size=10).filter(lambda k: k not in {"stripe_customer_id", "value"}),
                st.text() | st.integers(-(2**63), 2**63 - 1),
                max_size=3,
            )
        ),
    }
    if draw(st.booleans()):
        body["identifier"] = draw(text)
    ms = draw(st.integers(int((NOW - PAST_WINDOW_S) * 1000), int((NOW + FUTURE_WINDOW_S) * 1000)))
    style = draw(st.sampled_from(["absent", "seconds", "float", "rfc3339"]))
    if style == "seconds":
        ms -= ms % 1000
        body["timestamp"] = ms // 1000
    elif style == "float":
        body["timestamp"] = ms / 1000
    elif style == "rfc3339":
        moment = datetime.fromtimestamp(ms // 1000, UTC) + timedelta(milliseconds=ms % 1000)
        moment = moment.astimezone(draw(zones))
        body["timestamp"] = moment.isoformat(
            timespec=draw(st.sampled_from(["seconds", "milliseconds", "microseconds"]))
        )
        if body["timestamp"].endswith("+00:00") and draw(st.booleans()):
            body["timestamp"] = body["timestamp"][:-6] + "Z"
        if not body["timestamp"].count("."):
            ms -= ms % 1000
    return body, ms


@FAST
@given(st.lists(valid_events(), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_valid_events_round_trip(cases: list[tuple[dict[str, Any], int]], partition: int) -> None:
    records = [
        FakeRecord(TOPIC, partition, 1000 + i, ms, None, orjson.dumps(body), ()) for i, (body, ms) in enumerate(cases)
    ]
    events, sources, rejected = decoder().decode(records, NOW)
    assert rejected == []
    assert sources == records
    for (body, ms), event, record in zip(cases, events, records, strict=True):
        assert set(event) == FIELDS
        assert event["event_name"] == body["event_name"]
        assert event["payload"] == {k: str(v) for k, v in body["payload"].items()}
        assert event["identifier"] == body.get("identifier", f"kafka-{TOPIC}-{partition}-{record.offset}")
        assert event["timestamp"] == format_ms(ms)
        assert round(parse_timestamp(event["timestamp"]) * 1000) == ms
