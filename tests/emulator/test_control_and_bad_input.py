"""Statistics, reset, per-identifier counts, and bad input: always Stripe-shaped, never a traceback."""

from __future__ import annotations

import io
import logging

import aiohttp
import pytest

from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.emulator.conftest import STREAM, Api, event, stamp

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def test_stats_fields(api: Api):
    await api.meter()
    token = await api.session()
    await api.stream(token, [event("a"), event("b")])
    await api.stream(token, [event("a")])
    status, stats, _ = await api.call("GET", "/_emulator/stats", key=None)
    assert status == 200
    assert stats["requests"][STREAM] == {"200": 2}
    assert stats["requests"]["/v1/billing/meters"] == {"200": 1}
    for name, value in {
        "events_received": 3,
        "events_accepted": 2,
        "duplicates_dropped": 1,
        "unique_identifiers": 2,
        "events_valid": 2,
        "max_events_per_request": 2,
        "sessions_created": 1,
        "error_reports": 0,
        "stream_requests": 2,
        "stream_max_requests_per_1s_window": 2,
        "latency_ms": None,
    }.items():
        assert stats[name] == value, name
    assert sum(stats["stream_requests_per_second"].values()) == 2


async def test_latency_percentiles_when_recorded():
    async with Emulator(EmulatorConfig(record_latency=True)) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        token = await api.session()
        now = emu.state.clock()
        await api.stream(token, [event("l1", timestamp=stamp(now - 2.0)), event("l2", timestamp=stamp(now - 1.0))])
        latency = (await emu.stats())["latency_ms"]
        assert latency["count"] == 2
        assert 1000 <= latency["p50"] <= latency["p99"] <= latency["max"] < 3000


async def test_reset_clears_everything(api: Api):
    await api.meter()
    token = await api.session()
    await api.stream(token, [event("a")])
    assert (await api.call("POST", "/_emulator/reset", key=None))[0] == 200
    stats = await api.emu.stats()
    assert (stats["events_accepted"], stats["meters"], stats["sessions_created"]) == (0, 0, 0)
    assert stats["requests"] == {"/_emulator/reset": {"200": 1}}  # only the reset itself
    assert (await api.stream(token, [event("a")]))[0] == 401


async def test_events_endpoint(api: Api):
    token = await api.session()
    await api.stream(token, [event("x"), event("x")])
    _, body, _ = await api.call(
        "GET", "/_emulator/events", key=None, params=[("identifier", "x"), ("identifier", "nope")]
    )
    assert [(d["accepted"], d["duplicates"], d["status"]) for d in body["data"]] == [
        (1, 1, "invalid"),
        (0, 0, "unknown"),
    ]
    _, body, _ = await api.call("GET", "/_emulator/events", key=None)
    assert body["duplicates"] == {"x": 1}
    _, body, _ = await api.call("POST", "/_emulator/flush", key=None)
    assert body == {"validated": 0}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/unknown"), ("GET", STREAM), ("DELETE", "/v1/billing/meters"), ("PUT", "/v1/billing/meters/mtr_1")],
)
async def test_unknown_paths_and_methods_are_stripe_404s(api: Api, method, path):
    status, body, headers = await api.call(method, path)
    assert status == 404
    assert body["error"]["type"] == "invalid_request_error"
    assert "Unrecognized request URL" in body["error"]["message"]
    assert headers["Content-Type"].startswith("application/json")


async def test_wrong_content_type_garbage_and_huge_bodies(api: Api):
    token = await api.session()
    status, body, _ = await api.call(
        "POST", STREAM, key=token, data=b'{"events": []}', headers={"Content-Type": "text/plain"}
    )
    assert (status, body["error"]["code"]) == (415, "invalid_content_type")
    status, body, _ = await api.call(
        "POST", STREAM, key=token, data=b"\x00\xff garbage", headers={"Content-Type": "application/json"}
    )
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    status, body, _ = await api.call("POST", STREAM, key=token, json=[1, 2])
    assert status == 400
    huge = io.BytesIO(b'{"events": ["' + b"x" * (1024 * 1024) + b'"]}')
    status, body, _ = await api.call("POST", STREAM, key=token, data=huge, headers={"Content-Type": "application/json"})
    assert (status, body["error"]["type"]) == (413, "invalid_request_error")
    status, body, _ = await api.call(
        "POST", "/v1/billing/meters", data=b"display_name=x", headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert "error" in body


async def test_unexpected_exceptions_become_api_errors_without_traceback(api: Api, monkeypatch, caplog):
    def explode(*_args, **_kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.emu.state, "stats_json", explode)
    with caplog.at_level(logging.ERROR, logger="ingestor_dev.emulator.server"):
        status, body, _ = await api.call("GET", "/_emulator/stats", key=None)
    assert status == 500
    assert body == {"error": {"type": "api_error", "message": "An unknown error occurred."}}
    assert "secret internals" in caplog.text
