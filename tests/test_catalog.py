"""ingestor.catalog: payload keys per event_name, from a static JSON catalog or Stripe's meter objects."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from aiohttp import web

from ingestor.catalog import (
    DEFAULT_CUSTOMER_KEY,
    DEFAULT_METER,
    DEFAULT_VALUE_KEY,
    Meter,
    MeterCatalog,
    fetch_from_stripe,
    from_static,
    meter_from_stripe,
)
from ingestor.errors import CatalogError, Rejection
from ingestor.stripe_http import StripeHttp
from tests.fakes import STRIPE_VERSION, add_landing, loopback, stripe_http

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

    from ingestor.stripe_http import Transport


def stripe_meter(event_name: str = "api_requests", **fields: Any) -> dict[str, Any]:
    """A `billing.meter` object as `GET /v1/billing/meters` lists it."""
    return {
        "id": f"mtr_{event_name}",
        "object": "billing.meter",
        "event_name": event_name,
        "display_name": event_name,
        "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
        "value_settings": {"event_payload_key": "value"},
        "default_aggregation": {"formula": "sum"},
        "status": "active",
        "livemode": False,
    } | fields


# --- the catalog ----------------------------------------------------------------------------------


def test_unknown_catalog_gives_default_keys_to_every_event_name() -> None:
    catalog = MeterCatalog()
    assert not catalog.known
    assert len(catalog) == 0
    meter = catalog.lookup("anything")
    assert meter is DEFAULT_METER
    assert (meter.customer_key, meter.value_key, meter.needs_value, meter.active) == (
        DEFAULT_CUSTOMER_KEY,
        DEFAULT_VALUE_KEY,
        True,
        True,
    )
    assert (DEFAULT_CUSTOMER_KEY, DEFAULT_VALUE_KEY) == ("stripe_customer_id", "value")


def test_unknown_catalog_still_uses_the_meters_it_has() -> None:
    catalog = MeterCatalog([Meter("tokens", value_key="n"), Meter("old", active=False)])
    assert catalog.lookup("tokens").value_key == "n"
    assert catalog.lookup("other") is DEFAULT_METER
    with pytest.raises(Rejection) as info:
        catalog.lookup("old")
    assert info.value.reason == "meter_inactive"


def test_known_catalog_rejects_unknown_and_inactive_meters() -> None:
    catalog = MeterCatalog([Meter("live"), Meter("old", active=False)], known=True)
    assert catalog.lookup("live").event_name == "live"
    with pytest.raises(Rejection) as unknown:
        catalog.lookup("missing")
    assert unknown.value.reason == "meter_unknown"
    assert "'missing'" in unknown.value.message
    with pytest.raises(Rejection) as inactive:
        catalog.lookup("old")
    assert inactive.value.reason == "meter_inactive"
    assert not inactive.value.retriable


def test_empty_known_catalog_rejects_everything() -> None:
    with pytest.raises(Rejection, match="no meter"):
        MeterCatalog(known=True).lookup("api_requests")


def test_replace_swaps_meters_and_knowledge_in_place() -> None:
    catalog = MeterCatalog()
    catalog.replace(MeterCatalog([Meter("a")], known=True))
    assert catalog.known
    assert len(catalog) == 1
    with pytest.raises(Rejection):
        catalog.lookup("b")
    catalog.replace(MeterCatalog())
    assert catalog.lookup("b") is DEFAULT_METER


# --- INGESTOR_METERS ------------------------------------------------------------------------------


def test_static_catalog() -> None:
    catalog = from_static(
        orjson.dumps(
            {
                "api_requests": {},
                "tokens": {"customer_key": "account", "value_key": "n", "formula": "last"},
                "logins": {"formula": "count"},
                "legacy": {"active": False},
            }
        ).decode()
    )
    assert catalog.known
    assert len(catalog) == 4
    assert catalog.lookup("api_requests") == Meter("api_requests")
    assert catalog.lookup("tokens") == Meter("tokens", customer_key="account", value_key="n", formula="last")
    assert not catalog.lookup("logins").needs_value
    with pytest.raises(Rejection) as inactive:
        catalog.lookup("legacy")
    assert inactive.value.reason == "meter_inactive"
    with pytest.raises(Rejection) as unknown:
        catalog.lookup("other")
    assert unknown.value.reason == "meter_unknown"


def test_empty_static_catalog_knows_no_meter() -> None:
    catalog = from_static("{}")
    assert catalog.known
    assert len(catalog) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('"api_requests"', "must be a JSON object"),
        ('{"a": 1}', r"INGESTOR_METERS\['a'\] must be an object"),
        ('{"a": ["customer_key"]}', "must be an object"),
        ('{"a": {"customer_key": null}}', r"INGESTOR_METERS\['a'\].customer_key must be a non-empty string"),
        ('{"a": {"customer_key": ""}}', "customer_key must be a non-empty string"),
        ('{"a": {"value_key": 5}}', "value_key must be a non-empty string"),
        ('{"a": {"formula": "avg"}}', "formula must be one of count, sum, last"),
        ('{"a": {"formula": ["sum"]}}', "formula must be one of"),
        ('{"a": {"active": "false"}}', "active must be true or false"),
        ('{"a": {"value_kye": "n"}}', "unknown key.*'value_kye'"),
        ('{"": {}}', "1 to 100 characters"),
        ('{"' + "e" * 101 + '": {}}', "1 to 100 characters"),
    ],
)
def test_static_catalog_errors_name_the_variable(text: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message) as info:
        from_static(text)
    assert "INGESTOR_METERS" in str(info.value)
    assert isinstance(info.value, ValueError)


# --- Stripe's meter objects -----------------------------------------------------------------------


def test_meter_from_stripe() -> None:
    meter = meter_from_stripe(
        stripe_meter(
            "tokens",
            customer_mapping={"type": "by_id", "event_payload_key": "account"},
            value_settings={"event_payload_key": "n"},
            default_aggregation={"formula": "last"},
        )
    )
    assert meter == Meter("tokens", customer_key="account", value_key="n", meter_id="mtr_tokens", formula="last")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {}),
        ({"default_aggregation": {"formula": "count"}}, {"needs_value": False}),
        ({"default_aggregation": {"formula": "sum"}}, {}),
        ({"default_aggregation": None}, {}),
        ({"status": "inactive"}, {"active": False}),
        ({"customer_mapping": None, "value_settings": None}, {}),
        ({"customer_mapping": {"type": "by_id"}, "value_settings": {}}, {}),
        ({"customer_mapping": {"event_payload_key": ""}}, {}),
    ],
)
def test_meter_from_stripe_defaults(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    meter = meter_from_stripe(stripe_meter(**fields))
    defaults = {"customer_key": "stripe_customer_id", "value_key": "value", "needs_value": True, "active": True}
    want = defaults | expected
    assert {k: getattr(meter, k) for k in want} == want


def test_minimal_stripe_meter() -> None:
    assert meter_from_stripe({"event_name": "e"}) == Meter("e")


class FakeTransport:
    """A `Transport` serving `GET /v1/billing/meters` pages of `page_size`, honouring `starting_after`."""

    def __init__(self, meters: list[dict[str, Any]], page_size: int = 2, status: int = 200) -> None:
        self.meters = meters
        self.page_size = page_size
        self.status = status
        self.calls: list[tuple[str, str, dict[str, str], dict[str, str], float]] = []

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, timeout: float
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(url)
        params = dict(parse_qsl(parts.query))
        self.calls.append((method, f"{parts.scheme}://{parts.netloc}{parts.path}", params, dict(headers), timeout))
        start = 0
        if "starting_after" in params:
            start = 1 + next(i for i, m in enumerate(self.meters) if m["id"] == params["starting_after"])
        page = self.meters[start : start + self.page_size]
        answer = {"object": "list", "data": page, "has_more": start + self.page_size < len(self.meters)}
        return self.status, {}, orjson.dumps(answer)


class GarbageTransport:
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def request(self, *_: Any) -> tuple[int, dict[str, str], bytes]:
        return 200, {}, self.body


def over(transport: Transport, base: str = "http://stripe.test") -> StripeHttp:
    return StripeHttp(transport, base, stripe_version=STRIPE_VERSION, timeout=7.5, api_key="sk_test_x")


async def test_fetch_from_stripe_follows_pages_and_prefers_active_meters() -> None:
    meters = [
        stripe_meter("a"),
        stripe_meter("b", status="inactive"),
        stripe_meter("c", default_aggregation={"formula": "count"}) | {"id": "mtr_c_new"},
        stripe_meter("c", status="inactive") | {"id": "mtr_c_old"},
        {"id": "mtr_no_name", "event_name": ""},
    ]
    transport = FakeTransport(meters)
    catalog = await fetch_from_stripe(over(transport))
    assert catalog.known
    assert len(catalog) == 3
    assert catalog.lookup("a").meter_id == "mtr_a"
    assert catalog.lookup("c").meter_id == "mtr_c_new"
    assert not catalog.lookup("c").needs_value
    with pytest.raises(Rejection) as info:
        catalog.lookup("b")
    assert info.value.reason == "meter_inactive"
    assert [c[2].get("starting_after") for c in transport.calls] == [None, "mtr_b", "mtr_c_old"]
    method, url, params, headers, _ = transport.calls[0]
    assert (method, url) == ("GET", "http://stripe.test/v1/billing/meters")
    assert params["limit"] == "100"
    assert headers["Authorization"] == "Bearer sk_test_x"
    assert headers["Stripe-Version"] == STRIPE_VERSION
    assert {call[4] for call in transport.calls} == {7.5}  # every page has the timeout


@pytest.mark.parametrize("status", [401, 403, 500])
async def test_fetch_from_stripe_refuses_an_error_answer(status: int) -> None:
    with pytest.raises(CatalogError, match=str(status)) as caught:
        await fetch_from_stripe(over(FakeTransport([], status=status)))
    assert caught.value.status == status


@pytest.mark.parametrize(
    "body",
    [
        b"<html>oops</html>",
        b"[]",
        b'{"data": "x"}',
        b'{"object": "list", "data": [{"event_name": "e", "customer_mapping": "x"}]}',
        b"{}",  # a proxy's "200 OK": not an empty catalog that would dead-letter every event
        b'{"object": "list"}',
        b'{"data": [], "has_more": false}',
        b'{"object": "billing.meter", "data": []}',
    ],
)
async def test_fetch_from_stripe_turns_an_unexpected_body_into_a_catalog_error(body: bytes) -> None:
    with pytest.raises(CatalogError, match="unexpected body"):
        await fetch_from_stripe(over(GarbageTransport(body)))


@contextlib.asynccontextmanager
async def meters_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[tuple[str, list[str]]]:
    """`GET /v1/billing/meters` served by `handler`; `/landing` lists one meter and records its callers."""
    app = web.Application()
    app.router.add_get("/v1/billing/meters", handler)
    landed = add_landing(app, orjson.dumps({"object": "list", "data": [stripe_meter("a")], "has_more": False}))
    async with loopback(app) as base:
        yield base, landed


@pytest.mark.parametrize("status", [301, 302, 307])
async def test_fetch_from_stripe_follows_no_redirect(status: int) -> None:
    async def redirect(_: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": "/landing"})

    async with meters_server(redirect) as (base, landed), stripe_http(base) as http:
        with pytest.raises(CatalogError, match="redirect") as caught:
            await fetch_from_stripe(http)
    assert caught.value.status == status
    assert landed == []


async def test_fetch_from_stripe_times_out() -> None:
    release = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=b"{}")

    async with meters_server(hang) as (base, _), stripe_http(base, timeout=0.2) as http:
        try:
            with pytest.raises(CatalogError, match=r"no answer within 0\.2 s") as caught:
                await fetch_from_stripe(http)
        finally:
            release.set()
    assert caught.value.status is None
