"""Sessions and the meter event stream over real HTTP: auth, errors, expiry, revocation, rate limits,
de-duplication."""

from __future__ import annotations

import asyncio
from datetime import datetime

import aiohttp
import pytest

from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.emulator.conftest import LIVE_KEY, STREAM, TEST_KEY, Api, FakeClock, event, stamp

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _rfc3339(text: str) -> datetime:
    assert text.endswith("Z")
    assert len(text.split(".")[1]) == 4  # milliseconds and the Z
    return datetime.fromisoformat(text)


async def test_session_shape_per_mode(api: Api):
    for key, livemode in ((TEST_KEY, False), (LIVE_KEY, True), ("rk_live_restricted1", True)):
        status, body, _ = await api.call("POST", "/v2/billing/meter_event_session", key=key)
        assert status == 200
        assert body["object"] == "v2.billing.meter_event_session"
        assert body["livemode"] is livemode
        assert body["id"].startswith("mes_")
        lifetime = _rfc3339(body["expires_at"]) - _rfc3339(body["created"])
        assert lifetime.total_seconds() == pytest.approx(900, abs=0.002)


@pytest.mark.parametrize("key", [None, "sk_test_", "pk_test_abc", "not-a-key"])
async def test_session_needs_a_secret_key(api: Api, key):
    status, body, _ = await api.call("POST", "/v2/billing/meter_event_session", key=key)
    assert status == 401
    assert body["error"]["type"] == "invalid_request_error"
    assert "message" in body["error"]


async def test_api_key_allow_list():
    async with Emulator(EmulatorConfig(api_keys=["sk_test_allowed1"])) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        assert (await api.call("POST", "/v2/billing/meter_event_session", key="sk_test_allowed1"))[0] == 200
        assert (await api.call("POST", "/v2/billing/meter_event_session", key=TEST_KEY))[0] == 401


async def test_stream_accepts_and_counts(api: Api):
    await api.meter()
    token = await api.session()
    status, body, _ = await api.stream(token, [event(f"a{i}", str(i + 1)) for i in range(100)])
    assert (status, body) == (200, {})
    stats = await api.emu.stats()
    assert stats["events_accepted"] == 100
    assert stats["events_valid"] == 100
    assert stats["max_events_per_request"] == 100


async def test_stream_rejects_a_secret_key_and_unknown_tokens(api: Api):
    for key in (TEST_KEY, "ek_test_unknown"):
        status, body, _ = await api.stream(key, [event("a")])
        assert status == 401
        assert body["error"]["code"] == "billing_meter_event_session_expired"
        assert body["error"]["type"] == "temporary_session_expired"
    status, _, _ = await api.call("POST", STREAM, key=None, json={"events": [event("a")]})
    assert status == 401


@pytest.mark.parametrize(
    ("events", "param"),
    [
        ([event("a"), event("b", payload={"value": 1})], "events[1].payload.value"),
        ([event("a"), {"identifier": "x", "payload": {}}], "events[1].event_name"),
        ([event("a"), event("b"), {"event_name": "api_call", "identifier": "y"}], "events[2].payload"),
        ([event("a", timestamp="yesterday")], "events[0].timestamp"),
    ],
)
async def test_a_bad_event_rejects_the_whole_request(api: Api, events, param):
    token = await api.session()
    status, body, _ = await api.stream(token, events)
    assert status == 400
    assert body["error"]["param"] == param
    assert param in body["error"]["message"]
    again = await api.stream(token, events)
    assert again[1] == body  # deterministic: a client bisecting the batch gets the same answer
    assert (await api.emu.stats())["events_accepted"] == 0


async def test_too_many_events_missing_array_and_bad_json(api: Api):
    token = await api.session()
    assert (await api.stream(token, [event(f"e{i}") for i in range(101)]))[0] == 400
    status, body, _ = await api.call("POST", STREAM, key=token, json={"evnts": []})
    assert (status, body["error"]["code"]) == (400, "parameter_missing")
    status, body, _ = await api.call(
        "POST", STREAM, key=token, data=b'{"events": [', headers={"Content-Type": "application/json"}
    )
    assert (status, body["error"]["code"]) == (400, "invalid_json")


async def test_token_expires_after_the_configured_ttl(clock: FakeClock):
    async with Emulator(EmulatorConfig(session_ttl=3.0), clock=clock) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        token = await api.session()
        clock.advance(2.9)
        assert (await api.stream(token, [event("a")]))[0] == 200
        clock.advance(0.1)
        status, body, _ = await api.stream(token, [event("b")])
        assert (status, body["error"]["code"]) == (401, "billing_meter_event_session_expired")
        assert (await api.stream(await api.session(), [event("b")]))[0] == 200
        assert emu.state.stats.events_accepted == 2


async def test_revoking_sessions(api: Api):
    one, two = await api.session(), await api.session()
    status, body, _ = await api.call("POST", "/_emulator/sessions/revoke", key=None, json={"token": one})
    assert (status, body) == (200, {"revoked": 1})
    assert (await api.stream(one, [event("a")]))[0] == 401
    assert (await api.stream(two, [event("b")]))[0] == 200
    assert (await api.call("POST", "/_emulator/sessions/revoke", key=None, json={"all": True}))[1] == {"revoked": 1}
    assert (await api.stream(two, [event("c")]))[0] == 401


async def test_revoke_every_session_after_n_seconds(clock: FakeClock):
    async with Emulator(EmulatorConfig(), clock=clock) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        emu.set_faults(revoke_sessions_after_s=5.0)
        token = await api.session()
        clock.advance(4.9)
        assert (await api.stream(token, [event("a")]))[0] == 200
        clock.advance(0.2)
        assert (await api.stream(token, [event("b")]))[0] == 401


async def test_rate_limit_per_one_second_window(clock: FakeClock):
    config = EmulatorConfig(stream_rps_limit=3)
    async with Emulator(config, clock=clock) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        token = await api.session()
        statuses = []
        for i in range(5):
            status, body, headers = await api.stream(token, [event(f"r{i}")])
            statuses.append(status)
        assert statuses == [200, 200, 200, 429, 429]
        assert headers["Stripe-Rate-Limited-Reason"] == "global-rate"
        assert body["error"]["code"] == "rate_limit"
        clock.advance(1.0)
        assert (await api.stream(token, [event("r9")]))[0] == 200
        stats = await emu.stats()
        assert stats["events_accepted"] == 4  # rate-limited requests count nothing
        assert stats["rate_limited"] == 2
        assert stats["stream_max_requests_per_1s_window"] == 5


async def test_default_rate_limits_by_mode(clock: FakeClock):
    async with Emulator(EmulatorConfig(), clock=clock) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        test_token, live_token = await api.session(TEST_KEY), await api.session(LIVE_KEY)
        test_statuses = [(await api.stream(test_token, [event(f"t{i}")]))[0] for i in range(26)]
        assert test_statuses.count(429) == 1
        live_statuses = [(await api.stream(live_token, [event(f"l{i}")]))[0] for i in range(30)]
        assert set(live_statuses) == {200}


async def test_duplicates_are_counted_once(api: Api):
    await api.meter()
    token = await api.session()
    await api.stream(token, [event("d1", "5"), event("d2", "5"), event("d1", "5")])
    await api.stream(token, [event("d2", "5"), event("d3", "5")])
    stats = await api.emu.stats()
    assert stats["events_received"] == 5
    assert stats["events_accepted"] == 3
    assert stats["duplicates_dropped"] == 2
    assert stats["unique_identifiers"] == 3
    _, body, _ = await api.call("GET", "/_emulator/events", key=None, params={"identifier": "d2"})
    assert body["data"][0] == {
        "identifier": "d2",
        "livemode": False,
        "accepted": 1,
        "duplicates": 1,
        "received": 2,
        "status": "valid",
        "error_code": None,
    }


async def test_duplicates_expire_after_24_hours(clock: FakeClock):
    async with Emulator(EmulatorConfig(stream_rps_limit=0), clock=clock) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        token_ttl = EmulatorConfig().session_ttl
        token = await api.session()
        await api.stream(token, [event("x", timestamp=stamp(clock.now))])
        clock.advance(23 * 3600)
        token = await api.session()
        await api.stream(token, [event("x", timestamp=stamp(clock.now))])
        assert emu.state.stats.duplicates_dropped == 1
        clock.advance(3600 + token_ttl)
        emu.state.flush()
        token = await api.session()
        await api.stream(token, [event("x", timestamp=stamp(clock.now))])
        assert emu.state.stats.events_accepted == 2


async def test_stream_is_served_concurrently(api: Api):
    await api.meter()
    token = await api.session()
    batches = [[event(f"c{b}-{i}") for i in range(100)] for b in range(20)]
    results = await asyncio.gather(*(api.stream(token, batch) for batch in batches))
    assert {status for status, _, _ in results} == {200}
    assert (await api.emu.stats())["events_valid"] == 2000
