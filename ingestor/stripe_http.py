"""The one HTTP layer every Stripe call goes through: headers, timeouts, no redirects, error bodies.

`StripeHttp` is one Stripe host (the API, or the meter event stream's host) with its version, its timeout
and, for the API, the secret key. `request` builds the headers (``Authorization: Bearer``, ``Stripe-Version``,
``User-Agent``, ``Content-Type`` when there is a body, ``Idempotency-Key`` when given), sets the timeout on
the request and never follows a redirect (aiohttp would turn a POST into a GET, and whatever answered it
would be taken for Stripe's verdict). It returns every answer as a `Reply`, whatever its status: what an
answer *means* belongs to the endpoint's module (stream_client, session, catalog, adjustments, audit). A
request that gets no answer (a timeout, a connection error) raises `StripeUnreachable`.

`read_error` (pure) reads a non-2xx answer into one `ErrorDetails`: Stripe's error object (v1 and v2 both
answer ``{"error": {"type", "code", "message", ...}}``), the ``Stripe-Should-Retry``, ``Retry-After``,
``Stripe-Rate-Limited-Reason``, ``Request-Id`` and ``Location`` headers. Messages are redacted: anything
that looks like a key or a token (Stripe echoes a masked key in a 401) never reaches a log.

`Transport` is the seam the tests' fakes (and any faster client) stand in: one call, method/url/headers/
body/timeout in, (status, headers, body) out. `AiohttpTransport` is the production one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlencode

import aiohttp
import orjson

from ingestor import __version__
from ingestor.errors import StripeUnreachable

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

USER_AGENT: Final = f"ingestor/{__version__}"
#: Characters of a body that is not a Stripe error kept in `ErrorDetails.message`.
EXCERPT_LIMIT: Final = 200
_SECRET_PATTERN: Final = re.compile(r"\b(?:sk|rk|ek|pk)_(?:live|test)_[A-Za-z0-9_*]+|Bearer\s+\S+")


class Transport(Protocol):
    """One HTTP request; never follows a redirect.

    Returns (status, headers, body) for any answer. Raises TimeoutError when no answer came within
    `timeout` seconds, OSError or aiohttp.ClientError when the request could not be made.
    """

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float,  # noqa: ASYNC109 - the total time for this one request
    ) -> tuple[int, Mapping[str, str], bytes]: ...


class AiohttpTransport:
    """The production transport: one shared aiohttp session (keep-alive connections), no redirects."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self._http = http
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float,  # noqa: ASYNC109 - aiohttp's total timeout for this one request
    ) -> tuple[int, Mapping[str, str], bytes]:
        total = self._timeouts.get(timeout)
        if total is None:
            total = self._timeouts[timeout] = aiohttp.ClientTimeout(total=timeout)
        async with self._http.request(
            method, url, data=body, headers=headers, timeout=total, allow_redirects=False
        ) as resp:
            return resp.status, resp.headers, await resp.read()


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer, whatever its status."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """What a non-2xx (or unexpected) answer says: Stripe's error object and the headers that qualify it."""

    status: int
    #: Stripe's `error.type` (`invalid_request_error`, `temporary_session_expired`...); "" when absent
    type: str = ""
    #: Stripe's `error.code` (`billing_meter_event_session_expired`...); "" when absent
    code: str = ""
    #: Stripe's `error.message`, or the first characters of a body that is not a Stripe error; redacted
    message: str = ""
    #: `Stripe-Should-Retry`: True, False, or None when absent
    should_retry: bool | None = None
    #: `Retry-After` in seconds, when present and a number (Stripe documents none; proxies send it)
    retry_after: float | None = None
    #: `Stripe-Rate-Limited-Reason` ("" when absent: a 429 without it is not a rate limit)
    rate_limited_reason: str = ""
    request_id: str = ""
    #: where a redirect pointed (never followed), cut to 200 characters
    location: str = ""

    @property
    def code_or_type(self) -> str:
        return self.code or self.type

    @property
    def redirect_note(self) -> str:
        """For a 3xx, ' (a redirect to <location>, not followed)'; else empty. For error messages."""
        return f" (a redirect to {self.location!r}, not followed)" if 300 <= self.status < 400 else ""


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Cut the given secrets and anything that looks like a key or token out of `text`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _SECRET_PATTERN.sub("[redacted]", text)


def excerpt(body: bytes, limit: int = EXCERPT_LIMIT) -> str:
    return body[:limit].decode("utf-8", "replace")


def read_error(status: int, headers: Mapping[str, str], body: bytes, *, secrets: Iterable[str] = ()) -> ErrorDetails:
    """The error an answer carries (pure; any bytes)."""
    error = _error_object(body)
    if error is None:
        kind = code = ""
        message = excerpt(body)
    else:
        kind, code, message = (_text(error.get(name)) for name in ("type", "code", "message"))
    return ErrorDetails(
        status,
        kind,
        code,
        redact(message, secrets),
        should_retry=_flag(headers.get("Stripe-Should-Retry", "")),
        retry_after=_seconds(headers.get("Retry-After", "")),
        rate_limited_reason=headers.get("Stripe-Rate-Limited-Reason", ""),
        request_id=headers.get("Request-Id", ""),
        location=headers.get("Location", "")[:EXCERPT_LIMIT],
    )


def describe_unexpected(status: int, headers: Mapping[str, str], body: bytes) -> str:
    """An answer the endpoint does not give (a redirect, another 2xx, a foreign body), for a log line."""
    if 300 <= status < 400:
        return f"HTTP {status} with a redirect (to {headers.get('Location', '?')[:EXCERPT_LIMIT]!r}), not followed"
    return f"HTTP {status} with body {excerpt(body, 100)!r}"


def _error_object(body: bytes) -> dict[str, object] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, dict) else None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _flag(value: str) -> bool | None:
    lowered = value.lower()
    return True if lowered == "true" else False if lowered == "false" else None


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0.0 else None


class StripeHttp:
    """One Stripe host: its base URL, API version, per-request timeout and (for the API host) secret key.

    `request` raises only `StripeUnreachable`; the caller decides what each status means. A call made
    with a session `token` authenticates with it instead of the key (the meter event stream).
    """

    def __init__(  # noqa: PLR0913 - one host's whole configuration, keywords after the URL
        self,
        transport: Transport,
        base_url: str,
        *,
        stripe_version: str,
        timeout: float,
        api_key: str = "",
        user_agent: str = USER_AGENT,
    ) -> None:
        self._transport = transport
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._key = api_key
        self._headers = {"Stripe-Version": stripe_version, "User-Agent": user_agent}

    def __repr__(self) -> str:
        return f"StripeHttp({self.base_url!r}, timeout={self.timeout:g})"

    async def request(  # noqa: PLR0913 - each keyword is one header or one part of the URL
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
        token: str | None = None,
        idempotency_key: str | None = None,
    ) -> Reply:
        """`method` `path` (and `params`); every answer is a `Reply`, no answer a `StripeUnreachable`."""
        url = self.base_url + path + (f"?{urlencode(params)}" if params else "")
        headers = {**self._headers, "Authorization": f"Bearer {self._key if token is None else token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        try:
            status, reply_headers, reply_body = await self._transport.request(method, url, headers, body, self.timeout)
        except TimeoutError:
            raise StripeUnreachable("timeout", f"{method} {path}: no answer within {self.timeout:g} s") from None
        except (OSError, aiohttp.ClientError) as exc:
            detail = redact(f"{type(exc).__name__}: {exc}", (self._key, token or ""))[:EXCERPT_LIMIT]
            raise StripeUnreachable("connection_error", f"{method} {path}: {detail}") from None
        return Reply(status, reply_headers, reply_body)

    def error(self, reply: Reply) -> ErrorDetails:
        """`read_error` of `reply`, with this host's key redacted too."""
        return read_error(reply.status, reply.headers, reply.body, secrets=(self._key,))
