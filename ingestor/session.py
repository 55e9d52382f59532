"""Meter event session tokens: create, cache, rotate before expiry, refresh on a 401.

Stream requests authenticate with a short-lived token from ``POST /v2/billing/meter_event_session``
(15 minutes in production). Pure core: `SessionGrant`, `parse_session_response`, `refresh_at`,
`needs_refresh`, `Backoff`. I/O: `create_session` (one HTTP call, failures classified) and
`SessionManager` (the cache, a background rotator, single-flight refreshes).

Errors (`ingestor.errors`): `SessionAuthError` (401/403: the API key is wrong or lacks permission, not
retriable), `SessionUnavailable` (429, 408, 409, 5xx, no answer: retriable), else a plain `SessionError`:
a malformed 200 response (code ``malformed_response``, retriable), another 4xx (not retriable). Only a
200 is a session: a redirect (never followed) or another 2xx is a `SessionUnavailable` with code
``unexpected_answer`` (a wrong INGESTOR_STRIPE_API_BASE, a proxy). The request itself (headers, timeout,
no redirects, reading the error body) is `ingestor.stripe_http`'s.
Neither the API key nor a token ever appears in a message or log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Self

import orjson

from ingestor import backoff
from ingestor.clock import SYSTEM_CLOCK, Clock
from ingestor.errors import SessionAuthError, SessionError, SessionUnavailable, StripeUnreachable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from ingestor.stripe_http import ErrorDetails, StripeHttp

logger = logging.getLogger("ingestor.session")

SESSION_PATH: Final = "/v2/billing/meter_event_session"
DEFAULT_MARGIN_SECONDS: Final = 60.0
#: The refresh margin never exceeds this fraction of the token's lifetime (3 s ttl: 0.6 s early).
MAX_MARGIN_FRACTION: Final = 0.2
DEFAULT_BACKOFF_BASE_S: Final = 0.2
DEFAULT_BACKOFF_CAP_S: Final = 10.0
#: The background rotator never creates sessions more often than this, whatever the grants say.
MIN_ROTATION_INTERVAL_S: Final = 1.0
#: After a 401 on a token that served less than `REAUTH_MAX_INTERVAL_S`, the next 401-triggered creation
#: waits this long after the refused token was created, doubling with each such refusal in a row...
REAUTH_FIRST_INTERVAL_S: Final = 1.0
#: ...up to this; a refused token that served at least this long starts a new streak (created at once).
REAUTH_MAX_INTERVAL_S: Final = 30.0
_MESSAGE_LIMIT: Final = 200
_RFC3339: Final = re.compile(r"^(?P<head>[^.]+)(?:\.(?P<fraction>\d+))?(?P<zone>Z|z|[+-]\d\d:\d\d)$")


@dataclass(frozen=True, slots=True)
class SessionGrant:
    """One session. ``ttl_seconds`` comes from the server's own created/expires_at (immune to clock
    skew); ``expires_monotonic`` is on the local monotonic clock. The token is kept out of `repr`."""

    token: str = dataclasses.field(repr=False)
    session_id: str
    livemode: bool
    ttl_seconds: float
    expires_monotonic: float


def refresh_at(grant: SessionGrant, margin: float = DEFAULT_MARGIN_SECONDS) -> float:
    """Monotonic time at which to rotate: ``min(margin, 20 % of ttl)`` before expiry."""
    return grant.expires_monotonic - min(margin, MAX_MARGIN_FRACTION * grant.ttl_seconds)


def needs_refresh(grant: SessionGrant, now: float, margin: float = DEFAULT_MARGIN_SECONDS) -> bool:
    return now >= refresh_at(grant, margin)


def reauth_streak(streak: int, served_seconds: float) -> int:
    """401 refusals in a row, this one included: a token that served `REAUTH_MAX_INTERVAL_S` resets it."""
    return 1 if served_seconds >= REAUTH_MAX_INTERVAL_S else streak + 1


def reauth_interval(streak: int) -> float:
    """Seconds between a refused token's creation and the 401-triggered creation of its successor.

    None for the first refusal of a streak (a revoked or expired session is replaced at once), then
    1 s, 2 s, 4 s... capped at `REAUTH_MAX_INTERVAL_S`: a stream that refuses every new token (a key of
    another account, a proxy) cannot turn a storm of 401s into a storm of session creations.
    """
    if streak <= 1:
        return 0.0
    return backoff.ceiling(streak - 1, REAUTH_FIRST_INTERVAL_S, REAUTH_MAX_INTERVAL_S)


def _malformed(what: str) -> SessionError:
    return SessionError(f"malformed meter event session response: {what}", code="malformed_response", retriable=True)


def parse_rfc3339(value: str) -> datetime:
    """An RFC 3339 date-time (``2024-06-01T12:15:00.000Z``; fractions beyond microseconds are cut)."""
    match = _RFC3339.match(value)
    if match is None:
        raise ValueError("not an RFC 3339 date-time")
    fraction = match["fraction"]
    zone = "+00:00" if match["zone"] in {"Z", "z"} else match["zone"]
    text = match["head"] + (f".{fraction[:6].ljust(6, '0')}" if fraction else "") + zone
    return datetime.fromisoformat(text).astimezone(UTC)


def _field(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is str and not value):
        raise _malformed(f"{name} is missing or not a {kind.__name__}")
    return value


def _time_field(data: dict[str, Any], name: str) -> datetime:
    try:
        return parse_rfc3339(_field(data, name, str))
    except ValueError:
        raise _malformed(f"{name} is not an RFC 3339 date-time") from None


def parse_session_response(body: bytes, received_at_monotonic: float) -> SessionGrant:
    """The grant in a 200 answer; ``received_at_monotonic`` + ttl is its local expiry."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _malformed("the body is not JSON") from None
    if not isinstance(data, dict):
        raise _malformed("the body is not a JSON object")
    token = _field(data, "authentication_token", str)
    session_id = _field(data, "id", str)
    livemode = _field(data, "livemode", bool)
    ttl = (_time_field(data, "expires_at") - _time_field(data, "created")).total_seconds()
    if not ttl > 0.0:
        raise _malformed(f"expires_at is not after created (ttl {ttl:.3f} s)")
    return SessionGrant(token, session_id, livemode, ttl, received_at_monotonic + ttl)


def classify_failure(error: ErrorDetails) -> SessionError:
    """The error for an answer to the session request other than a 200 (`error`: already redacted)."""
    status, kind, code = error.status, error.type, error.code
    detail = f"HTTP {status}" + (f" {kind}/{code}" if kind or code else "")
    if error.message:
        detail += f": {error.message[:_MESSAGE_LIMIT]}"
    if error.request_id:
        detail += f" (request {error.request_id})"
    text = f"creating a meter event session failed: {detail}"
    if status < 400:
        return SessionUnavailable(text + error.redirect_note, code="unexpected_answer", status=status)
    code = code or f"http_{status}"
    if status in {401, 403}:
        return SessionAuthError(text, code=code, status=status)
    retry = error.should_retry
    if retry is True or (retry is None and (status in {408, 409, 429} or status >= 500)):
        return SessionUnavailable(text, code=code, status=status)
    return SessionError(text, code=code, status=status)


async def create_session(http: StripeHttp, *, clock: Clock = SYSTEM_CLOCK) -> SessionGrant:
    """``POST /v2/billing/meter_event_session`` on the API host; raises a classified `SessionError`.

    The expiry is counted from when the request was *sent*: the server created the token later than
    that, so the local expiry errs early by at most one round trip, never late.
    """
    sent_at = clock.monotonic()
    try:
        reply = await http.request("POST", SESSION_PATH)
    except StripeUnreachable as exc:
        raise SessionUnavailable(f"creating a meter event session failed: {exc}", code=exc.code) from None
    if reply.status == 200:
        return parse_session_response(reply.body, sent_at)
    raise classify_failure(http.error(reply))


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base·2^(failures-1)))."""

    base: float = DEFAULT_BACKOFF_BASE_S
    cap: float = DEFAULT_BACKOFF_CAP_S

    def delay(self, failures: int, rand: float) -> float:
        """``rand`` in [0, 1); ``failures`` ≥ 1 consecutive failures so far."""
        return backoff.delay(failures, self.base, self.cap, rand)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class SessionManager:
    """The current session token, rotated in the background before it expires.

    `token` normally returns at once. A refresh is single-flight: one owned task that every waiter
    awaits (shielded, so a cancelled waiter cancels nothing); its error reaches all of them, then it is
    cleared so the next caller may try again. After a failure the background rotator retries with
    backoff; meanwhile `token` returns the old token while it has not expired, and once it has, raises
    the last error (callers treat ``retriable`` ones as transient) until a refresh succeeds.

    `invalidate` (the stream answered 401) never raises: the refused token is never handed out again,
    and a new session is created by the same single-flight refresh, no sooner than `reauth_interval`
    allows; until then `token` raises a retriable `SessionUnavailable` (code ``reauth_backoff``).

    Observability, read at scrape time: `rotations_total` (sessions created, the first included),
    `refresh_failures_total`, `consecutive_failures`, `last_error_code`, `seconds_until_expiry(now)`.
    """

    def __init__(
        self,
        create: Callable[[], Awaitable[SessionGrant]],
        *,
        clock: Clock = SYSTEM_CLOCK,
        margin_seconds: float = DEFAULT_MARGIN_SECONDS,
        backoff: Backoff = Backoff(),
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._create = create
        self._clock = clock
        self._margin = margin_seconds
        self._backoff = backoff
        self._rand = rand
        self._grant: SessionGrant | None = None
        self._inflight: asyncio.Task[SessionGrant] | None = None
        self._rotator: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopped = False
        self._retry_at: float | None = None
        self._last_error: SessionError | None = None
        self._last_success_at = -math.inf
        #: the current grant was refused by the stream (401); `_reauth_at`: its successor not before
        self._refused = False
        self._reauth_streak = 0
        self._reauth_at = -math.inf
        self.rotations_total = 0
        self.refresh_failures_total = 0
        self.consecutive_failures = 0
        self.last_error_code: str | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the background rotator (it creates the first session at once)."""
        if self._stopped:
            raise RuntimeError("a stopped SessionManager cannot be restarted")
        if self._rotator is None:
            self._rotator = asyncio.create_task(self._rotate_forever(), name="ingestor-session-rotator")
            self._rotator.add_done_callback(self._on_rotator_done)

    async def stop(self) -> None:
        """Cancel the rotator and any refresh in flight, and wait for them. Safe to call twice."""
        self._stopped = True
        tasks = [task for task in (self._rotator, self._inflight) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def seconds_until_expiry(self, now: float) -> float | None:
        return None if self._grant is None else self._grant.expires_monotonic - now

    async def token(self) -> str:
        """The current token; waits only when there is no unexpired one."""
        grant, now = self._grant, self._clock.monotonic()
        if grant is not None and now < grant.expires_monotonic and not self._refused and not self._stopped:
            return grant.token
        return (await self._fresh_grant(now)).token

    async def invalidate(self, token: str) -> None:
        """The stream refused ``token`` (401): never hand it out again, and have a new session created.

        Never raises and never waits: callers then ask `token` like any other caller. Only the first
        refusal of the current token counts (a storm of 401s on it is one); an older token is ignored.
        The creation is the single-flight refresh, started here when `reauth_interval` allows it, else
        by the rotator (or a `token` caller) once it does.
        """
        grant = self._grant
        if self._stopped or grant is None or grant.token != token or self._refused:
            return
        now = self._clock.monotonic()
        self._refused = True
        self._reauth_streak = reauth_streak(self._reauth_streak, now - self._last_success_at)
        self._reauth_at = self._last_success_at + reauth_interval(self._reauth_streak)
        self._grant = dataclasses.replace(grant, expires_monotonic=min(now, grant.expires_monotonic))
        logger.info(
            "the stream refused session %s (401, %d in a row); creating the next one in %.1f s",
            grant.session_id,
            self._reauth_streak,
            max(0.0, self._not_before() - now),
        )
        if self._inflight is None and now >= self._not_before():
            self._start_refresh()
        self._wake.set()

    async def _fresh_grant(self, now: float) -> SessionGrant:
        if self._stopped:
            raise SessionError("the session manager is stopped", code="stopped")
        if self._inflight is None and now < self._not_before():
            raise self._not_yet(now)
        return await self._join(self._start_refresh())

    def _not_before(self) -> float:
        """No session creation starts before this: the failure backoff, and the 401 rate limit."""
        retry = -math.inf if self._retry_at is None else self._retry_at
        return max(retry, self._reauth_at) if self._refused else retry

    def _not_yet(self, now: float) -> SessionError:
        if self._retry_at is not None:
            return self._repeat_last_error()
        wait = self._not_before() - now
        return SessionUnavailable(
            f"no valid session token: the stream refused the last one; the next is created in {wait:.1f} s",
            code="reauth_backoff",
        )

    def _repeat_last_error(self) -> SessionError:
        last = self._last_error
        code = None if last is None else last.code
        retriable = True if last is None else last.retriable
        kind = SessionError if last is None else type(last)
        return kind(f"no valid session token; the last refresh failed: {last}", code=code, retriable=retriable)

    def _start_refresh(self) -> asyncio.Task[SessionGrant]:
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._refresh(), name="ingestor-session-refresh")
            self._inflight.add_done_callback(self._on_refresh_done)
        return self._inflight

    def _on_refresh_done(self, task: asyncio.Task[SessionGrant]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here: waiters may all have been cancelled

    async def _join(self, task: asyncio.Task[SessionGrant]) -> SessionGrant:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not _cancelling():
                raise SessionError("the session manager is stopped", code="stopped") from None
            raise

    async def _refresh(self) -> SessionGrant:
        try:
            grant = await self._create()
        except SessionError as exc:
            self._record_failure(exc)
            raise
        except Exception as exc:
            error = SessionUnavailable(f"unexpected {type(exc).__name__} creating a session", code="unexpected")
            logger.warning("unexpected error creating a meter event session", exc_info=True)
            self._record_failure(error)
            raise error from exc
        self._record_success(grant)
        return grant

    def _record_success(self, grant: SessionGrant) -> None:
        self._grant = grant
        self._refused = False
        self._last_success_at = self._clock.monotonic()
        self._retry_at = None
        self._last_error = None
        self.consecutive_failures = 0
        self.rotations_total += 1
        logger.info(
            "meter event session %s created (livemode=%s, ttl %.0f s)",
            grant.session_id,
            grant.livemode,
            grant.ttl_seconds,
        )

    def _record_failure(self, error: SessionError) -> None:
        self.consecutive_failures += 1
        self.refresh_failures_total += 1
        self.last_error_code = error.code or type(error).__name__
        self._last_error = error
        delay = self._backoff.delay(self.consecutive_failures, self._rand())
        self._retry_at = self._clock.monotonic() + delay
        self._wake.set()
        logger.warning(
            "creating a meter event session failed (%s, retriable=%s, attempt %d); retrying in %.2f s",
            self.last_error_code,
            error.retriable,
            self.consecutive_failures,
            delay,
        )

    def _next_attempt_in(self, now: float) -> float:
        """Seconds until the rotator should refresh (≤ 0: now)."""
        if self._grant is None or self._retry_at is not None or self._refused:
            return self._not_before() - now
        due = max(refresh_at(self._grant, self._margin), self._last_success_at + MIN_ROTATION_INTERVAL_S)
        return due - now

    async def _rotate_forever(self) -> None:
        while True:
            delay = self._next_attempt_in(self._clock.monotonic())
            if delay > 0.0:
                await self._sleep_or_wake(delay)
                continue
            with contextlib.suppress(SessionError):  # recorded by _refresh; retried after the backoff
                await self._join(self._start_refresh())

    async def _sleep_or_wake(self, delay: float) -> None:
        """Sleep ``delay`` on the clock, or less if a failure elsewhere set `_wake` (a new retry time)."""
        if not self._wake.is_set():
            sleeper = asyncio.ensure_future(self._clock.sleep(delay))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()
                await asyncio.gather(sleeper, waker, return_exceptions=True)
        self._wake.clear()

    def _on_rotator_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("the session rotator crashed", exc_info=exc)
