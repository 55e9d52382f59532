"""ingestor.catalog: payload keys per event_name, from a static JSON catalog or Stripe's meter objects."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Self

import aiohttp
import orjson
import pytest
from aiohttp import web

from ingestor.catalog import (
    DEFAULT_CUSTOMER_KEY,
    DEFAULT_METER,
    DEFAULT_TIMEOUT_S,
    DEFAULT_VALUE_KEY,
    CatalogError,
    Meter,
    MeterCatalog,
    fetch_from_stripe,
    from_static,
    meter_from_stripe,
)
from ingestor.errors import Rejection

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable


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
    assert catalog.lookup("tokens") == Meter("tokens", customer_key="account", value_key="n")
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
    assert meter == Meter("tokens", customer_key="account", value_key="n", meter_id="mtr_tokens")


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


class FakeResponse:
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = orjson.dumps(body)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def read(self) -> bytes:
        return self.body


class FakeHttp:
    """Serves `GET /v1/billing/meters` pages of `page_size`, honouring `starting_after`."""

    def __init__(self, meters: list[dict[str, Any]], page_size: int = 2, status: int = 200) -> None:
        self.meters = meters
        self.page_size = page_size
        self.status = status
        self.calls: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self.options: list[dict[str, Any]] = []

    def get(self, url: str, *, params: dict[str, str], headers: dict[str, str], **options: Any) -> FakeResponse:
        self.calls.append((url, dict(params), dict(headers)))
        self.options.append(options)
        start = 0
        if "starting_after" in params:
            start = 1 + next(i for i, m in enumerate(self.meters) if m["id"] == params["starting_after"])
        page = self.meters[start : start + self.page_size]
        body = {"object": "list", "data": page, "has_more": start + self.page_size < len(self.meters)}
        return FakeResponse(self.status, body)


async def test_fetch_from_stripe_follows_pages_and_prefers_active_meters() -> None:
    meters = [
        stripe_meter("a"),
        stripe_meter("b", status="inactive"),
        stripe_meter("c", default_aggregation={"formula": "count"}) | {"id": "mtr_c_new"},
        stripe_meter("c", status="inactive") | {"id": "mtr_c_old"},
        {"id": "mtr_no_name", "event_name": ""},
    ]
    http = FakeHttp(meters)
    catalog = await fetch_from_stripe(http, "http://stripe.test", "sk_test_x", "2024-09-30.acacia")  # type: ignore[arg-type]
    assert catalog.known
    assert len(catalog) == 3
    assert catalog.lookup("a").meter_id == "mtr_a"
    assert catalog.lookup("c").meter_id == "mtr_c_new"
    assert not catalog.lookup("c").needs_value
    with pytest.raises(Rejection) as info:
        catalog.lookup("b")
    assert info.value.reason == "meter_inactive"
    assert [c[1].get("starting_after") for c in http.calls] == [None, "mtr_b", "mtr_c_old"]
    url, params, headers = http.calls[0]
    assert url == "http://stripe.test/v1/billing/meters"
    assert params["limit"] == "100"
    assert headers == {"Authorization": "Bearer sk_test_x", "Stripe-Version": "2024-09-30.acacia"}


async def test_fetch_from_stripe_refuses_an_error_answer() -> None:
    with pytest.raises(CatalogError, match="401"):
        await fetch_from_stripe(FakeHttp([], status=401), "http://s", "k", "v")  # type: ignore[arg-type]


class GarbageHttp:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def get(self, url: str, *, params: dict[str, str], headers: dict[str, str], **_: Any) -> FakeResponse:
        response = FakeResponse(200, None)
        response.body = self.body
        return response


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
        await fetch_from_stripe(GarbageHttp(body), "http://s", "k", "v")  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def meters_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[tuple[str, list[str]]]:
    """`GET /v1/billing/meters` served by `handler`; `/landing` lists one meter and records its callers."""
    landed: list[str] = []

    async def landing(request: web.Request) -> web.Response:
        landed.append(request.method)
        body = {"object": "list", "data": [stripe_meter("a")], "has_more": False}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/billing/meters", handler)
    app.router.add_route("*", "/landing", landing)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", landed
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status", [301, 302, 307])
async def test_fetch_from_stripe_follows_no_redirect(status: int) -> None:
    async def redirect(_: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": "/landing"})

    async with meters_server(redirect) as (base, landed), aiohttp.ClientSession() as http:
        with pytest.raises(CatalogError, match="redirect"):
            await fetch_from_stripe(http, base, "sk_test_x", "v")
    assert landed == []


async def test_fetch_from_stripe_times_out() -> None:
    release = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=b"{}")

    async with meters_server(hang) as (base, _), aiohttp.ClientSession() as http:
        try:
            with pytest.raises(TimeoutError):
                await fetch_from_stripe(http, base, "sk_test_x", "v", timeout=0.2)
        finally:
            release.set()


async def test_fetch_from_stripe_sets_a_timeout_on_every_page_by_default() -> None:
    http = FakeHttp([stripe_meter("a"), stripe_meter("b"), stripe_meter("c")])
    await fetch_from_stripe(http, "http://s", "k", "v")  # type: ignore[arg-type]
    assert len(http.options) == 2
    for options in http.options:
        assert options["allow_redirects"] is False
        assert options["timeout"].total == DEFAULT_TIMEOUT_S
