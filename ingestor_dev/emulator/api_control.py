"""Emulator-only endpoints under `/_emulator/` (no authentication, never faulted).

- `GET  /_emulator/stats`            statistics (flushes pending validation first)
- `POST /_emulator/reset`            forget everything (meters, events, sessions, statistics)
- `GET  /_emulator/faults`           current faults; `POST` a JSON object of changes
                                     (`{"replace": true, ...}` starts from no faults)
- `POST /_emulator/sessions/revoke`  `{"token": "..."}` or `{"all": true}` (the default)
- `GET  /_emulator/events?identifier=a&identifier=b`  per-identifier counts; without one, all
                                     duplicated identifiers and their counts
- `GET  /_emulator/errors`           every failed event (identifier, code, message, meter)
- `GET  /_emulator/error_reports`    the error reports, as sent to the webhook
- `POST /_emulator/flush`            validate pending stream events now
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ingestor_dev.emulator.bodies import json_body
from ingestor_dev.emulator.errors import invalid
from ingestor_dev.emulator.faults import faults_from_json
from ingestor_dev.emulator.responses import json_response

if TYPE_CHECKING:
    from aiohttp import web

    from ingestor_dev.emulator.context import Call, Context


async def stats(ctx: Context, _call: Call) -> web.StreamResponse:
    return json_response(ctx.state.stats_json())


async def reset(ctx: Context, _call: Call) -> web.StreamResponse:
    ctx.state.reset()
    return json_response({"reset": True})


async def get_faults(ctx: Context, _call: Call) -> web.StreamResponse:
    return json_response(ctx.planner.faults.to_json())


async def set_faults(ctx: Context, call: Call) -> web.StreamResponse:
    changes = await json_body(call.request, ctx.config.max_body_bytes)
    replace = bool(changes.pop("replace", False))
    try:
        faults = faults_from_json(ctx.planner.faults, changes, replace=replace)
    except ValueError as exc:
        raise invalid(str(exc), param="faults") from exc
    ctx.switch.set_faults(faults)
    await ctx.switch.settle()
    return json_response(faults.to_json())


async def revoke_sessions(ctx: Context, call: Call) -> web.StreamResponse:
    document = await json_body(call.request, ctx.config.max_body_bytes)
    token = document.get("token")
    if token is not None and not isinstance(token, str):
        raise invalid("token must be a string.", param="token")
    return json_response({"revoked": ctx.state.sessions.revoke(token)})


async def events(ctx: Context, call: Call) -> web.StreamResponse:
    identifiers = call.request.query.getall("identifier", [])
    state = ctx.state
    if identifiers:
        return json_response({"data": [state.identifier_info(identifier) for identifier in identifiers]})
    state.flush()
    duplicates = {identifier: count for mode in state.modes.values() for identifier, count in mode.duplicates.items()}
    return json_response({"duplicates": duplicates, "stats": state.stats_json()})


async def errors(ctx: Context, _call: Call) -> web.StreamResponse:
    return json_response({"data": ctx.state.failures_json()})


async def error_reports(ctx: Context, _call: Call) -> web.StreamResponse:
    ctx.state.flush()
    return json_response({"data": ctx.state.reports})


async def flush(ctx: Context, _call: Call) -> web.StreamResponse:
    return json_response({"validated": ctx.state.flush()})
