"""Asynchronous validation of streamed events, error reports, and signed webhooks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import pytest_asyncio
import stripe
from aiohttp import web

from ingestor_dev.emulator import Emulator, EmulatorConfig
from ingestor_dev.emulator.limits import MAX_ERRORS_PER_REPORT
from tests.emulator.conftest import Api, event, stamp

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.asyncio(loop_scope="function")

SECRET = "whsec_emulator_test"


class Receiver:
    def __init__(self) -> None:
        self.bodies: list[tuple[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append((await request.text(), request.headers.get("Stripe-Signature", "")))
        return web.Response(text="ok")


@pytest_asyncio.fixture(loop_scope="function")
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    sink = Receiver()
    app = web.Application()
    app.router.add_post("/hook", sink.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield sink, f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


async def test_each_async_validation_code(receiver: tuple[Receiver, str]):
    sink, url = receiver
    config = EmulatorConfig(stream_rps_limit=0, webhook_url=url, webhook_secret=SECRET, customers=["cus_1", "cus_2"])
    async with Emulator(config) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        await api.meter("api_call", "sum")
        archived = await api.meter("old", "sum")
        await api.call("POST", f"/v1/billing/meters/{archived['id']}/deactivate", form={})
        now = emu.state.clock()
        expected = {
            "ok": None,
            "nm": "no_meter",
            "ar": "archived_meter",
            "nc": "meter_event_no_customer_defined",
            "cn": "meter_event_customer_not_found",
            "iv": "meter_event_invalid_value",
            "nv": "meter_event_invalid_value",
            "td": "meter_event_value_too_many_digits",
            "tp": "timestamp_too_far_in_past",
            "tf": "timestamp_in_future",
        }
        events = [
            event("ok", "3"),
            event("nm", name="missing"),
            event("ar", name="old"),
            event("nc", payload={"value": "1"}),
            event("cn", customer="cus_9"),
            event("iv", "abc"),
            event("nv", payload={"stripe_customer_id": "cus_1"}),
            event("td", "1" * 19),
            event("tp", timestamp=stamp(now - 36 * 86400)),
            event("tf", timestamp=stamp(now + 301)),
        ]
        token = await api.session()
        assert (await api.stream(token, events))[0] == 200
        await emu.wait_webhooks()
        stats = await emu.stats()
        assert (stats["events_valid"], stats["events_invalid"]) == (1, 9)
        for identifier, code in expected.items():
            info = emu.state.identifier_info(identifier)
            assert info["error_code"] == code, identifier
            assert info["status"] == ("valid" if code is None else "invalid")
        _, errors, _ = await api.call("GET", "/_emulator/errors", key=None)
        assert {e["identifier"]: e["code"] for e in errors["data"]} == {k: v for k, v in expected.items() if v}
        _, reports, _ = await api.call("GET", "/_emulator/error_reports", key=None)
        types = sorted(r["type"] for r in reports["data"])
        assert types == ["v1.billing.meter.error_report_triggered"] * 2 + ["v1.billing.meter.no_meter_found"]
        assert len(sink.bodies) == 3
        reported = set()
        for payload, header in sink.bodies:
            delivered = stripe.Webhook.construct_event(payload, header, SECRET)
            assert delivered.object == "event"
            data: Any = delivered.data.object
            assert data.developer_message_summary
            assert data.validation_start.endswith("Z")
            for kind in data.reason.error_types:
                reported |= {sample.request.identifier for sample in kind.sample_errors}
        assert reported == {k for k, v in expected.items() if v}
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(sink.bodies[0][0], sink.bodies[0][1], "whsec_wrong")


async def test_every_failed_identifier_is_reported(receiver: tuple[Receiver, str]):
    sink, url = receiver
    config = EmulatorConfig(stream_rps_limit=0, webhook_url=url, webhook_secret=SECRET)
    async with Emulator(config) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        await api.meter()
        token = await api.session()
        bad = [f"bad-{i}" for i in range(250)]
        for start in range(0, 250, 50):
            batch = [event(identifier, "x") for identifier in bad[start : start + 50]]
            batch += [event(f"good-{start}-{i}", "2") for i in range(50)]
            assert (await api.stream(token, batch))[0] == 200
        await emu.wait_webhooks()
        identifiers = []
        for payload, header in sink.bodies:
            data = stripe.Webhook.construct_event(payload, header, SECRET).data.object
            samples = [s for kind in data.reason.error_types for s in kind.sample_errors]
            assert len(samples) == data.reason.error_count <= MAX_ERRORS_PER_REPORT
            identifiers += [sample.request.identifier for sample in samples]
        assert sorted(identifiers) == sorted(bad)
        stats = await emu.stats()
        assert (stats["events_valid"], stats["events_invalid"], stats["webhooks_sent"]) == (250, 250, len(sink.bodies))


async def test_validation_uses_the_meter_as_it_was_at_arrival(api: Api):
    token = await api.session()
    await api.stream(token, [event("before")])
    await api.meter()
    await api.stream(token, [event("after")])
    assert api.emu.state.identifier_info("before")["error_code"] == "no_meter"
    assert api.emu.state.identifier_info("after")["status"] == "valid"


async def test_background_validation_runs_without_reads(api: Api):
    await api.meter()
    token = await api.session()
    await api.stream(token, [event("bg")])
    assert api.emu.state.pending_events == 1
    for _ in range(50):
        if api.emu.state.pending_events == 0:
            break
        await __import__("asyncio").sleep(0.02)
    assert api.emu.state.pending_events == 0
    assert api.emu.state.stats.events_valid == 1


async def test_multi_meter_batches_and_count_meters_without_values(api: Api):
    await api.meter("a", "sum")
    await api.meter("b", "count")
    token = await api.session()
    events = [
        event("a1", "2", name="a"),
        event("b1", name="b", payload={"stripe_customer_id": "cus_1"}),
        event("a2", "3", name="a"),
    ]
    await api.stream(token, events)
    stats = await api.emu.stats()
    assert (stats["events_valid"], stats["events_invalid"]) == (3, 0)
