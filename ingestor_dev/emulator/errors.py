"""Stripe-shaped errors: one exception type carrying everything a response needs.

v2 body: `{"error": {"type", "code", "message"}}`; v1 body: `{"error": {"type", "code", "message",
"param"}}`. Both carry `param` when it helps (the stream names the offending event, e.g.
`events[17].payload.value`, so a client bisecting a batch gets a deterministic answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ApiError(Exception):
    """An error response; raise it anywhere under a handler."""

    status: int
    code: str | None
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def invalid(message: str, *, code: str | None = "parameter_invalid", param: str | None = None) -> ApiError:
    """A plain 400 `invalid_request_error`."""
    return ApiError(400, code, message, param=param)


def missing(param: str) -> ApiError:
    return ApiError(400, "parameter_missing", f"Missing required param: {param}.", param=param)


def not_found(message: str, param: str | None = None) -> ApiError:
    return ApiError(404, "resource_missing", message, param=param)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, None, message)


def session_expired() -> ApiError:
    return ApiError(
        401,
        "billing_meter_event_session_expired",
        "The temporary session token has expired.",
        type="temporary_session_expired",
    )


def rate_limited(reason: str | None, *, code: str = "rate_limit") -> ApiError:
    """A 429; with a `reason` it is a rate limiter's answer, without one (`lock_timeout`) it is not."""
    headers = {"Stripe-Rate-Limited-Reason": reason} if reason else {}
    message = (
        "Too many requests hit the API too quickly."
        if code == "rate_limit"
        else "This object cannot be accessed right now because another API request or Stripe process "
        "is currently accessing it."
    )
    error_type = "rate_limit" if code == "rate_limit" else "invalid_request_error"
    return ApiError(429, code, message, type=error_type, headers=headers)


def server_error(status: int, should_retry: str | None) -> ApiError:
    headers = {"Stripe-Should-Retry": should_retry} if should_retry is not None else {}
    return ApiError(status, None, "An unknown error occurred.", type="api_error", headers=headers)
