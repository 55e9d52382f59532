from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from ingestor.errors import SessionAuthError, SessionError, SessionUnavailable
from ingestor.session import (
    REAUTH_MAX_INTERVAL_S,
    SESSION_PATH,
    Backoff,
    SessionGrant,
    SessionManager,
    classify_failure,
    create_session,
    needs_refresh,
    parse_rfc3339,
    parse_session_response,
    reauth_interval,
    reauth_streak,
    refresh_at,
)
from ingestor.stripe_http import read_error
from tests.fakes import STRIPE_VERSION, FakeClock, add_landing, loopback, settle, stripe_http

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

API_KEY = "sk_test_51SecretKeyThatMustNeverLeak"
TOKEN = "ek_test_SessionTokenThatMustNeverLeak"


def session_body(ttl: float = 900.0, start_at: str = "2024-06-01T12:00:00.000Z", **overrides: Any) -> bytes:
    start = parse_rfc3339(start_at)
    body = {
        "id": "mes_123",
        "object": "v2.billing.meter_event_session",
        "authentication_token": TOKEN,
        "created": start_at,
        "expires_at": (start + timedelta(seconds=ttl)).isoformat().replace("+00:00", "Z"),
        "livemode": False,
    }
    body.update(overrides)
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def grant(ttl: float = 900.0, expires: float = 1900.0) -> SessionGrant:
    return SessionGrant("tok", "mes_1", livemode=False, ttl_seconds=ttl, expires_monotonic=expires)


# -- the pure core -------------------------------------------------------------------------------------


def test_parse_uses_the_servers_own_times_for_the_lifetime() -> None:
    parsed = parse_session_response(session_body(start_at="2019-01-01T00:00:00.000Z"), 50.0)
    assert parsed.token == TOKEN
    assert (parsed.session_id, parsed.livemode, parsed.ttl_seconds) == ("mes_123", False, 900.0)
    assert parsed.expires_monotonic == 950.0
    assert TOKEN not in repr(parsed)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-06-01T12:15:00.000Z", datetime(2024, 6, 1, 12, 15, tzinfo=UTC)),
        ("2024-06-01T12:15:00Z", datetime(2024, 6, 1, 12, 15, tzinfo=UTC)),
        ("2024-06-01T12:15:00.123456789Z", datetime(2024, 6, 1, 12, 15, 0, 123456, tzinfo=UTC)),
        ("2024-06-01T14:15:00.5+02:00", datetime(2024, 6, 1, 12, 15, 0, 500000, tzinfo=UTC)),
    ],
)
def test_parse_rfc3339(text: str, expected: datetime) -> None:
    assert parse_rfc3339(text) == expected


@pytest.mark.parametrize("text", ["", "2024-06-01", "2024-06-01T12:15:00", "yesterday", "2024-13-01T00:00:00Z"])
def test_parse_rfc3339_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (b"<html>bad gateway</html>", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (session_body(authentication_token=...), "authentication_token"),
        (session_body(authentication_token=""), "authentication_token"),
        (session_body(authentication_token=5), "authentication_token"),
        (session_body(id=None), "id"),
        (session_body(livemode="false"), "livemode"),
        (session_body(expires_at="soon"), "expires_at"),
        (session_body(created=None, expires_at="2024-06-01T12:15:00Z"), "created"),
        (session_body(expires_at=12), "expires_at"),
        (session_body(ttl=-5), "not after created"),
        (session_body(ttl=0), "not after created"),
    ],
)
def test_parse_rejects_malformed_responses_without_leaking_the_token(body: bytes, what: str) -> None:
    with pytest.raises(SessionError, match=what) as caught:
        parse_session_response(body, 0.0)
    assert caught.value.code == "malformed_response"
    assert caught.value.retriable
    assert TOKEN not in str(caught.value)


@given(st.binary(max_size=300))
def test_parse_any_bytes_gives_a_grant_or_a_session_error(body: bytes) -> None:
    with contextlib.suppress(SessionError):
        parse_session_response(body, 0.0)


FIELD_VALUES = st.one_of(
    st.text(max_size=30),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.none(),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z")),
)


@given(
    st.dictionaries(st.sampled_from(["id", "authentication_token", "created", "expires_at", "livemode"]), FIELD_VALUES)
)
def test_parse_any_session_shaped_object(data: dict[str, Any]) -> None:
    with contextlib.suppress(SessionError):
        parsed = parse_session_response(orjson.dumps(data), 0.0)
        assert parsed.ttl_seconds > 0


def test_refresh_margin_is_at_most_a_fifth_of_the_lifetime() -> None:
    assert refresh_at(grant(ttl=900.0, expires=1900.0)) == 1840.0
    assert refresh_at(grant(ttl=3.0, expires=103.0)) == pytest.approx(102.4)
    assert refresh_at(grant(ttl=900.0, expires=1900.0), margin=10.0) == 1890.0
    assert not needs_refresh(grant(ttl=3.0, expires=103.0), 102.3)
    assert needs_refresh(grant(ttl=3.0, expires=103.0), 102.4)
    assert needs_refresh(grant(ttl=3.0, expires=103.0), 200.0)


@given(
    failures=st.integers(1, 10_000),
    rand=st.floats(0.0, 1.0, exclude_max=True),
    base=st.floats(0.001, 5.0),
    cap=st.floats(0.01, 100.0),
)
def test_backoff_is_full_jitter_under_the_capped_exponential(
    failures: int, rand: float, base: float, cap: float
) -> None:
    delay = Backoff(base, cap).delay(failures, rand)
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(failures - 1, 100))


def test_backoff_defaults() -> None:
    backoff = Backoff()
    assert [backoff.delay(n, 0.999999) for n in (1, 2, 3, 6, 7, 50)] == pytest.approx(
        [0.2, 0.4, 0.8, 6.4, 10.0, 10.0], rel=1e-5
    )
    assert backoff.delay(3, 0.0) == 0.0


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retriable"),
    [
        (401, {}, SessionAuthError, False),
        (403, {"Stripe-Should-Retry": "true"}, SessionAuthError, False),
        (429, {}, SessionUnavailable, True),
        (408, {}, SessionUnavailable, True),
        (409, {}, SessionUnavailable, True),
        (500, {}, SessionUnavailable, True),
        (503, {}, SessionUnavailable, True),
        (503, {"Stripe-Should-Retry": "false"}, SessionError, False),
        (400, {"Stripe-Should-Retry": "true"}, SessionUnavailable, True),
        (400, {}, SessionError, False),
        (404, {}, SessionError, False),
    ],
)
def test_classify_failure(status: int, headers: dict[str, str], kind: type[SessionError], retriable: bool) -> None:
    error = classify_failure(read_error(status, headers, b"not json", secrets=(API_KEY,)))
    assert type(error) is kind
    assert error.retriable is retriable
    assert error.status == status
    assert error.code == f"http_{status}"


def test_classify_failure_reads_the_stripe_error_and_redacts_keys() -> None:
    body = orjson.dumps(
        {
            "error": {
                "type": "invalid_request_error",
                "code": "api_key_expired",
                "message": f"Expired API Key provided: {API_KEY}. Also sk_live_abc***1234 and Bearer {TOKEN}",
            }
        }
    )
    error = classify_failure(read_error(401, {"Request-Id": "req_42"}, body, secrets=(API_KEY,)))
    text = str(error)
    assert error.code == "api_key_expired"
    assert "invalid_request_error/api_key_expired" in text
    assert "req_42" in text
    assert "Expired API Key provided" in text
    for secret in (API_KEY, TOKEN, "sk_live_abc", "sk_test_"):
        assert secret not in text


# -- create_session against a real HTTP server ---------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post(SESSION_PATH, handler)
    async with loopback(app) as base:
        yield f"{base}/"


def stripe_error(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"type": "invalid_request_error", "code": code, "message": message}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def test_create_session_200() -> None:
    seen: dict[str, str] = {}

    async def handler(request: web.Request) -> web.Response:
        seen.update(request.headers)
        seen["body"] = (await request.read()).decode()
        return web.Response(body=session_body(ttl=900), content_type="application/json")

    async with serve(handler) as base, stripe_http(base, api_key=API_KEY) as http:
        before = time.monotonic()
        got = await create_session(http)
    assert got.token == TOKEN
    assert got.ttl_seconds == 900.0
    assert before + 900 <= got.expires_monotonic <= time.monotonic() + 900
    assert seen["Authorization"] == f"Bearer {API_KEY}"
    assert seen["Stripe-Version"] == STRIPE_VERSION
    assert seen["User-Agent"].startswith("ingestor/")
    assert seen["body"] == ""


async def test_create_session_401_is_an_auth_error_without_the_key() -> None:
    async def handler(request: web.Request) -> web.Response:
        return stripe_error(401, "api_key_expired", f"Expired API Key provided: {API_KEY}")

    async with serve(handler) as base, stripe_http(base, api_key=API_KEY) as http:
        with pytest.raises(SessionAuthError) as caught:
            await create_session(http)
    assert not caught.value.retriable
    assert caught.value.code == "api_key_expired"
    assert API_KEY not in str(caught.value)


@pytest.mark.parametrize("status", [429, 500, 502])
async def test_create_session_retriable_statuses(status: int) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text="oops")

    async with serve(handler) as base, stripe_http(base, api_key=API_KEY) as http:
        with pytest.raises(SessionUnavailable) as caught:
            await create_session(http)
    assert caught.value.retriable
    assert caught.value.status == status


async def test_create_session_malformed_json() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b'{"id": "mes_1", "authentication_token": ', content_type="application/json")

    async with serve(handler) as base, stripe_http(base, api_key=API_KEY) as http:
        with pytest.raises(SessionError, match="not JSON") as caught:
            await create_session(http)
    assert caught.value.code == "malformed_response"


@pytest.mark.parametrize(
    ("status", "headers"),
    [(301, {"Location": "/landing"}), (302, {"Location": "/landing"}), (307, {"Location": "/landing"}), (201, {})],
)
async def test_create_session_takes_only_a_200_and_follows_no_redirect(status: int, headers: dict[str, str]) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers=headers, body=session_body() if status < 300 else b"")

    app = web.Application()
    app.router.add_post(SESSION_PATH, handler)
    landed = add_landing(app, session_body())  # would hand out a perfectly good session
    async with loopback(app) as base, stripe_http(base, api_key=API_KEY) as http:
        with pytest.raises(SessionUnavailable) as caught:
            await create_session(http)
    assert caught.value.code == "unexpected_answer"
    assert caught.value.retriable
    assert landed == []
    assert TOKEN not in str(caught.value)


async def test_create_session_timeout() -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.Response(body=session_body(), content_type="application/json")

    async with serve(handler) as base, stripe_http(base, api_key=API_KEY, timeout=0.05) as http:
        with pytest.raises(SessionUnavailable) as caught:
            await create_session(http)
    assert caught.value.code == "timeout"


async def test_create_session_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with stripe_http(f"http://127.0.0.1:{port}", api_key=API_KEY) as http:
        with pytest.raises(SessionUnavailable) as caught:
            await create_session(http)
    assert caught.value.retriable
    assert caught.value.code == "connection_error"
    assert API_KEY not in str(caught.value)


async def test_manager_rotates_real_sessions_from_a_real_server() -> None:
    served = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        body = session_body(ttl=2.0, authentication_token=f"ek_test_{served}")
        return web.Response(body=body, content_type="application/json")

    async with serve(handler) as base, stripe_http(base, api_key=API_KEY) as http:
        create = functools.partial(create_session, http)
        async with SessionManager(create) as manager:
            assert await manager.token() == "ek_test_1"
            first_sent = time.monotonic()
            while (current := await manager.token()) == "ek_test_1" and time.monotonic() - first_sent < 3:
                await asyncio.sleep(0.02)
            rotated_after = time.monotonic() - first_sent
    assert current == "ek_test_2"
    assert 1.4 < rotated_after < 2.0  # due at 2 s - 20 % = 1.6 s, before the first token expired
    assert served == 2


# -- SessionManager with a fake clock ------------------------------------------------------------------


class FakeCreate:
    """A `create` callable: counts calls, fails as scripted, can be held at a gate."""

    def __init__(self, clock: FakeClock, ttl: float = 3.0) -> None:
        self.clock = clock
        self.ttl = ttl
        self.calls = 0
        self.issued = 0
        self.errors: list[BaseException] = []
        self.always: BaseException | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> SessionGrant:
        self.calls += 1
        await asyncio.sleep(0)
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        if self.always is not None:
            raise self.always
        self.issued += 1
        n = self.issued
        return SessionGrant(
            f"tok_{n}",
            f"mes_{n}",
            livemode=False,
            ttl_seconds=self.ttl,
            expires_monotonic=self.clock.monotonic() + self.ttl,
        )


def unavailable() -> SessionUnavailable:
    return SessionUnavailable("HTTP 500", code="http_500", status=500)


def manager_for(create: FakeCreate, clock: FakeClock) -> SessionManager:
    return SessionManager(create, clock=clock, rand=lambda: 0.5)


async def test_fifty_concurrent_token_calls_at_start_create_one_session() -> None:
    clock = FakeClock()
    create = FakeCreate(clock)
    create.gate = asyncio.Event()
    async with manager_for(create, clock) as manager:
        waiters = [asyncio.create_task(manager.token()) for _ in range(50)]
        await settle()
        create.gate.set()
        assert await asyncio.gather(*waiters) == ["tok_1"] * 50
    assert create.calls == 1
    assert manager.rotations_total == 1


async def test_single_flight_without_the_background_rotator() -> None:
    clock = FakeClock()
    create = FakeCreate(clock)
    manager = manager_for(create, clock)
    assert await asyncio.gather(*(manager.token() for _ in range(50))) == ["tok_1"] * 50
    assert create.calls == 1
    await manager.stop()


async def test_rotates_before_expiry_so_callers_never_wait() -> None:
    clock = FakeClock()
    create = FakeCreate(clock, ttl=3.0)
    async with manager_for(create, clock) as manager:
        await clock.advance(0.0)
        start = clock.now
        assert await manager.token() == "tok_1"
        await clock.advance(2.3)
        assert (create.calls, await manager.token()) == (1, "tok_1")
        await clock.advance(0.2)  # 2.5 s: past 3 s - 0.6 s
        assert create.calls == 2
        assert clock.now < start + 3.0
        assert await manager.token() == "tok_2"
        for _ in range(300):  # 30 s more: always a valid token at hand
            await clock.advance(0.1)
            remaining = manager.seconds_until_expiry(clock.now)
            assert remaining is not None
            assert remaining > 0
        assert create.calls == pytest.approx(2 + 30 / 2.4, abs=1)


async def test_invalidate_storm_refreshes_once() -> None:
    clock = FakeClock()
    create = FakeCreate(clock, ttl=900.0)
    async with manager_for(create, clock) as manager:
        old = await manager.token()
        create.gate = asyncio.Event()
        storm = [asyncio.create_task(manager.invalidate(old)) for _ in range(20)]
        await settle()
        callers = [asyncio.create_task(manager.token()) for _ in range(5)]  # must not use the old one
        await settle()
        assert not any(c.done() for c in callers)
        create.gate.set()
        await asyncio.gather(*storm)
        assert await asyncio.gather(*callers) == ["tok_2"] * 5
        assert create.calls == 2
        await manager.invalidate(old)  # late: the token was replaced already
        assert create.calls == 2


async def test_invalidate_an_old_token_does_nothing() -> None:
    clock = FakeClock()
    create = FakeCreate(clock, ttl=900.0)
    async with manager_for(create, clock) as manager:
        assert await manager.token() == "tok_1"
        await manager.invalidate("tok_0")
        await manager.invalidate("something else")
        assert create.calls == 1
        assert await manager.token() == "tok_1"


async def test_invalidate_before_any_session_does_nothing() -> None:
    clock = FakeClock()
    manager = manager_for(FakeCreate(clock), clock)
    await manager.invalidate("tok_1")
    assert manager.seconds_until_expiry(clock.now) is None
    await manager.stop()


async def test_invalidate_joins_a_rotation_in_flight() -> None:
    clock = FakeClock()
    create = FakeCreate(clock, ttl=3.0)
    async with manager_for(create, clock) as manager:
        assert await manager.token() == "tok_1"
        create.gate = asyncio.Event()
        await clock.advance(2.5)  # the rotator's refresh is now held at the gate
        assert create.calls == 2
        invalidation = asyncio.create_task(manager.invalidate("tok_1"))
        await settle()
        create.gate.set()
        await invalidation
        assert create.calls == 2
        assert await manager.token() == "tok_2"


async def test_refresh_failures_back_off_then_recover() -> None:
    clock = FakeClock()
    create = FakeCreate(clock, ttl=3.0)
    async with manager_for(create, clock) as manager:
        assert await manager.token() == "tok_1"
        create.errors = [unavailable(), unavailable()]
        await clock.advance(2.4)  # rotation fails; retry after 0.5 * 0.2 s
        assert (create.calls, manager.consecutive_failures) == (2, 1)
        assert await manager.token() == "tok_1"  # the old one is still valid
        await clock.advance(0.1)  # fails again; retry after 0.5 * 0.4 s
        assert (create.calls, manager.consecutive_failures) == (3, 2)
        assert await manager.token() == "tok_1"
        await clock.advance(0.2)
        assert create.calls == 4
        assert await manager.token() == "tok_2"
    assert manager.refresh_failures_total == 2
    assert manager.consecutive_failures == 0
    assert manager.last_error_code == "http_500"
    assert manager.rotations_total == 2


async def test_expired_and_failing_raises_the_retriable_error() -> None:
    clock = FakeClock()
    create = FakeCreate(clock, ttl=3.0)
    async with manager_for(create, clock) as manager:
        assert await manager.token() == "tok_1"
        create.always = unavailable()
        await clock.advance(3.5)
        with pytest.raises(SessionUnavailable) as caught:
            await manager.token()
        assert caught.value.retriable
        assert "tok_" not in str(caught.value)
        create.always = None
        await clock.advance(1.0)  # the background retry (due at 3.9 s) succeeds
        assert await manager.token() == "tok_2"


async def test_first_session_failing_reaches_every_waiter_then_backs_off() -> None:
    clock = FakeClock()
    create = FakeCreate(clock)
    create.errors = [SessionAuthError("HTTP 401", code="api_key_expired", status=401)]
    async with manager_for(create, clock) as manager:
        results = await asyncio.gather(*(manager.token() for _ in range(10)), return_exceptions=True)
        assert all(isinstance(r, SessionAuthError) for r in results)
        with pytest.raises(SessionAuthError) as caught:  # within the backoff: fails fast, no new call
            await manager.token()
        assert not caught.value.retriable
        assert caught.value.code == "api_key_expired"
        assert create.calls == 1
        await clock.advance(0.1)  # backoff: 0.5 * 0.2 s
        assert create.calls == 2
        assert await manager.token() == "tok_1"


async def test_a_401_while_creation_fails_never_raises_and_the_refused_token_is_never_reused() -> None:
    clock = FakeClock()
    create = FakeCreate(clock, ttl=900.0)
    async with manager_for(create, clock) as manager:
        old = await manager.token()
        create.errors = [unavailable()]
        await manager.invalidate(old)  # the creation it starts fails: the caller is not told
        await settle()
        assert create.calls == 2
        with pytest.raises(SessionUnavailable) as caught:  # the refused token is never handed out again
            await manager.token()
        assert caught.value.retriable
        await manager.invalidate(old)  # again while creation is backing off: still nothing raised
        assert create.calls == 2
        await clock.advance(0.1)  # the rotator retries after the backoff
        assert await manager.token() == "tok_2"


async def test_a_401_storm_during_a_creation_outage_waits_for_recovery() -> None:
    clock = FakeClock()
    create = FakeCreate(clock, ttl=900.0)
    async with manager_for(create, clock) as manager:
        old = await manager.token()
        create.always = unavailable()
        await asyncio.gather(*(manager.invalidate(old) for _ in range(50)))
        for _ in range(100):  # 10 s of failing creations, 401s and token calls all along
            await clock.advance(0.1)
            await asyncio.gather(*(manager.invalidate(old) for _ in range(5)))
            with pytest.raises(SessionUnavailable):
                await manager.token()
        failed = create.calls
        create.always = None
        await clock.advance(10.0)  # the backoff is capped at 10 s
        assert await manager.token() == "tok_2"
    assert failed <= 1 + 10  # one creation per backoff step, never one per 401
    assert manager.rotations_total == 2


def test_reauth_interval_grows_with_refusals_in_a_row_and_resets_after_a_token_served() -> None:
    assert [reauth_interval(n) for n in range(1, 8)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert reauth_interval(10_000) == REAUTH_MAX_INTERVAL_S
    assert reauth_streak(0, 0.0) == 1
    assert reauth_streak(5, 0.5) == 6
    assert reauth_streak(5, REAUTH_MAX_INTERVAL_S) == 1


class ConcurrencyProbe(FakeCreate):
    """A `FakeCreate` whose creations take 0.05 s of fake time, recording how many overlap."""

    def __init__(self, clock: FakeClock, ttl: float = 900.0) -> None:
        super().__init__(clock, ttl)
        self.active = 0
        self.max_active = 0
        self.started_at: list[float] = []

    async def __call__(self) -> SessionGrant:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.started_at.append(self.clock.now)
        try:
            await self.clock.sleep(0.05)
            return await super().__call__()
        finally:
            self.active -= 1


async def test_fifty_senders_refused_on_every_token_create_sessions_single_flight_and_rate_limited() -> None:
    clock = FakeClock()
    create = ConcurrencyProbe(clock)
    async with manager_for(create, clock) as manager:

        async def sender() -> None:  # every token it gets is refused (401), then it asks again
            for _ in range(10_000):
                try:
                    await manager.invalidate(await manager.token())
                except SessionUnavailable:
                    await clock.sleep(0.5)

        senders = [asyncio.create_task(sender()) for _ in range(50)]
        for _ in range(60):  # 30 s
            await clock.advance(0.5)
        assert not any(task.done() for task in senders)
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
    assert create.max_active == 1
    gaps = [b - a for a, b in itertools.pairwise(create.started_at)]
    # created at 0 and at once after the first 401, then 1, 2, 4, 8 s after the previous one
    assert len(create.started_at) <= 6, create.started_at
    assert all(gap >= 0.9 for gap in gaps[1:]), gaps


async def test_a_token_that_served_long_enough_is_replaced_at_once_after_a_401() -> None:
    clock = FakeClock()
    create = FakeCreate(clock, ttl=900.0)
    async with manager_for(create, clock) as manager:
        for n in range(1, 4):
            await clock.advance(REAUTH_MAX_INTERVAL_S)
            await manager.invalidate(await manager.token())
            assert await manager.token() == f"tok_{n + 1}"  # no wait: a new streak each time
        assert create.calls == 4


async def test_unexpected_exception_from_create_is_retriable() -> None:
    clock = FakeClock()
    create = FakeCreate(clock)
    create.errors = [RuntimeError("boom")]
    async with manager_for(create, clock) as manager:
        with pytest.raises(SessionUnavailable) as caught:
            await manager.token()
        assert caught.value.code == "unexpected"
        await clock.advance(0.1)
        assert await manager.token() == "tok_1"


async def test_a_cancelled_waiter_does_not_cancel_the_refresh() -> None:
    clock = FakeClock()
    create = FakeCreate(clock)
    create.gate = asyncio.Event()
    manager = manager_for(create, clock)
    first = asyncio.create_task(manager.token())
    second = asyncio.create_task(manager.token())
    await settle()
    first.cancel()
    await settle()
    create.gate.set()
    assert await second == "tok_1"
    assert first.cancelled()
    assert create.calls == 1
    await manager.stop()


async def test_stop_is_idempotent_and_leaves_no_task_behind() -> None:
    clock = FakeClock()
    create = FakeCreate(clock)
    manager = manager_for(create, clock)
    async with manager:
        await manager.token()
        rotator = manager._rotator
    assert rotator is not None
    assert rotator.cancelled()
    await manager.stop()
    await asyncio.gather(manager.stop(), manager.stop())
    assert asyncio.all_tasks() == {asyncio.current_task()}
    with pytest.raises(SessionError, match="stopped"):
        await manager.token()
    with pytest.raises(RuntimeError, match="restarted"):
        await manager.start()


async def test_stop_during_a_refresh_fails_waiters_cleanly() -> None:
    clock = FakeClock()
    create = FakeCreate(clock)
    create.gate = asyncio.Event()
    manager = manager_for(create, clock)
    await manager.start()
    waiter = asyncio.create_task(manager.token())
    await settle()
    await manager.stop()
    with pytest.raises(SessionError, match="stopped") as caught:
        await waiter
    assert not caught.value.retriable
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_logs_never_carry_a_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ingestor.session")
    clock = FakeClock()
    create = FakeCreate(clock, ttl=3.0)
    create.errors = [unavailable()]
    async with manager_for(create, clock) as manager:
        await clock.advance(5.0)
        await manager.token()
        await manager.invalidate(await manager.token())
    assert caplog.records
    assert "tok_" not in caplog.text
    assert all(isinstance(r.msg, str) and "%" in r.msg for r in caplog.records)
