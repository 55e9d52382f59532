"""One POST per batch to the meter event stream, and what its answer means.

`classify` is pure: (status, headers, body) -> `Answer`. `StreamClient` is the thin I/O shell over
`ingestor.stripe_http` (headers, the timeout, no redirects, the error body, the `Transport` seam).

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
from typing import TYPE_CHECKING

import orjson

from ingestor.errors import StripeUnreachable
from ingestor.stripe_http import describe_unexpected, read_error

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ingestor.stripe_http import StripeHttp

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


def classify(status: int, headers: Mapping[str, str], body: bytes) -> Answer:
    """What a stream answer means for the batch that was sent."""
    if status == 200 and _is_success_body(body):
        return ACCEPTED
    if status < 400:
        return Answer(Outcome.UNEXPECTED, status, "unexpected_answer", describe_unexpected(status, headers, body))
    error = read_error(status, headers, body)
    code, message = error.code_or_type, error.message
    if status == 401:
        return Answer(Outcome.REAUTH, status, code, message)
    if status == 413 or (status == 400 and error.should_retry is not True):
        return Answer(Outcome.REJECTED, status, code, message, bad_index=_bad_index(code, message))
    reason = error.rate_limited_reason if status == 429 else ""
    return Answer(Outcome.RETRY, status, code, message, rate_limit_reason=reason)


def unreachable(exc: StripeUnreachable) -> Answer:
    """No answer at all (a timeout, a connection error): retried."""
    return Answer(Outcome.RETRY, 0, exc.code, str(exc))


class StreamClient:
    """Sends one batch body with a session token and classifies the answer. Never raises for I/O."""

    def __init__(self, http: StripeHttp) -> None:
        self._http = http

    async def send(self, body: bytes, token: str) -> Answer:
        try:
            reply = await self._http.request("POST", STREAM_PATH, body=body, token=token)
        except StripeUnreachable as exc:
            return unreachable(exc)
        return classify(reply.status, reply.headers, reply.body)
