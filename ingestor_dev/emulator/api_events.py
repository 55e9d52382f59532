"""Synchronous meter events (v2 JSON and v1 form) and v2 meter event adjustments (cancel)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ingestor_dev.emulator.auth import check_key
from ingestor_dev.emulator.bodies import form_body, json_body
from ingestor_dev.emulator.errors import ApiError, invalid, missing
from ingestor_dev.emulator.idempotency import REPLAYED_HEADER
from ingestor_dev.emulator.responses import json_response
from ingestor_dev.emulator.stream_body import parse_single_event
from ingestor_dev.emulator.timefmt import format_rfc3339

if TYPE_CHECKING:
    from aiohttp import web

    from ingestor_dev.emulator.context import Call, Context

AUTHORIZATION = "Authorization"


async def create_v2_event(ctx: Context, call: Call) -> web.StreamResponse:
    """One event, validated now; one call at a time per (customer, meter), else 409."""
    key = check_key(call.request.headers.get(AUTHORIZATION), ctx.config.known_keys)
    document = await json_body(call.request, ctx.config.max_body_bytes)
    arrival = ctx.clock()
    event = parse_single_event(document, arrival)
    name, payload, identifier, timestamp = event
    state = ctx.state
    meter, _ = state.mode(key.livemode).meters.lookup(name)
    marker = (key.livemode, meter.id, payload.get(meter.customer_key, "")) if meter else None
    if marker in state.inflight:
        raise ApiError(
            409,
            "too_many_concurrent_requests",
            "Cannot create multiple usage events for the same customer, meter concurrently.",
        )
    if marker is not None:
        state.inflight.add(marker)
    try:
        await call.serve_latency()
        state.record_sync(key.livemode, event, arrival)
    finally:
        if marker is not None:
            state.inflight.discard(marker)
    return json_response(
        {
            "object": "v2.billing.meter_event",
            "created": format_rfc3339(arrival),
            "event_name": name,
            "identifier": identifier,
            "livemode": key.livemode,
            "payload": payload,
            "timestamp": format_rfc3339(timestamp),
        }
    )


async def create_adjustment(ctx: Context, call: Call) -> web.StreamResponse:
    """A cancel adjustment; with an `Idempotency-Key`, a repeated request gets the first answer again."""
    key = check_key(call.request.headers.get(AUTHORIZATION), ctx.config.known_keys)
    document = await json_body(call.request, ctx.config.max_body_bytes)
    name = document.get("event_name")
    if not isinstance(name, str) or not name:
        raise missing("event_name")
    cancel = document.get("cancel")
    identifier = cancel.get("identifier") if isinstance(cancel, dict) else None
    if document.get("type", "cancel") != "cancel" or not isinstance(identifier, str):
        raise ApiError(
            400,
            "invalid_cancel_configuration",
            "A cancel adjustment needs `type: cancel` and `cancel.identifier`.",
            param="cancel",
        )
    now = ctx.clock()
    idempotency_key = call.request.headers.get("Idempotency-Key")
    store = ctx.state.idempotency
    if idempotency_key:
        saved = store.lookup(key.key, idempotency_key, document, now)
        if saved is not None:
            return json_response(saved.body, saved.status, {REPLAYED_HEADER: "true"})
    try:
        ctx.state.cancel(key.livemode, name, identifier, now)
    except ApiError as error:
        if idempotency_key:
            store.save(key.key, idempotency_key, document, (error.status, error.body()), now)
        raise
    body = {
        "id": ctx.state.ids.new("mtradj_"),
        "object": "v2.billing.meter_event_adjustment",
        "cancel": {"identifier": identifier},
        "created": format_rfc3339(now),
        "event_name": name,
        "livemode": key.livemode,
        "status": "complete",
        "type": "cancel",
    }
    if idempotency_key:
        store.save(key.key, idempotency_key, document, (200, body), now)
    return json_response(body)


async def create_v1_event(ctx: Context, call: Call) -> web.StreamResponse:
    key = check_key(call.request.headers.get(AUTHORIZATION), ctx.config.known_keys, allow_basic=True)
    form = await form_body(call.request, ctx.config.max_body_bytes)
    arrival = ctx.clock()
    event = parse_single_event(_v1_event(form, arrival), arrival)
    name, payload, identifier, timestamp = event
    ctx.state.record_sync(key.livemode, event, arrival)
    return json_response(
        {
            "object": "billing.meter_event",
            "created": int(arrival),
            "event_name": name,
            "identifier": identifier,
            "livemode": key.livemode,
            "payload": payload,
            "timestamp": int(timestamp),
        }
    )


def _v1_event(form: dict[str, Any], arrival: float) -> dict[str, Any]:
    """The v1 form as a v2-shaped event (unix `timestamp` turned into RFC 3339)."""
    event: dict[str, Any] = {k: form[k] for k in ("event_name", "payload", "identifier") if k in form}
    raw = form.get("timestamp")
    if raw is not None:
        if not isinstance(raw, str) or not raw.isdigit():
            raise invalid("timestamp must be a unix timestamp in seconds.", param="timestamp")
        event["timestamp"] = format_rfc3339(float(raw))
    elif "timestamp" not in form:
        event["timestamp"] = format_rfc3339(arrival)
    return event
