"""The meter catalog: which payload keys each event_name needs, and whether its meter accepts events.

Three sources (INGESTOR_METER_CATALOG): `stripe` reads `GET /v1/billing/meters` at start and every
INGESTOR_METER_REFRESH_S; `static` takes a JSON mapping from INGESTOR_METERS; `off` applies Stripe's
default keys (`stripe_customer_id`, `value`) to every event_name and knows no meter.

A read from Stripe is strict: each page request goes through `ingestor.stripe_http` (a timeout, no
redirect followed), and only a 200 whose body is a Stripe list (`"object": "list"`, a `data` array)
counts. Anything else (no answer included) is a `CatalogError` and the last catalog is kept: a proxy
answering `200 {}` must not become an empty catalog that dead-letters every event as `meter_unknown`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ingestor.errors import CatalogError as CatalogError  # noqa: PLC0414 - re-exported for settings.py
from ingestor.errors import Rejection, StripeUnreachable

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ingestor.stripe_http import StripeHttp

log = logging.getLogger("ingestor.catalog")

DEFAULT_CUSTOMER_KEY = "stripe_customer_id"
DEFAULT_VALUE_KEY = "value"
METERS_PATH = "/v1/billing/meters"


@dataclass(frozen=True, slots=True)
class Meter:
    """What the worker needs to know of one meter to validate its events."""

    event_name: str
    customer_key: str = DEFAULT_CUSTOMER_KEY
    value_key: str = DEFAULT_VALUE_KEY
    #: `count` meters do not read a value; `sum` and `last` do.
    needs_value: bool = True
    active: bool = True
    meter_id: str = ""
    #: How Stripe aggregates the meter (`count`, `sum`, `last`) and its `event_time_window` (`hour`, `day`,
    #: None): read by `ingestor audit`, which recomputes what Stripe should bill.
    formula: str = "sum"
    event_time_window: str | None = None


DEFAULT_METER = Meter(event_name="*")


class MeterCatalog:
    """Looks meters up by event_name. `known=False` means every event_name gets the default keys."""

    def __init__(self, meters: Iterable[Meter] = (), *, known: bool = False) -> None:
        self._meters = {m.event_name: m for m in meters}
        self.known = known

    def __len__(self) -> int:
        return len(self._meters)

    def lookup(self, event_name: str) -> Meter:
        meter = self._meters.get(event_name)
        if meter is None:
            if self.known:
                raise Rejection("meter_unknown", f"no meter has event_name {event_name!r}")
            return DEFAULT_METER
        if not meter.active:
            raise Rejection("meter_inactive", f"the meter for event_name {event_name!r} is deactivated")
        return meter

    def meters(self) -> list[Meter]:
        return list(self._meters.values())

    def replace(self, other: MeterCatalog) -> None:
        self._meters = other._meters
        self.known = other.known


def from_static(text: str) -> MeterCatalog:
    """Parse INGESTOR_METERS: `{"event_name": {"customer_key": "...", "value_key": "...", "formula": "sum"}}`.

    Every key is optional (`formula`: count, sum (default) or last; `active`: true (default) or false); an
    unknown key or a value of the wrong type fails start-up rather than silently falling back to a default.
    """
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise CatalogError(f"INGESTOR_METERS is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CatalogError("INGESTOR_METERS must be a JSON object keyed by event_name")
    return MeterCatalog([_static_meter(name, spec) for name, spec in raw.items()], known=True)


_STATIC_KEYS = frozenset({"customer_key", "value_key", "formula", "active"})
_FORMULAS = ("count", "sum", "last")


def _static_meter(name: str, spec: Any) -> Meter:
    where = f"INGESTOR_METERS[{name!r}]"
    if not 0 < len(name) <= 100:
        raise CatalogError(f"{where}: an event_name has 1 to 100 characters")
    if not isinstance(spec, dict):
        raise CatalogError(f"{where} must be an object")
    unknown = sorted(set(spec) - _STATIC_KEYS)
    if unknown:
        raise CatalogError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}")
    customer_key = spec.get("customer_key", DEFAULT_CUSTOMER_KEY)
    value_key = spec.get("value_key", DEFAULT_VALUE_KEY)
    for key, value in (("customer_key", customer_key), ("value_key", value_key)):
        if not isinstance(value, str) or not value:
            raise CatalogError(f"{where}.{key} must be a non-empty string")
    formula = spec.get("formula", "sum")
    if formula not in _FORMULAS:
        raise CatalogError(f"{where}.formula must be one of {', '.join(_FORMULAS)}")
    active = spec.get("active", True)
    if not isinstance(active, bool):
        raise CatalogError(f"{where}.active must be true or false")
    return Meter(name, customer_key, value_key, needs_value=formula != "count", active=active, formula=formula)


def meter_from_stripe(obj: dict[str, Any]) -> Meter:
    """A `billing.meter` object from the v1 API, reduced to what validation needs."""
    customer = (obj.get("customer_mapping") or {}).get("event_payload_key") or DEFAULT_CUSTOMER_KEY
    value = (obj.get("value_settings") or {}).get("event_payload_key") or DEFAULT_VALUE_KEY
    formula = (obj.get("default_aggregation") or {}).get("formula", "sum")
    return Meter(
        event_name=str(obj["event_name"]),
        customer_key=str(customer),
        value_key=str(value),
        needs_value=formula != "count",
        active=obj.get("status", "active") == "active",
        meter_id=str(obj.get("id", "")),
        formula=str(formula),
        event_time_window=obj.get("event_time_window") or None,
    )


async def fetch_from_stripe(http: StripeHttp) -> MeterCatalog:
    """Read every meter (active and inactive) with `GET /v1/billing/meters`, following pagination.

    Raises `CatalogError` for anything but a full read (`status`: the HTTP status of a refused page).
    """
    meters: list[Meter] = []
    params: dict[str, str] = {"limit": "100"}
    for _ in range(1000):  # bounded: 100,000 meters
        data, has_more = _page(await _get_page(http, params))
        try:
            meters.extend(meter_from_stripe(obj) for obj in data if obj.get("event_name"))
            if not has_more or not data:
                break
            params["starting_after"] = str(data[-1]["id"])
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise CatalogError(f"GET {METERS_PATH} answered an unexpected body ({type(exc).__name__})") from None
    # Two meters may share an event_name (one inactive): prefer the active one.
    meters.sort(key=lambda m: m.active)
    return MeterCatalog(meters, known=True)


async def _get_page(http: StripeHttp, params: dict[str, str]) -> bytes:
    try:
        reply = await http.request("GET", METERS_PATH, params=params)
    except StripeUnreachable as exc:
        raise CatalogError(f"cannot read the meters: {exc}") from None
    if reply.status != 200:
        error = http.error(reply)
        note = f"{error.redirect_note}: check INGESTOR_STRIPE_API_BASE" if error.redirect_note else ""
        code = f" {error.code_or_type}" if error.code_or_type else ""
        raise CatalogError(f"GET {METERS_PATH} answered {reply.status}{code}{note}", status=reply.status)
    return reply.body


def _page(body: bytes) -> tuple[list[Any], bool]:
    """`data` and `has_more` of a Stripe list object; a `CatalogError` for any other body."""
    try:
        page = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise CatalogError(f"GET {METERS_PATH} answered an unexpected body (not JSON)") from None
    if not isinstance(page, dict) or page.get("object") != "list" or not isinstance(page.get("data"), list):
        raise CatalogError(f"GET {METERS_PATH} answered an unexpected body (not a Stripe list)")
    return page["data"], page.get("has_more") is True
