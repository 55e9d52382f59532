"""v1 billing meters: create, list, retrieve, update, deactivate, reactivate, event summaries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from ingestor_dev.emulator.aggregation import Formula, Query, Window, check_range, summarize
from ingestor_dev.emulator.auth import ApiKey, check_key
from ingestor_dev.emulator.bodies import form_body
from ingestor_dev.emulator.errors import ApiError, invalid, missing, not_found
from ingestor_dev.emulator.limits import MAX_NAME_LENGTH
from ingestor_dev.emulator.lists import list_object, paginate
from ingestor_dev.emulator.meters import Meter
from ingestor_dev.emulator.responses import json_response

if TYPE_CHECKING:
    from collections.abc import Mapping

    from aiohttp import web

    from ingestor_dev.emulator.context import Call, Context

AUTHORIZATION = "Authorization"
FORMULAS = ("count", "sum", "last")
WINDOWS = ("hour", "day")


def _key(ctx: Context, call: Call) -> ApiKey:
    return check_key(call.request.headers.get(AUTHORIZATION), ctx.config.known_keys, allow_basic=True)


def _text(form: Mapping[str, Any], name: str, limit: int, required: bool = True) -> str | None:
    value = form.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise invalid(f"{name} must be a string of at most {limit} characters.", param=name)
    return value


def _choice(value: Any, allowed: tuple[str, ...], param: str) -> str:
    if value not in allowed:
        raise invalid(f"Invalid {param}: must be one of {', '.join(allowed)}.", param=param)
    return cast("str", value)


def _nested(form: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = form.get(name, {})
    if not isinstance(value, dict):
        raise invalid(f"{name} must be an object.", param=name)
    return value


async def create_meter(ctx: Context, call: Call) -> web.StreamResponse:
    key = _key(ctx, call)
    form = await form_body(call.request, ctx.config.max_body_bytes)
    display_name = cast("str", _text(form, "display_name", 250))
    event_name = cast("str", _text(form, "event_name", MAX_NAME_LENGTH))
    aggregation = _nested(form, "default_aggregation")
    if "formula" not in aggregation:
        raise missing("default_aggregation[formula]")
    formula = _choice(aggregation["formula"], FORMULAS, "default_aggregation[formula]")
    mapping = _nested(form, "customer_mapping")
    if mapping and mapping.get("type", "by_id") != "by_id":
        raise invalid("customer_mapping[type] must be by_id.", param="customer_mapping[type]")
    customer_key = mapping.get("event_payload_key") or "stripe_customer_id"
    value_key = _nested(form, "value_settings").get("event_payload_key") or "value"
    window = form.get("event_time_window") or None
    if window is not None:
        window = _choice(window, WINDOWS, "event_time_window")
    state = ctx.state
    state.flush()
    registry = state.mode(key.livemode).meters
    if event_name in registry.active_by_name:
        raise invalid(f"An active meter with event_name `{event_name}` already exists.", param="event_name")
    now = int(ctx.clock())
    prefix = "mtr_live_" if key.livemode else "mtr_test_"
    meter = Meter(
        state.ids.new(prefix, 32),
        display_name,
        event_name,
        cast("Formula", formula),
        customer_key,
        value_key,
        cast("Window | None", window),
        key.livemode,
        now,
        updated=now,
    )
    registry.add(meter)
    return json_response(meter.to_json())


def _meter(ctx: Context, call: Call, key: ApiKey) -> Meter:
    meter_id = call.params["id"]
    meter = ctx.state.mode(key.livemode).meters.by_id.get(meter_id)
    if meter is None:
        raise not_found(f"No such billing meter: '{meter_id}'", param="id")
    return meter


async def list_meters(ctx: Context, call: Call) -> web.StreamResponse:
    key = _key(ctx, call)
    query = call.request.query
    status = query.get("status")
    if status is not None:
        _choice(status, ("active", "inactive"), "status")
    meters = [
        meter
        for meter in reversed(ctx.state.mode(key.livemode).meters.by_id.values())
        if status is None or meter.status == status
    ]
    page, has_more = paginate(meters, lambda meter: meter.id, query)
    return json_response(list_object([meter.to_json() for meter in page], has_more, "/v1/billing/meters"))


async def retrieve_meter(ctx: Context, call: Call) -> web.StreamResponse:
    return json_response(_meter(ctx, call, _key(ctx, call)).to_json())


async def update_meter(ctx: Context, call: Call) -> web.StreamResponse:
    key = _key(ctx, call)
    meter = _meter(ctx, call, key)
    form = await form_body(call.request, ctx.config.max_body_bytes)
    display_name = _text(form, "display_name", 250, required=False)
    if display_name is not None:
        meter.display_name = display_name
        meter.updated = int(ctx.clock())
    return json_response(meter.to_json())


async def deactivate_meter(ctx: Context, call: Call) -> web.StreamResponse:
    key = _key(ctx, call)
    meter = _meter(ctx, call, key)
    ctx.state.flush()
    if meter.status == "active":
        ctx.state.mode(key.livemode).meters.set_status(meter, "inactive", int(ctx.clock()))
    return json_response(meter.to_json())


async def reactivate_meter(ctx: Context, call: Call) -> web.StreamResponse:
    key = _key(ctx, call)
    meter = _meter(ctx, call, key)
    ctx.state.flush()
    registry = ctx.state.mode(key.livemode).meters
    other = registry.active_by_name.get(meter.event_name)
    if other is not None and other is not meter:
        raise invalid(f"An active meter with event_name `{meter.event_name}` already exists.", param="id")
    registry.set_status(meter, "active", int(ctx.clock()))
    return json_response(meter.to_json())


def _unix(query: Mapping[str, str], name: str) -> int:
    raw = query.get(name)
    if raw is None:
        raise missing(name)
    if not raw.isdigit():
        raise invalid(f"{name} must be a unix timestamp in seconds.", param=name)
    return int(raw)


async def event_summaries(ctx: Context, call: Call) -> web.StreamResponse:
    key = _key(ctx, call)
    meter = _meter(ctx, call, key)
    query = call.request.query
    customer = query.get("customer")
    if not customer:
        raise missing("customer")
    start, end = _unix(query, "start_time"), _unix(query, "end_time")
    grouping_raw = query.get("value_grouping_window")
    grouping = cast("Window | None", _choice(grouping_raw, WINDOWS, "value_grouping_window") if grouping_raw else None)
    problem = check_range(start, end, grouping)
    if problem is not None:
        raise ApiError(400, "parameter_invalid", problem, param="start_time")
    state = ctx.state
    state.flush()
    events = meter.events.for_customer(customer, state.mode(key.livemode).cancelled)
    summaries = summarize(events, meter.formula, Query(start, end, grouping), meter.event_time_window)
    objects = [
        {
            "id": f"mtrusg_{meter.id.removeprefix('mtr_')}_{summary.start_time}",
            "object": "billing.meter_event_summary",
            "aggregated_value": summary.aggregated_value,
            "end_time": summary.end_time,
            "livemode": meter.livemode,
            "meter": meter.id,
            "start_time": summary.start_time,
        }
        for summary in summaries
    ]
    page, has_more = paginate(objects, lambda item: cast("str", item["id"]), query)
    return json_response(list_object(page, has_more, f"/v1/billing/meters/{meter.id}/event_summaries"))
