"""`POST /v2/billing/meter_event_session` and the hot path, `POST /v2/billing/meter_event_stream`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ingestor_dev.emulator.auth import check_key, credential
from ingestor_dev.emulator.bodies import JSON, read_body, require_type
from ingestor_dev.emulator.errors import invalid, rate_limited, session_expired, unauthorized
from ingestor_dev.emulator.faults import first_rejected
from ingestor_dev.emulator.responses import json_response, ok_empty
from ingestor_dev.emulator.stream_body import parse_stream_body

if TYPE_CHECKING:
    from collections.abc import Sequence

    from aiohttp import web

    from ingestor_dev.emulator.context import Call, Context

AUTHORIZATION = "Authorization"


async def create_session(ctx: Context, call: Call) -> web.StreamResponse:
    key = check_key(call.request.headers.get(AUTHORIZATION), ctx.config.known_keys)
    await read_body(call.request, ctx.config.max_body_bytes)  # `{}` or nothing; no parameters
    state = ctx.state
    session = state.sessions.create(state.ids.new("mes_"), key.key, key.livemode, ctx.clock(), ctx.config.session_ttl)
    return json_response(session.to_json())


async def stream(ctx: Context, call: Call) -> web.StreamResponse:
    request = call.request
    now = ctx.clock() if call.arrival is None else call.arrival
    livemode = admit(ctx, request.headers.get(AUTHORIZATION), now)
    body = await read_body(request, ctx.config.max_body_bytes)
    require_type(request, JSON, body)
    ingest(ctx, livemode, body, now)
    return ok_empty()


def admit(ctx: Context, authorization: str | None, now: float) -> bool:
    """Check the session token and the rate limit (401, 429); returns the session's livemode.

    Shared by `stream` and the server's fast path (`fastpath.StreamProtocol`), which has the body
    already and answers `ingest`'s errors and the 200 itself.
    """
    token = credential(authorization, allow_basic=False)
    if token is None:
        raise unauthorized("You did not provide a meter event session token in the Authorization header.")
    session = ctx.state.sessions.resolve(token, now, ctx.planner.faults.revoke_sessions_after_s)
    if session is None:
        raise session_expired()
    livemode = session.livemode
    if not ctx.limiter.allow(session.api_key, ctx.config.stream_limit(livemode), now):
        ctx.state.stats.rate_limited += 1
        raise rate_limited("endpoint-rate" if livemode else "global-rate")
    return livemode


def ingest(ctx: Context, livemode: bool, body: bytes, now: float) -> None:
    """Parse a checked body (400s), apply the `reject_identifiers` fault, de-duplicate and queue."""
    batch = parse_stream_body(body, now, ctx.state.modes[livemode].meters.active_by_name)
    _reject_by_fault(ctx, batch.identifiers)
    batch.livemode = livemode
    ctx.state.accept_stream(batch)


def _reject_by_fault(ctx: Context, identifiers: Sequence[str]) -> None:
    """The `reject_identifiers` fault: a 400 for the whole request when an identifier matches."""
    faults = ctx.planner.faults
    index = first_rejected(faults, identifiers)
    if index is None:
        return
    ctx.state.stats.faults_injected += 1
    where = f"events[{index}].identifier" if faults.reject_names_index else "identifier"
    subject = f"{where} {identifiers[index]!r}" if faults.reject_names_index else "An event's identifier"
    raise invalid(f"{subject} is refused by the emulator's reject_identifiers fault.", param=where)
