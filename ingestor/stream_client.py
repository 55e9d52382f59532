"""One POST per batch to the meter event stream, and what its answer means.

`classify` is pure: (status, headers, body) -> `Answer`. `StreamClient` is the thin I/O shell; the HTTP
transport is a Protocol so tests can swap it at the boundary.

| answer | outcome |
| --- | --- |
| 2xx | accepted |
| 401 (`billing_meter_event_session_expired` or any other 401) | reauth: rotate the token, resend |
| 400, or any status with `Stripe-Should-Retry: false` | reject: bisect, dead-letter the bad events |
| 409, 429, 5xx, other 4xx with `Stripe-Should-Retry: true`, timeouts, connection errors | retry |
| any other 4xx (403, 404, 413, ...) | retry: a misconfiguration that must not dead-letter events |
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


def _error_fields(body: bytes) -> tuple[str, str]:
    try:
        error = orjson.loads(body).get("error") or {}
        return str(error.get("code") or error.get("type") or ""), str(error.get("message") or "")
    except (orjson.JSONDecodeError, AttributeError):
        return "", body[:200].decode("utf-8", "replace")


def _bad_index(code: str, message: str) -> int | None:
    match = _INDEX.search(message) or _INDEX.search(code)
    return int(match.group(1)) if match else None


def classify(status: int, headers: Mapping[str, str], body: bytes) -> Answer:
    """What a stream answer means for the batch that was sent."""
    if 200 <= status < 300:
        return ACCEPTED
    code, message = _error_fields(body)
    should_retry = headers.get("Stripe-Should-Retry", "").lower()
    if status == 401:
        return Answer(Outcome.REAUTH, status, code, message)
    if should_retry == "false" or (status == 400 and should_retry != "true"):
        return Answer(Outcome.REJECTED, status, code, message, bad_index=_bad_index(code, message))
    reason = headers.get("Stripe-Rate-Limited-Reason", "") if status == 429 else ""
    return Answer(Outcome.RETRY, status, code, message, rate_limit_reason=reason)


class Transport(Protocol):
    """POST bytes, return (status, headers, body). Raises OSError/TimeoutError/aiohttp.ClientError."""

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, Mapping[str, str], bytes]: ...


class AiohttpTransport:
    """The production transport: one shared aiohttp session with keep-alive connections."""

    def __init__(self, http: aiohttp.ClientSession, timeout: float) -> None:
        self._http = http
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        async with self._http.post(url, data=body, headers=headers, timeout=self._timeout) as resp:
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
