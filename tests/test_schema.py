"""ingestor/schemas/meter-event.schema.json describes what ingestor.events.Decoder accepts."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor.catalog import MeterCatalog
from ingestor.events import FUTURE_WINDOW_S, PAST_WINDOW_S, Decoder, format_ms
from tests.corpus import BAD_RECORDS, DEFAULT_MAX_RECORD_BYTES, BadRecord, FakeRecord, event_bytes, good_event

if TYPE_CHECKING:
    from ingestor.cancellation import Cancellation

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a dev dependency")

NOW = 1_767_225_600.0
SCHEMA = orjson.loads((resources.files("ingestor") / "schemas" / "meter-event.schema.json").read_bytes())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
METER_VALUE = jsonschema.Draft202012Validator(SCHEMA["$defs"]["meterValue"])

#: Reasons about the event's own shape, which the schema states (the rest need the catalog, the clock, the
#: record's size or bytes).
SHAPE_REASONS = {
    "not_object",
    "unknown_field",
    "event_name_missing",
    "event_name_invalid",
    "payload_missing",
    "payload_not_object",
    "payload_value_not_string",
    "identifier_invalid",
    "timestamp_invalid",
    # the default keys (stripe_customer_id, value), stated by the schema
    "customer_missing",
    "value_missing",
    "value_invalid",
    "value_too_many_digits",
}
#: Shape errors JSON Schema cannot see: 3.0 counts as an integer; a header is not in the value; February 30th
#: needs format assertion, which is optional in draft 2020-12.
NOT_SCHEMA_DETECTABLE = {"payload_value_whole_float", "identifier_header_101_chars", "timestamp_impossible_date"}
VALUE_REASONS = {"value_invalid", "value_too_many_digits"}


def decodes(value: bytes, now: float = NOW, headers: tuple[tuple[str, bytes], ...] = ()) -> bool:
    record = FakeRecord("meter-events", 0, 1, int(now * 1000), None, value, headers)
    cancels: list[Cancellation] = []
    events, _, _ = Decoder(MeterCatalog(), max_record_bytes=DEFAULT_MAX_RECORD_BYTES).decode([record], now, cancels)
    return bool(events or cancels)


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["oneOf"] == [{"$ref": "#/$defs/meterEvent"}, {"$ref": "#/$defs/cancellation"}]
    event, cancel = SCHEMA["$defs"]["meterEvent"], SCHEMA["$defs"]["cancellation"]
    assert event["additionalProperties"] is cancel["additionalProperties"] is False
    assert set(event["properties"]) == {"event_name", "payload", "identifier", "timestamp"}
    assert set(cancel["properties"]) == set(cancel["required"]) == {"event_name", "type", "cancel"}


def test_examples_validate_and_decode_whenever_they_are_read() -> None:
    for example in SCHEMA["examples"]:
        assert "timestamp" not in example  # a dated example goes stale (35 days): they take the record's time
        VALIDATOR.validate(example)
        assert decodes(orjson.dumps(example))


@pytest.mark.parametrize(
    ("value", "customer"), [("0", "c"), ("007", "c"), ("1" * 16, "c"), (1.0, "c"), ("1", ""), (0, "c")]
)
def test_the_schema_and_the_decoder_both_refuse_the_default_keys_bad_forms(value: object, customer: str) -> None:
    event = {"event_name": "e", "payload": {"stripe_customer_id": customer, "value": value}}
    assert not decodes(orjson.dumps(event))
    if value != 1.0:  # 1.0 equals 1 in JSON Schema: the one form only the decoder can tell (see NOT_SCHEMA_DETECTABLE)
        assert not VALIDATOR.is_valid(event)


def test_meter_value_is_referenced() -> None:
    assert SCHEMA["$defs"]["meterEvent"]["properties"]["payload"]["properties"]["value"]["$ref"] == "#/$defs/meterValue"


VALID = [
    good_event(1, customer="cus_1", event_name="api_requests", value=5),
    good_event(2, customer="cus_1", event_name="e" * 100, value=999_999_999_999_999, timestamp=NOW - 10),
    event_bytes(),
    event_bytes({"stripe_customer_id": 42, "value": 7, "region": "eu", "shard": -3}),
    event_bytes(identifier=None, timestamp=None),
    event_bytes(identifier="i" * 100),
    event_bytes(timestamp=int(NOW)),
    event_bytes(timestamp=NOW - 0.5),
    event_bytes(timestamp="2026-01-01T00:00:00Z"),
    event_bytes(timestamp="2025-12-31T19:00:00.123456789-05:00"),
    event_bytes(timestamp="2026-01-01t00:00:00z"),
    event_bytes(timestamp=format_ms(int((NOW - PAST_WINDOW_S) * 1000))),
    event_bytes(timestamp=NOW + FUTURE_WINDOW_S),
]


@pytest.mark.parametrize("value", VALID)
def test_valid_events_validate_and_decode(value: bytes) -> None:
    VALIDATOR.validate(orjson.loads(value))
    assert decodes(value)


SCHEMA_CASES = [b for b in BAD_RECORDS if b.reason in SHAPE_REASONS and b.name not in NOT_SCHEMA_DETECTABLE]


@pytest.mark.parametrize("bad", SCHEMA_CASES, ids=[b.name for b in SCHEMA_CASES])
def test_shape_errors_in_the_corpus_fail_the_schema(bad: BadRecord) -> None:
    assert bad.value is not None
    assert not VALIDATOR.is_valid(orjson.loads(bad.value))


def test_enough_of_the_corpus_is_schema_detectable() -> None:
    assert len(SCHEMA_CASES) >= 25
    assert {b.reason for b in SCHEMA_CASES} == SHAPE_REASONS


@pytest.mark.parametrize("bad", [b for b in BAD_RECORDS if b.name in NOT_SCHEMA_DETECTABLE], ids=lambda b: b.name)
def test_documented_blind_spots_pass_the_schema(bad: BadRecord) -> None:
    assert bad.value is not None
    assert VALIDATOR.is_valid(orjson.loads(bad.value))
    assert not decodes(bad.value, headers=bad.headers)


VALUE_CASES = [b for b in BAD_RECORDS if b.reason in VALUE_REASONS]


@pytest.mark.parametrize("bad", VALUE_CASES, ids=[b.name for b in VALUE_CASES])
def test_bad_values_fail_meter_value(bad: BadRecord) -> None:
    assert bad.value is not None
    event = orjson.loads(bad.value)
    assert not VALIDATOR.is_valid(event)  # payload.value refers to $defs/meterValue
    assert not METER_VALUE.is_valid(event["payload"]["value"])


@pytest.mark.parametrize("value", ["1", "9" * 15, 1, 999_999_999_999_999, "100"])
def test_good_values_pass_meter_value(value: Any) -> None:
    assert METER_VALUE.is_valid(value)
    assert decodes(event_bytes({"stripe_customer_id": "c", "value": value}))


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(-1e20, 1e20),
    st.text(max_size=8),
    st.sampled_from(["", "x" * 100, "x" * 101, "2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "2026-01-01T00:00Z"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=2), st.dictionaries(st.text(max_size=3), scalars, max_size=2))
payloads = st.one_of(
    values,
    st.fixed_dictionaries(
        {"stripe_customer_id": st.just("cus_1"), "value": st.just("1")},
        optional={"region": values, "n": st.integers(-(2**63), 2**64 - 1)},
    ),
)
events = st.fixed_dictionaries(
    {},
    optional={
        "event_name": st.one_of(values, st.text(min_size=1, max_size=101)),
        "payload": payloads,
        "identifier": values,
        "timestamp": st.one_of(values, st.floats(NOW - 86400, NOW), st.integers(int(NOW) - 86400, int(NOW))),
        "extra": values,
    },
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_schema_agrees_with_the_decoder_on_shape(event: dict[str, Any]) -> None:
    """What the decoder accepts is schema-valid; schema-valid shapes fail only for reasons the schema leaves out."""
    value = orjson.dumps(event)
    valid = VALIDATOR.is_valid(event)
    record = FakeRecord("meter-events", 0, 1, int(NOW * 1000), None, value, ())
    accepted, _, rejected = Decoder(MeterCatalog(), max_record_bytes=DEFAULT_MAX_RECORD_BYTES).decode([record], NOW)
    if accepted:
        assert valid
    elif valid:
        reason = rejected[0][1].reason
        whole_float = reason == "payload_value_not_string" and any(
            type(v) is float and v.is_integer() for v in event["payload"].values()
        )
        assert whole_float or reason not in SHAPE_REASONS, reason


identifiers = st.one_of(values, st.text(min_size=1, max_size=101))
cancellations = st.fixed_dictionaries(
    {"type": st.one_of(st.just("cancel"), values)},
    optional={
        "event_name": st.one_of(values, st.text(min_size=1, max_size=101)),
        "cancel": st.one_of(
            values,
            st.fixed_dictionaries({"identifier": identifiers}, optional={"extra": values}),
        ),
        "payload": payloads,
    },
)


@settings(max_examples=300, deadline=None)
@given(cancellations)
def test_schema_and_decoder_agree_exactly_on_cancellations(document: dict[str, Any]) -> None:
    """A record with a type is a cancellation: the decoder takes it exactly when the schema says it is valid."""
    value = orjson.dumps(document)
    record = FakeRecord("meter-events", 0, 1, int(NOW * 1000), None, value, ())
    cancels: list[Cancellation] = []
    events, _, rejected = Decoder(MeterCatalog(), max_record_bytes=DEFAULT_MAX_RECORD_BYTES).decode(
        [record], NOW, cancels
    )
    assert events == []
    assert bool(cancels) == VALIDATOR.is_valid(document), rejected
