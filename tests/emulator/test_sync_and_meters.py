"""Synchronous meter events (v2 and v1), adjustments, v1 meters and event summaries over HTTP."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest

from ingestor_dev.emulator import Emulator, EmulatorConfig, Faults
from tests.emulator.conftest import LIVE_KEY, TEST_KEY, Api, FakeClock, event, stamp

pytestmark = pytest.mark.asyncio(loop_scope="function")

EVENTS = "/v2/billing/meter_events"
ADJUST = "/v2/billing/meter_event_adjustments"


async def test_v2_sync_event_is_returned(api: Api):
    await api.meter()
    status, body, _ = await api.call("POST", EVENTS, json=event("s1", "25"))
    assert status == 200
    assert body["object"] == "v2.billing.meter_event"
    assert body["payload"] == {"stripe_customer_id": "cus_1", "value": "25"}
    assert body["livemode"] is False
    assert body["timestamp"].endswith("Z")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (event("e1", name="unknown"), "no_meter"),
        (event("e2", payload={"value": "1"}), "payload_no_customer_defined"),
        (event("e3", payload={"stripe_customer_id": "cus_1"}), "payload_no_value_defined"),
        (event("e4", "-3"), "payload_invalid_value"),
        (event("e5", "1.5"), "payload_invalid_value"),
        (event("e6", "0"), "payload_invalid_value"),
        (event("e7", "9" * 19), "payload_invalid_value"),
    ],
)
async def test_v2_sync_error_codes(api: Api, body, code):
    await api.meter()
    status, answer, _ = await api.call("POST", EVENTS, json=body)
    assert (status, answer["error"]["code"]) == (400, code)
    assert answer["error"]["type"] == "invalid_request_error"


async def test_v2_sync_archived_meter_and_duplicates(api: Api):
    meter = await api.meter()
    assert (await api.call("POST", EVENTS, json=event("dup")))[0] == 200
    status, body, _ = await api.call("POST", EVENTS, json=event("dup"))
    assert (status, body["error"]["code"]) == (400, "duplicate_meter_event")
    await api.call("POST", f"/v1/billing/meters/{meter['id']}/deactivate", form={})
    status, body, _ = await api.call("POST", EVENTS, json=event("other"))
    assert (status, body["error"]["code"]) == (400, "archived_meter")
    stats = await api.emu.stats()
    assert (stats["events_accepted"], stats["duplicates_dropped"]) == (1, 1)


async def test_v2_sync_timestamps(api: Api):
    await api.meter()
    now = api.emu.state.clock()
    past = await api.call("POST", EVENTS, json=event("p", timestamp=stamp(now - 36 * 86400)))
    future = await api.call("POST", EVENTS, json=event("f", timestamp=stamp(now + 600)))
    assert past[1]["error"]["code"] == "timestamp_too_far_in_past"
    assert future[1]["error"]["code"] == "timestamp_in_future"


async def test_v2_sync_concurrent_calls_on_one_customer_and_meter_conflict(api: Api):
    await api.meter()
    api.emu.set_faults(Faults(latency_s=0.2, scope="all"))
    first, second, other = await asyncio.gather(
        api.call("POST", EVENTS, json=event("c1")),
        api.call("POST", EVENTS, json=event("c2")),
        api.call("POST", EVENTS, json=event("c3", customer="cus_2")),
    )
    statuses = sorted([first[0], second[0]])
    assert statuses == [200, 409]
    conflict = first if first[0] == 409 else second
    assert conflict[1]["error"]["code"] == "too_many_concurrent_requests"
    assert other[0] == 200
    api.emu.set_faults()
    assert (await api.call("POST", EVENTS, json=event("c4")))[0] == 200


async def test_adjustment_cancels_within_24_hours(clock: FakeClock):
    async with Emulator(EmulatorConfig(stream_rps_limit=0), clock=clock) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        meter = await api.meter()
        token = await api.session()
        await api.stream(
            token, [event("k1", "10", timestamp=stamp(clock.now)), event("k2", "5", timestamp=stamp(clock.now))]
        )
        cancel = {"event_name": "api_call", "type": "cancel", "cancel": {"identifier": "k1"}}
        status, body, _ = await api.call("POST", ADJUST, json=cancel)
        assert (status, body["object"], body["status"]) == (200, "v2.billing.meter_event_adjustment", "complete")
        assert (await api.call("POST", ADJUST, json=cancel))[1]["error"]["code"] == "invalid_cancel_configuration"
        start = int(clock.now) // 60 * 60
        _, summary = await api.summaries(meter["id"], "cus_1", start, start + 60)
        assert summary["data"][0]["aggregated_value"] == 5
        clock.advance(24 * 3600 + 1)
        late = dict(cancel, cancel={"identifier": "k2"})
        assert (await api.call("POST", ADJUST, json=late))[1]["error"]["code"] == "invalid_cancel_configuration"


@pytest.mark.parametrize(
    "body",
    [
        {"event_name": "api_call", "type": "cancel", "cancel": {"identifier": "never-sent"}},
        {"event_name": "api_call", "type": "cancel"},
        {"event_name": "api_call", "type": "restate", "cancel": {"identifier": "x"}},
        {"event_name": "other", "type": "cancel", "cancel": {"identifier": "x"}},
    ],
)
async def test_invalid_cancel_configuration(api: Api, body):
    await api.meter()
    assert (await api.call("POST", EVENTS, json=event("x")))[0] == 200
    status, answer, _ = await api.call("POST", ADJUST, json=body)
    assert (status, answer["error"]["code"]) == (400, "invalid_cancel_configuration")


async def test_v1_meter_event_form_and_basic_auth(api: Api):
    await api.meter()
    basic = base64.b64encode(f"{TEST_KEY}:".encode()).decode()
    form = {"event_name": "api_call", "payload[stripe_customer_id]": "cus_1", "payload[value]": "4", "identifier": "v1"}
    status, body, _ = await api.call(
        "POST", "/v1/billing/meter_events", key=None, form=form, headers={"Authorization": f"Basic {basic}"}
    )
    assert status == 200
    assert body["object"] == "billing.meter_event"
    assert isinstance(body["timestamp"], int)
    status, body, _ = await api.call("POST", "/v1/billing/meter_events", form=form)
    assert (status, body["error"]["code"]) == (400, "duplicate_meter_event")


async def test_meters_create_list_retrieve_deactivate_reactivate(api: Api):
    first = await api.meter("one", "count", event_time_window="hour")
    assert first["event_time_window"] == "hour"
    assert first["customer_mapping"] == {"type": "by_id", "event_payload_key": "stripe_customer_id"}
    second = await api.meter(
        "two",
        "last",
        **{
            "customer_mapping[type]": "by_id",
            "customer_mapping[event_payload_key]": "cust",
            "value_settings[event_payload_key]": "n",
        },
    )
    assert second["value_settings"] == {"event_payload_key": "n"}
    third = await api.meter("three")
    status, page, _ = await api.call("GET", "/v1/billing/meters", params={"limit": 2})
    assert (page["object"], page["has_more"], page["url"]) == ("list", True, "/v1/billing/meters")
    assert [m["id"] for m in page["data"]] == [third["id"], second["id"]]
    _, rest, _ = await api.call("GET", "/v1/billing/meters", params={"limit": 2, "starting_after": second["id"]})
    assert ([m["id"] for m in rest["data"]], rest["has_more"]) == ([first["id"]], False)
    _, body, _ = await api.call("POST", f"/v1/billing/meters/{first['id']}/deactivate", form={})
    assert body["status"] == "inactive"
    assert body["status_transitions"]["deactivated_at"] is not None
    _, inactive, _ = await api.call("GET", "/v1/billing/meters", params={"status": "inactive"})
    assert [m["id"] for m in inactive["data"]] == [first["id"]]
    _, body, _ = await api.call("POST", f"/v1/billing/meters/{first['id']}/reactivate", form={})
    assert body["status"] == "active"
    status, body, _ = await api.call("GET", f"/v1/billing/meters/{second['id']}")
    assert (status, body["id"]) == (200, second["id"])
    status, body, _ = await api.call("GET", "/v1/billing/meters/mtr_missing")
    assert (status, body["error"]["code"]) == (404, "resource_missing")


async def test_meter_create_errors(api: Api):
    await api.meter("dup")
    cases = [
        {"display_name": "x", "event_name": "dup", "default_aggregation[formula]": "sum"},
        {"display_name": "x", "event_name": "new", "default_aggregation[formula]": "median"},
        {"display_name": "x", "event_name": "new"},
        {"event_name": "new", "default_aggregation[formula]": "sum"},
        {"display_name": "x", "event_name": "new", "default_aggregation[formula]": "sum", "event_time_window": "week"},
    ]
    for form in cases:
        status, body, _ = await api.call("POST", "/v1/billing/meters", form=form)
        assert status == 400, form
        assert body["error"]["type"] == "invalid_request_error"
    # meters are per mode
    assert (await api.meter("dup", key=LIVE_KEY))["livemode"] is True


async def test_event_summaries_exact_totals_and_grouping(api: Api):
    meter = await api.meter("usage", "sum")
    token = await api.session()
    now = api.emu.state.clock()
    hour = int(now) // 3600 * 3600
    events = [
        event("u1", "10", name="usage", timestamp=stamp(hour - 3600 + 5)),
        event("u2", "20", name="usage", timestamp=stamp(hour - 3600 + 59)),
        event("u3", "30", name="usage", timestamp=stamp(hour)),
        event("u4", "40", name="usage", customer="cus_2", timestamp=stamp(hour)),
    ]
    assert (await api.stream(token, events))[0] == 200
    status, body = await api.summaries(meter["id"], "cus_1", hour - 3600, hour + 3600)
    assert status == 200
    assert body["data"][0]["object"] == "billing.meter_event_summary"
    assert [s["aggregated_value"] for s in body["data"]] == [60]
    _, body = await api.summaries(meter["id"], "cus_1", hour - 3600, hour + 3600, value_grouping_window="hour")
    assert [(s["start_time"], s["aggregated_value"]) for s in body["data"]] == [(hour - 3600, 30), (hour, 30)]
    _, body = await api.summaries(meter["id"], "cus_1", hour - 3600 + 60, hour + 60)  # start inclusive, end exclusive
    assert body["data"][0]["aggregated_value"] == 30
    _, body = await api.summaries(meter["id"], "cus_1", hour - 3600, hour + 3600, value_grouping_window="hour", limit=1)
    assert body["has_more"] is True


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"customer": "c", "start_time": 61, "end_time": 120}, "start_time"),
        ({"customer": "c", "start_time": 60, "end_time": 60}, "start_time"),
        ({"start_time": 60, "end_time": 120}, "customer"),
        ({"customer": "c", "end_time": 120}, "start_time"),
        ({"customer": "c", "start_time": 60, "end_time": 3600, "value_grouping_window": "hour"}, "start_time"),
        (
            {"customer": "c", "start_time": 0, "end_time": 3600, "value_grouping_window": "week"},
            "value_grouping_window",
        ),
    ],
)
async def test_event_summary_parameter_errors(api: Api, params, param):
    meter = await api.meter()
    status, body, _ = await api.call("GET", f"/v1/billing/meters/{meter['id']}/event_summaries", params=params)
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
