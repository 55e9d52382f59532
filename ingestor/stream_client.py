"""One POST per batch to the meter event stream, and what its answer means.

`classify` is pure: (status, headers, body) -> `Answer`. `StreamClient` is the thin I/O shell; the HTTP
transport is a Protocol so tests can swap it at the boundary. Redirects are never followed.

| answer | outcome |
| --- | --- |
| 200 with body `{}`: Stripe's documented success, and the only one | accepted |
| 401 (`billing_meter_event_session_expired` or any other) | reauth: a new token (never raises), resend |
| 400 (unless `Stripe-Should-Retry: true`); 413 (payload too large) | reject: split the batch (*) |
| 400 with `Stripe-Should-Retry: true`; 409, 429, 5xx, 403, 404, any other 4xx (**) | retry |
| timeouts, connection errors | retry |
| 3xx (never followed), any other 2xx, a 200 whose body is not `{}` | unexpected: retried, never accepted |

(*) the valid events are delivered and the bad ones dead-lettered; a single event answered 413 is one.
(**) whatever `Stripe-Should-Retry` says: a `false` on these is not about the events' content.

A 403 or 404 means a misconfiguration (key, permissions, base URL), an `unexpected` answer something
standing in front of Stripe: dead-lettering good events for either would be worse than stalling and
alerting (ingestor_requests_total by outcome and status feeds the alerts).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp
import orjson

if TYPE_CHECKING:
    from collections.abc import Mapping

STREAM_PATH = "/v2/billing/meter_event_stream"
_INDEX = re.compile(r"events\[(\d+)\]")


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    RETRY = "retry"
    REAUTH = "reauth"
    REJECTED = "rejected"
    #: not an answer Stripe documents for the stream (a redirect, another 2xx, a 200 with another body)
    UNEXPECTED = "unexpected"


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: Outcome
    status: int
    code: str = ""
    message: str = ""
    #: `Stripe-Rate-Limited-Reason` of a 429 ("" when absent: not a rate limit, e.g. lock_timeout)
    rate_limit_reason: str = ""
    #: the index of the offending event when Stripe's message names one (`events[17]...`)
    bad_index: int | None = None


ACCEPTED = Answer(Outcome.ACCEPTED, 200)
_SUCCESS_BODY = b"{}"


def _error_fields(body: bytes) -> tuple[str, str]:
    try:
        error = orjson.loads(body).get("error") or {}
        return str(error.get("code") or error.get("type") or ""), str(error.get("message") or "")
    except (orjson.JSONDecodeError, AttributeError):
        return "", body[:200].decode("utf-8", "replace")


def _bad_index(code: str, message: str) -> int | None:
    match = _INDEX.search(message) or _INDEX.search(code)
    return int(match.group(1)) if match else None


def _is_success_body(body: bytes) -> bool:
    if body == _SUCCESS_BODY:
        return True
    try:
        return bool(orjson.loads(body) == {})
    except orjson.JSONDecodeError:
        return False


def _unexpected(status: int, headers: Mapping[str, str], body: bytes) -> Answer:
    if 300 <= status < 400:
        detail = f"a redirect (to {headers.get('Location', '?')[:200]!r}), not followed"
    else:
        detail = f"body {body[:100].decode('utf-8', 'replace')!r}"
    return Answer(Outcome.UNEXPECTED, status, "unexpected_answer", f"HTTP {status} with {detail}")


def classify(status: int, headers: Mapping[str, str], body: bytes) -> Answer:
    """What a stream answer means for the batch that was sent."""
    if status == 200 and _is_success_body(body):
        return ACCEPTED
    if status < 400:
        return _unexpected(status, headers, body)
    code, message = _error_fields(body)
    if status == 401:
        return Answer(Outcome.REAUTH, status, code, message)
    should_retry = headers.get("Stripe-Should-Retry", "").lower()
    if status == 413 or (status == 400 and should_retry != "true"):
        return Answer(Outcome.REJECTED, status, code, message, bad_index=_bad_index(code, message))
    reason = headers.get("Stripe-Rate-Limited-Reason", "") if status == 429 else ""
    return Answer(Outcome.RETRY, status, code, message, rate_limit_reason=reason)


class Transport(Protocol):
    """POST bytes, return (status, headers, body). Raises OSError/TimeoutError/aiohttp.ClientError."""

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, Mapping[str, str], bytes]: ...


class AiohttpTransport:
    """The production transport: one shared aiohttp session with keep-alive connections.

    Redirects are not followed: aiohttp would turn the POST into a GET, and whatever answered it
    would be taken for Stripe's verdict on the batch.
    """

    def __init__(self, http: aiohttp.ClientSession, timeout: float) -> None:
        self._http = http
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        async with self._http.post(
            url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
        ) as resp:
            return resp.status, resp.headers, await resp.read()


class StreamClient:
    """Sends one batch body with a session token and classifies the answer. Never raises for I/O."""

    def __init__(self, transport: Transport, meter_events_base: str, stripe_version: str) -> None:
        self._transport = transport
        self._url = meter_events_base + STREAM_PATH
        self._version = stripe_version

    async def send(self, body: bytes, token: str) -> Answer:
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Stripe-Version": self._version,
        }
        try:
            status, resp_headers, resp_body = await self._transport.post(self._url, body, headers)
        except TimeoutError:
            return Answer(Outcome.RETRY, 0, "timeout", "the request timed out")
        except (aiohttp.ClientError, OSError) as exc:
            return Answer(Outcome.RETRY, 0, "connection_error", type(exc).__name__)
        return classify(status, resp_headers, resp_body)
