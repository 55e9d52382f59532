"""Each fault switch, observed from a real HTTP client."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from ingestor_dev.emulator import Emulator, EmulatorConfig, Faults
from tests.emulator.conftest import Api, event

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def _stream_one(api: Api, token: str, identifier: str) -> tuple[int, dict, object]:
    return await api.stream(token, [event(identifier)])


@pytest.mark.parametrize(
    ("faults", "header"),
    [
        (Faults(error_retry_true=1.0), "true"),
        (Faults(error_retry_false=1.0), "false"),
        (Faults(error_no_header=1.0, error_status=503), None),
    ],
)
async def test_server_errors(api: Api, faults: Faults, header):
    token = await api.session()
    api.emu.set_faults(faults)
    status, body, headers = await _stream_one(api, token, "e")
    assert status == faults.error_status
    assert body["error"]["type"] == "api_error"
    assert headers.get("Stripe-Should-Retry") == header
    assert (await api.emu.stats())["events_accepted"] == 0


async def test_rate_limit_and_lock_timeout_429s(api: Api):
    token = await api.session()
    api.emu.set_faults(rate_limit=1.0, rate_limit_reason="endpoint-concurrency")
    status, body, headers = await _stream_one(api, token, "a")
    assert (status, body["error"]["code"], headers["Stripe-Rate-Limited-Reason"]) == (
        429,
        "rate_limit",
        "endpoint-concurrency",
    )
    api.emu.set_faults(Faults(lock_timeout=1.0))
    status, body, headers = await _stream_one(api, token, "b")
    assert (status, body["error"]["code"]) == (429, "lock_timeout")
    assert "Stripe-Rate-Limited-Reason" not in headers
    assert (await api.emu.stats())["events_accepted"] == 0


async def test_fixed_and_random_latency(api: Api):
    token = await api.session()
    api.emu.set_faults(Faults(latency_s=0.15))
    started = time.monotonic()
    assert (await _stream_one(api, token, "a"))[0] == 200
    assert time.monotonic() - started >= 0.15
    api.emu.set_faults(Faults(latency_s=0.05, latency_jitter_s=0.1))
    durations = []
    for i in range(4):
        started = time.monotonic()
        await _stream_one(api, token, f"r{i}")
        durations.append(time.monotonic() - started)
    assert all(0.05 <= d < 0.5 for d in durations)
    assert max(durations) - min(durations) > 0.001  # not all the same delay


async def test_faults_scope_stream_leaves_other_paths_alone(api: Api):
    api.emu.set_faults(Faults(error_retry_true=1.0))
    assert (await api.call("POST", "/v2/billing/meter_event_session"))[0] == 200
    api.emu.set_faults(Faults(error_retry_true=1.0, scope="all"))
    assert (await api.call("POST", "/v2/billing/meter_event_session"))[0] == 500
    assert (await api.call("GET", "/_emulator/stats", key=None))[0] == 200  # control is never faulted


async def test_slow_response_counts_the_events_before_the_client_times_out(api: Api):
    token = await api.session()
    api.emu.set_faults(Faults(slow_response=1.0, slow_response_s=1.0))
    with pytest.raises(TimeoutError):
        async with api.http.post(
            api.url + "/v2/billing/meter_event_stream",
            json={"events": [event("slow")]},
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=0.2),
        ):
            pass
    assert api.emu.state.identifier_info("slow")["accepted"] == 1


@pytest.mark.parametrize(("switch", "counted"), [("reset_before", 0), ("reset_after", 1)])
async def test_connection_resets(api: Api, switch: str, counted: int):
    token = await api.session()
    api.emu.set_faults(**{switch: 1.0})
    with pytest.raises(aiohttp.ClientError):
        await _stream_one(api, token, "reset")
    assert api.emu.state.identifier_info("reset")["accepted"] == counted
    stats = await api.emu.stats()
    assert stats["requests"]["/v2/billing/meter_event_stream"] == {"reset": 1}


async def test_max_faults_fails_only_the_first_requests(api: Api):
    token = await api.session()
    api.emu.set_faults(Faults(error_retry_true=1.0, max_faults=2))
    statuses = [(await _stream_one(api, token, f"m{i}"))[0] for i in range(3)]
    assert statuses == [500, 500, 200]


async def test_deterministic_under_a_seed():
    results = []
    for _ in range(2):
        config = EmulatorConfig(stream_rps_limit=0, seed=7, faults=Faults(error_no_header=0.5))
        async with Emulator(config) as emu, aiohttp.ClientSession() as http:
            api = Api(http, emu)
            token = await api.session()
            results.append([(await _stream_one(api, token, f"s{i}"))[0] for i in range(12)])
    assert results[0] == results[1]
    assert set(results[0]) == {200, 500}


async def test_refuse_connections_and_recovery(api: Api):
    port = api.emu.port
    api.emu.set_faults(refuse_connections=True)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    with pytest.raises(aiohttp.ClientError):  # a kept-alive connection is closed on its next request
        await api.call("POST", "/v2/billing/meter_event_session")
    api.emu.set_faults(refuse_connections=False)
    await api.emu.settle()
    assert api.emu.port == port
    assert (await api.call("POST", "/v2/billing/meter_event_session"))[0] == 200


async def test_refuse_for_a_while_then_recover_by_itself(api: Api):
    api.emu.set_faults(refuse_connections=True, refuse_for_s=0.2)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", api.emu.port)
    await asyncio.sleep(0.3)
    await api.emu.settle()
    assert (await api.call("POST", "/v2/billing/meter_event_session"))[0] == 200
    assert api.emu.faults.refuse_connections is False


async def test_faults_control_endpoint(api: Api):
    status, body, _ = await api.call("POST", "/_emulator/faults", key=None, json={"lock_timeout": 1.0, "scope": "all"})
    assert (status, body["lock_timeout"], body["scope"]) == (200, 1.0, "all")
    assert (await api.call("GET", "/_emulator/faults", key=None))[1] == body
    assert (await api.call("POST", "/v2/billing/meter_event_session"))[0] == 429
    status, body, _ = await api.call("POST", "/_emulator/faults", key=None, json={"replace": True})
    assert body == Faults().to_json()
    status, body, _ = await api.call("POST", "/_emulator/faults", key=None, json={"rate_limit": 2})
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")
