"""The route table: exact paths in a dict, meter paths by one regular expression."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ingestor_dev.emulator import api_control, api_events, api_meters, api_stream

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aiohttp import web

    from ingestor_dev.emulator.context import Call, Context


STREAM_PATH = "/v2/billing/meter_event_stream"
SESSION_PATH = "/v2/billing/meter_event_session"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    handler: Callable[[Context, Call], Awaitable[web.StreamResponse]]
    is_stream: bool = False
    #: control endpoints are never faulted or refused
    control: bool = False
    #: the handler serves injected latency itself (while holding its in-flight marker)
    latency_inside: bool = False
    #: session creation (the only route faults with scope `session` apply to)
    is_session: bool = False


def _table() -> dict[tuple[str, str], Route]:
    plain = {
        ("POST", "/v2/billing/meter_event_adjustments"): api_events.create_adjustment,
        ("POST", "/v1/billing/meter_events"): api_events.create_v1_event,
        ("POST", "/v1/billing/meters"): api_meters.create_meter,
        ("GET", "/v1/billing/meters"): api_meters.list_meters,
    }
    control = {
        ("GET", "/_emulator/stats"): api_control.stats,
        ("POST", "/_emulator/reset"): api_control.reset,
        ("GET", "/_emulator/faults"): api_control.get_faults,
        ("POST", "/_emulator/faults"): api_control.set_faults,
        ("POST", "/_emulator/sessions/revoke"): api_control.revoke_sessions,
        ("GET", "/_emulator/events"): api_control.events,
        ("GET", "/_emulator/errors"): api_control.errors,
        ("GET", "/_emulator/error_reports"): api_control.error_reports,
        ("POST", "/_emulator/flush"): api_control.flush,
    }
    table = {key: Route(key[1], handler) for key, handler in plain.items()}
    table |= {key: Route(key[1], handler, control=True) for key, handler in control.items()}
    table["POST", STREAM_PATH] = Route(STREAM_PATH, api_stream.stream, is_stream=True)
    table["POST", SESSION_PATH] = Route(SESSION_PATH, api_stream.create_session, is_session=True)
    table["POST", "/v2/billing/meter_events"] = Route(
        "/v2/billing/meter_events", api_events.create_v2_event, latency_inside=True
    )
    return table


_METER = re.compile(r"/v1/billing/meters/(?P<id>[A-Za-z0-9_]+)(?P<action>/deactivate|/reactivate|/event_summaries)?")
_METER_ROUTES: dict[tuple[str, str], Route] = {
    ("GET", ""): Route("/v1/billing/meters/{id}", api_meters.retrieve_meter),
    ("POST", ""): Route("/v1/billing/meters/{id}", api_meters.update_meter),
    ("POST", "/deactivate"): Route("/v1/billing/meters/{id}/deactivate", api_meters.deactivate_meter),
    ("POST", "/reactivate"): Route("/v1/billing/meters/{id}/reactivate", api_meters.reactivate_meter),
    ("GET", "/event_summaries"): Route("/v1/billing/meters/{id}/event_summaries", api_meters.event_summaries),
}


class Router:
    def __init__(self) -> None:
        self._table = _table()

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str]]:
        route = self._table.get((method, path))
        if route is not None:
            return route, {}
        found = _METER.fullmatch(path)
        if found is None:
            return None, {}
        route = _METER_ROUTES.get((method, found.group("action") or ""))
        return route, {"id": found.group("id")}
