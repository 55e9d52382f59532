"""Direct tests of the pure cores: aggregation, windows, signatures, faults, parsing, validation."""

from __future__ import annotations

import hashlib
import hmac
from array import array

import orjson
import pytest
import stripe
from hypothesis import given
from hypothesis import strategies as st

from ingestor_dev.emulator.aggregation import Query, check_range, latest_per_window, summarize
from ingestor_dev.emulator.auth import check_key, credential
from ingestor_dev.emulator.errors import ApiError
from ingestor_dev.emulator.faults import FaultPlanner, Faults, Outcome, faults_from_json
from ingestor_dev.emulator.forms import parse_form
from ingestor_dev.emulator.lists import paginate
from ingestor_dev.emulator.meters import Meter
from ingestor_dev.emulator.reports import Failure, build_reports, webhook_event
from ingestor_dev.emulator.signature import signature_header
from ingestor_dev.emulator.stats import latency_percentiles
from ingestor_dev.emulator.stream_body import parse_stream_body
from ingestor_dev.emulator.timefmt import TimestampError, format_rfc3339, parse_rfc3339
from ingestor_dev.emulator.validation import check_value, decode_columns, decode_values
from ingestor_dev.emulator.windows import FixedWindowLimiter, SlidingWindowMax, max_in_window

H = 3600
D = 86400
BASE = 1_700_000_000 - 1_700_000_000 % D  # a UTC midnight


# -- aggregation ------------------------------------------------------------------------------------

EVENTS = [(BASE + 10, 5), (BASE + 20, 7), (BASE + H + 5, 3), (BASE + H + 1, 11)]


@pytest.mark.parametrize(
    ("formula", "expected"),
    [("count", 4), ("sum", 26), ("last", 3)],
)
def test_formulas_over_the_whole_range(formula, expected):
    [summary] = summarize(EVENTS, formula, Query(BASE, BASE + D))
    assert (summary.start_time, summary.end_time, summary.aggregated_value) == (BASE, BASE + D, expected)


def test_start_is_inclusive_and_end_exclusive():
    events = [(BASE, 1), (BASE + 60, 10), (BASE + 120, 100)]
    [summary] = summarize(events, "sum", Query(BASE, BASE + 120))
    assert summary.aggregated_value == 11


def test_empty_range_aggregates_to_zero_for_every_formula():
    for formula in ("count", "sum", "last"):
        assert summarize([], formula, Query(BASE, BASE + 60))[0].aggregated_value == 0


def test_last_breaks_timestamp_ties_by_arrival():
    events = [(BASE + 5, 1), (BASE + 5, 2)]
    assert summarize(events, "last", Query(BASE, BASE + 60))[0].aggregated_value == 2


@pytest.mark.parametrize(
    ("window", "formula", "expected"),
    [
        ("hour", "sum", 7 + 3),  # hour 0 keeps the 20 s event; hour 1 keeps the +5 s event
        ("hour", "count", 2),
        ("hour", "last", 3),
        ("day", "sum", 3),  # only the most recent event of the day counts
        ("day", "count", 1),
        ("day", "last", 3),
    ],
)
def test_event_time_window_keeps_only_the_latest_event_per_window(window, formula, expected):
    [summary] = summarize(EVENTS, formula, Query(BASE, BASE + D), event_time_window=window)
    assert summary.aggregated_value == expected


def test_latest_per_window_uses_the_event_timestamp_not_arrival():
    kept = latest_per_window([(BASE + H + 50, 1), (BASE + H + 10, 2)], "hour")
    assert kept == [(BASE + H + 50, 1)]


def test_value_grouping_by_hour_returns_every_window_oldest_first():
    summaries = summarize(EVENTS, "sum", Query(BASE, BASE + 3 * H, "hour"))
    assert [(s.start_time, s.end_time, s.aggregated_value) for s in summaries] == [
        (BASE, BASE + H, 12),
        (BASE + H, BASE + 2 * H, 14),
        (BASE + 2 * H, BASE + 3 * H, 0),
    ]


def test_value_grouping_by_day():
    events = [(BASE + 1, 1), (BASE + D + 1, 2), (BASE + D + 2, 4)]
    summaries = summarize(events, "count", Query(BASE, BASE + 2 * D, "day"))
    assert [s.aggregated_value for s in summaries] == [1, 2]


@pytest.mark.parametrize(
    ("start", "end", "grouping", "ok"),
    [
        (BASE, BASE + 60, None, True),
        (BASE + 1, BASE + 60, None, False),
        (BASE, BASE + 61, None, False),
        (BASE, BASE, None, False),
        (BASE, BASE + H, "hour", True),
        (BASE + 60, BASE + H, "hour", False),
        (BASE, BASE + H, "day", False),
        (BASE, BASE + D, "day", True),
    ],
)
def test_check_range(start, end, grouping, ok):
    assert (check_range(start, end, grouping) is None) is ok


# -- windows ----------------------------------------------------------------------------------------


def test_fixed_window_limiter_allows_limit_per_second_and_resets():
    limiter = FixedWindowLimiter()
    assert [limiter.allow("k", 2, 10.1) for _ in range(3)] == [True, True, False]
    assert limiter.allow("other", 2, 10.5)
    assert limiter.allow("k", 2, 11.0)
    assert all(limiter.allow("k", 0, 11.0) for _ in range(100))


def test_sliding_window_max_matches_the_reference():
    arrivals = [0.0, 0.2, 0.5, 0.99, 1.0, 1.1, 1.5, 2.6, 2.7, 3.4, 3.45, 3.5, 3.55]
    window = SlidingWindowMax()
    for moment in arrivals:
        window.add(moment)
    assert window.max_count == max_in_window(arrivals) == 6
    assert window.per_second == {0: 4, 1: 3, 2: 2, 3: 4}


def test_sliding_window_is_half_open():
    window = SlidingWindowMax()
    for moment in (0.0, 1.0):
        window.add(moment)
    assert window.max_count == 1


# -- signatures and reports -------------------------------------------------------------------------


def test_signature_header_is_stripes_hmac():
    header = signature_header('{"a":1}', "whsec_x", 1700000000)
    expected = hmac.new(b"whsec_x", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    stripe.WebhookSignature.verify_header('{"a":1}', header, "whsec_x", tolerance=None)


def _failure(index: int, code: str = "meter_event_invalid_value", meter: str | None = "mtr_1") -> Failure:
    return Failure(f"id{index}", "api_call", meter, livemode=False, code=code, message="bad", arrival=BASE + index)


def test_reports_carry_every_failure_in_chunks_of_100():
    failures = [_failure(i, "meter_event_invalid_value" if i % 3 else "timestamp_in_future") for i in range(250)]
    failures += [_failure(1000 + i, "no_meter", None) for i in range(3)]
    counter = iter(range(100))
    reports = build_reports(failures, BASE + 999, lambda prefix: f"{prefix}{next(counter)}")
    assert [r["reason"]["error_count"] for r in reports] == [100, 100, 50, 3]
    assert [r["type"] for r in reports][-1] == "v1.billing.meter.no_meter_found"
    identifiers = [
        sample["request"]["identifier"]
        for report in reports
        for kind in report["reason"]["error_types"]
        for sample in kind["sample_errors"]
    ]
    assert sorted(identifiers) == sorted(f.identifier for f in failures)
    for report in reports:
        kinds = report["reason"]["error_types"]
        assert sum(k["error_count"] for k in kinds) == report["reason"]["error_count"]
        assert all(k["error_count"] == len(k["sample_errors"]) for k in kinds)
    assert reports[0]["validation_start"] == format_rfc3339(BASE)


def test_webhook_event_is_a_v1_snapshot_event():
    [report] = build_reports([_failure(1)], BASE, lambda prefix: prefix + "x")
    event = webhook_event(report, "evt_1", 123)
    assert event["object"] == "event"
    assert event["data"]["object"] is report
    assert event["related_object"]["id"] == "mtr_1"


# -- faults -----------------------------------------------------------------------------------------


def test_fault_decisions_are_deterministic_under_a_seed():
    faults = Faults(error_retry_true=0.3, rate_limit=0.3, latency_s=0.01, latency_jitter_s=0.02)
    runs = []
    for _ in range(2):
        planner = FaultPlanner(faults, seed=42)
        runs.append([planner.decide(is_stream=True) for _ in range(50)])
    assert runs[0] == runs[1]
    outcomes = {decision.outcome for decision in runs[0]}
    assert outcomes == {Outcome.ERROR_RETRY_TRUE, Outcome.RATE_LIMIT, Outcome.NONE}
    assert all(0.01 <= d.latency_s <= 0.03 for d in runs[0])


def test_fault_scope_and_budget():
    planner = FaultPlanner(Faults(error_no_header=1.0, max_faults=2), seed=0)
    assert planner.decide(is_stream=False).outcome is Outcome.NONE
    assert [planner.decide(is_stream=True).outcome for _ in range(3)] == [
        Outcome.ERROR_NO_HEADER,
        Outcome.ERROR_NO_HEADER,
        Outcome.NONE,
    ]
    planner.set(Faults(lock_timeout=1.0, scope="all"))
    assert planner.decide(is_stream=False).outcome is Outcome.LOCK_TIMEOUT


@pytest.mark.parametrize(
    "changes",
    [{"error_retry_true": 1.5}, {"rate_limit": 0.6, "reset_after": 0.6}, {"scope": "everything"}, {"nope": 1}],
)
def test_bad_faults_are_rejected(changes):
    with pytest.raises(ValueError, match="fault"):
        faults_from_json(Faults(), changes)


# -- parsing and validation -------------------------------------------------------------------------


def test_rfc3339_round_trip_with_milliseconds():
    assert format_rfc3339(1717243200.5) == "2024-06-01T12:00:00.500Z"
    assert parse_rfc3339("2024-06-01T12:00:00.500Z") == 1717243200.5
    assert parse_rfc3339("2024-06-01T14:00:00+02:00") == 1717243200.0
    for bad in ("2024-06-01", "2024-06-01T12:00:00", "yesterday", "2024-13-01T00:00:00Z"):
        with pytest.raises(TimestampError):
            parse_rfc3339(bad)


def _body(events) -> bytes:
    return orjson.dumps({"events": events})


def _event(i, **changes):
    base = {"event_name": "e", "identifier": f"i{i}", "payload": {"stripe_customer_id": "c", "value": "1"}}
    base.update(changes)
    return base


@pytest.mark.parametrize(
    ("events", "param"),
    [
        ([_event(0), _event(1, payload={"stripe_customer_id": "c", "value": 5})], "events[1].payload.value"),
        ([_event(0), _event(1), {"identifier": "x", "payload": {}}], "events[2].event_name"),
        ([_event(0, payload=None)], "events[0].payload"),
        ([_event(0), _event(1, timestamp="soon")], "events[1].timestamp"),
        ([_event(0, timestamp=1700000000)], "events[0].timestamp"),
        ([_event(0, identifier="x" * 101)], "events[0].identifier"),
        ([_event(0), "nope"], "events[1]"),
    ],
)
def test_stream_body_names_the_first_offending_event(events, param):
    with pytest.raises(ApiError) as caught:
        parse_stream_body(_body(events), 0.0)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert param in caught.value.message


def test_stream_body_limits():
    with pytest.raises(ApiError, match="at most 100"):
        parse_stream_body(_body([_event(i) for i in range(101)]), 0.0)
    with pytest.raises(ApiError, match="events"):
        parse_stream_body(b'{"evts": []}', 0.0)
    with pytest.raises(ApiError) as caught:
        parse_stream_body(b"{not json", 0.0)
    assert caught.value.code == "invalid_json"


def test_stream_body_defaults_identifier_and_timestamp():
    batch = parse_stream_body(_body([{"event_name": "e", "payload": {}}, _event(1)]), 123.0)
    assert batch.identifiers[0].startswith("emu_")
    assert batch.timestamps == [123.0, 123.0]


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("1", None),
        ("007", None),
        ("0", "meter_event_invalid_value"),
        ("-1", "meter_event_invalid_value"),
        ("1.5", "meter_event_invalid_value"),
        ("١٢", "meter_event_invalid_value"),
        ("9" * 18, None),
        ("9" * 19, "meter_event_value_too_many_digits"),
    ],
)
def test_check_value(value, code):
    problem = check_value(value)
    assert (problem.code if problem else None) == code


def test_decode_columns_is_all_or_nothing():
    meter = Meter("m", "d", "e", "sum", "stripe_customer_id", "value", None, livemode=False, created=0)
    good = [{"stripe_customer_id": "c1", "value": "2"}, {"stripe_customer_id": "c2", "value": "30"}]
    assert decode_columns(meter, good) == (("c1", "c2"), array("q", [2, 30]))
    assert decode_columns(meter, [*good, {"stripe_customer_id": "c3"}]) is None
    assert decode_columns(meter, [*good, {"stripe_customer_id": "c3", "value": "0"}]) is None
    assert decode_columns(meter, [*good, {"stripe_customer_id": "", "value": "1"}]) is None


def _decoded_one_by_one(values: list[str]) -> array[int] | None:
    """The reference for `decode_values`: rule 3 checked value by value."""
    if any(check_value(value) for value in values):
        return None
    return array("q", map(int, values))


_VALUES = st.one_of(
    st.integers(min_value=0, max_value=10**20).map(str),
    st.sampled_from(["", "0", "00", "007", "1" * 18, "9" * 18, "9" * 19, "1" + "0" * 18, "-1", "1.5", "1e3", "\u0661"]),
    st.text(alphabet="0123456789", max_size=21),
)


@given(st.lists(_VALUES, min_size=1, max_size=12))
def test_decode_values_matches_the_rule_value_by_value(values):
    assert decode_values(values) == _decoded_one_by_one(values)


def _meters() -> dict[str, Meter]:
    return {"e": Meter("m", "d", "e", "sum", "stripe_customer_id", "value", None, livemode=False, created=0)}


def test_stream_body_decodes_one_meter_batches_at_intake():
    batch = parse_stream_body(
        _body([_event(1), _event(2, payload={"stripe_customer_id": "d", "value": "7"})]), 5.0, _meters()
    )
    assert (batch.meter_id, batch.owners, batch.numbers) == ("m", ("c", "d"), array("q", [1, 7]))
    assert (batch.names, batch.payloads, list(batch.timestamps)) == ([], [], [5.0, 5.0])
    kept = batch.select([1])
    assert (kept.identifiers, kept.owners, kept.numbers, kept.meter_id) == (("i2",), ("d",), array("q", [7]), "m")
    extra = parse_stream_body(
        _body([_event(1, payload={"stripe_customer_id": "c", "value": "3", "x": "y"})]), 0, _meters()
    )
    assert (extra.meter_id, extra.numbers) == ("m", array("q", [3]))
    failing = parse_stream_body(_body([_event(1, payload={"stripe_customer_id": "c", "value": "0"})]), 0, _meters())
    assert (failing.meter_id, failing.names) == (None, ["e"])


@pytest.mark.parametrize(
    ("events", "param"),
    [
        ([_event(0), _event(1, payload={"stripe_customer_id": "c", "value": "1", "x": 5})], "events[1].payload.x"),
        ([_event(0, payload={"stripe_customer_id": 7, "value": "1"})], "events[0].payload.stripe_customer_id"),
        ([_event(0, timestamp={})], "events[0].timestamp"),
        ([_event(0), _event(1, timestamp=[1])], "events[1].timestamp"),
    ],
)
def test_stream_body_with_meters_names_the_first_offending_event(events, param):
    for meters in (None, _meters()):
        with pytest.raises(ApiError) as caught:
            parse_stream_body(_body(events), 0.0, meters)
        assert (caught.value.status, caught.value.param) == (400, param)


# -- small helpers ----------------------------------------------------------------------------------


def test_forms_nest_brackets():
    form = parse_form("display_name=x&default_aggregation[formula]=sum&customer_mapping[event_payload_key]=cust")
    assert form == {
        "display_name": "x",
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"event_payload_key": "cust"},
    }


def test_pagination():
    items = [f"o{i}" for i in range(5)]
    assert paginate(items, str, {"limit": "2"}) == (["o0", "o1"], True)
    assert paginate(items, str, {"limit": "2", "starting_after": "o3"}) == (["o4"], False)
    assert paginate(items, str, {"limit": "2", "ending_before": "o3"}) == (["o1", "o2"], True)
    with pytest.raises(ApiError):
        paginate(items, str, {"limit": "0"})


def test_keys_and_credentials():
    assert check_key("Bearer sk_live_abc", frozenset()).livemode is True
    assert check_key("Bearer rk_test_abc", frozenset()).livemode is False
    assert credential("Basic c2tfdGVzdF94Og==", allow_basic=True) == "sk_test_x"
    assert credential("Basic c2tfdGVzdF94Og==", allow_basic=False) is None
    for header in (None, "Bearer pk_test_abc", "Bearer sk_test_", "Token sk_test_abc"):
        with pytest.raises(ApiError) as caught:
            check_key(header, frozenset())
        assert caught.value.status == 401
    with pytest.raises(ApiError):
        check_key("Bearer sk_test_other", frozenset({"sk_test_known"}))


def test_latency_percentiles_nearest_rank():
    values = array("d", [i / 1000 for i in range(1, 101)])
    assert latency_percentiles(values) == {"count": 100, "p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert latency_percentiles(array("d"))["count"] == 0
