"""Adjustments (cancel) in the emulator: idempotency keys as Stripe honours them; a cancelled event leaves the
event summaries; the 24-hour window."""

from __future__ import annotations

import aiohttp
import pytest

from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.emulator.conftest import Api, FakeClock, event

pytestmark = pytest.mark.asyncio(loop_scope="function")

EVENTS = "/v2/billing/meter_event_adjustments"
SYNC = "/v2/billing/meter_events"


def cancel(identifier: str, name: str = "api_call") -> dict[str, object]:
    return {"event_name": name, "type": "cancel", "cancel": {"identifier": identifier}}


async def total(api: Api, meter_id: str, customer: str = "cus_1") -> int:
    now = int(api.emu.state.clock())
    start, end = (now // 60 - 3000) * 60, (now // 60 + 60) * 60
    status, body = await api.summaries(meter_id, customer, start, end)
    assert status == 200, body
    return sum(s["aggregated_value"] for s in body["data"])


async def test_a_cancelled_event_leaves_the_event_summaries(api: Api):
    meter = await api.meter()
    for identifier, value in (("a", "5"), ("b", "7")):
        assert (await api.call("POST", SYNC, json=event(identifier, value)))[0] == 200
    assert await total(api, meter["id"]) == 12
    status, body, _ = await api.call("POST", EVENTS, json=cancel("a"))
    assert (status, body["status"], body["cancel"]) == (200, "complete", {"identifier": "a"})
    assert await total(api, meter["id"]) == 7


async def test_the_same_idempotency_key_and_body_get_the_first_answer_again(api: Api):
    await api.meter()
    assert (await api.call("POST", SYNC, json=event("a")))[0] == 200
    headers = {"Idempotency-Key": "k-1"}
    first = await api.call("POST", EVENTS, json=cancel("a"), headers=headers)
    again = await api.call("POST", EVENTS, json=cancel("a"), headers=headers)
    assert first[0] == again[0] == 200
    assert first[1] == again[1]
    assert again[2].get("Idempotent-Replayed") == "true"
    without_key = await api.call("POST", EVENTS, json=cancel("a"))
    assert (without_key[0], without_key[1]["error"]["code"]) == (400, "invalid_cancel_configuration")
    assert (await api.emu.stats())["events_cancelled"] == 1


async def test_a_refusal_is_replayed_too_and_another_body_with_the_key_is_an_idempotency_error(api: Api):
    await api.meter()
    headers = {"Idempotency-Key": "k-2"}
    first = await api.call("POST", EVENTS, json=cancel("unknown"), headers=headers)
    assert (first[0], first[1]["error"]["code"]) == (400, "invalid_cancel_configuration")
    assert (await api.call("POST", SYNC, json=event("unknown")))[0] == 200
    again = await api.call("POST", EVENTS, json=cancel("unknown"), headers=headers)
    assert (again[0], again[1]) == (first[0], first[1])
    other = await api.call("POST", EVENTS, json=cancel("other"), headers=headers)
    assert (other[0], other[1]["error"]["type"]) == (400, "idempotency_error")
    fresh = await api.call("POST", EVENTS, json=cancel("unknown"), headers={"Idempotency-Key": "k-3"})
    assert fresh[0] == 200


async def test_an_event_older_than_24_hours_cannot_be_cancelled_and_keys_expire():
    clock = FakeClock()
    async with Emulator(EmulatorConfig(stream_rps_limit=0), clock=clock) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        meter = await api.meter()
        assert (await api.call("POST", SYNC, json=event("old", "4")))[0] == 200
        assert (await api.call("POST", SYNC, json=event("new", "6")))[0] == 200
        headers = {"Idempotency-Key": "k-old"}
        assert (await api.call("POST", EVENTS, json=cancel("new"), headers=headers))[0] == 200
        clock.advance(24 * 3600 + 1)
        late = await api.call("POST", EVENTS, json=cancel("old"))
        assert (late[0], late[1]["error"]["code"]) == (400, "invalid_cancel_configuration")
        expired = await api.call("POST", EVENTS, json=cancel("new"), headers=headers)
        assert expired[2].get("Idempotent-Replayed") is None  # the key expired: executed again
        assert await total(api, meter["id"]) == 4
