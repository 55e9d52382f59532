"""Every error the runtime raises on purpose, in one tree, and the dead-letter reason codes.

```
IngestorError                     base; `retriable`: whether trying again later can help
├── Rejection                     an event can never be billed as it is: dead-lettered (reason in REASONS)
├── StripeUnreachable             a Stripe request got no answer (timeout, connection error): retried
├── SessionError                  creating a meter event session failed (`retriable` per instance)
│   ├── SessionAuthError          401/403 on the secret key: fatal at start (exit 2), later retried, alerted
│   └── SessionUnavailable        429, 408, 409, 5xx, no answer, an unexpected answer: retried
├── CatalogError                  the meter catalog cannot be read: 401/403 fatal at start (exit 2), else
│                                 retried at start and the last catalog kept on refresh; INGESTOR_METERS
│                                 invalid: fatal at start (a SettingsError)
├── NoShareError                  the request budget was asked for a slot it has no share for (a bug)
├── WebhookError                  an error-report webhook refused with a 400 (Stripe redelivers it)
│   ├── SignatureError            the Stripe-Signature header is missing, malformed or wrong
│   └── WebhookPayloadError       the body is not a well-formed error report
├── ReplayError                   `ingestor replay` cannot go on: exit 2
└── AuditError                    `ingestor audit` cannot be made: exit 2
```

Outside this tree, on purpose: `ingestor.settings.SettingsError` (a ValueError; a setting found wrong, at
load or at start: exit 2) and its `ingestor.offset_reset.OffsetResetRefusedError` stay with the settings.
`ingestor.stream_transport`'s `ServerDisconnectedError` and `BadHttpAnswerError` are `ConnectionError`s (OSError):
the `stripe_http.Transport` seam raises OSError or TimeoutError, which `StripeHttp` turns into `StripeUnreachable`.
What a *Stripe answer* means for a batch is not an exception: `stream_client.Answer` says accepted, retry,
reauth (the session token was refused: invalidate, resend), rejected (split, dead-letter) or unexpected.

`REASONS` is the public, documented list of dead-letter reason codes (the `ingestor.reason` header).
Codes are never renamed; new ones may be added.
"""

from __future__ import annotations

from typing import Final

#: reason code -> what it means (the README's table is generated from this).
REASONS: Final[dict[str, str]] = {
    # decoding the Kafka record
    "tombstone": "The record value is null (a tombstone).",
    "record_too_large": "The record value is larger than INGESTOR_MAX_RECORD_BYTES.",
    "not_utf8": "The record value is not UTF-8.",
    "not_json": "The record value is not JSON.",
    "not_object": "The record value is JSON but not an object.",
    "unknown_field": "The event has a top-level field other than event_name, payload, identifier, timestamp "
    "(a cancellation: other than event_name, type, cancel).",
    # the event's fields
    "event_name_missing": "event_name is absent.",
    "event_name_invalid": "event_name is not a string of 1 to 100 characters.",
    "identifier_invalid": "identifier is not a string of 1 to 100 characters.",
    "payload_missing": "payload is absent.",
    "payload_not_object": "payload is not an object.",
    "payload_value_not_string": "A payload value is neither a string nor a whole number.",
    "customer_missing": "The payload lacks the meter's customer key (stripe_customer_id by default).",
    "value_missing": "The payload lacks the meter's value key (value by default).",
    "value_invalid": "The value is not a positive whole number written in ASCII digits.",
    "value_too_many_digits": "The value has more digits than Stripe accepts.",
    "timestamp_invalid": "timestamp is neither an RFC 3339 string nor unix seconds.",
    "timestamp_too_far_in_past": "timestamp is more than 35 days in the past.",
    "timestamp_in_future": "timestamp is more than 5 minutes in the future.",
    # cancellations (records with a `type`: Stripe's meter event adjustment)
    "adjustment_type_invalid": 'type is present but is not "cancel" (the only adjustment Stripe has).',
    "cancel_invalid": "cancel is not an object holding only identifier, a string of 1 to 100 characters.",
    # the meter catalog
    "meter_unknown": "No meter has this event_name (with a known meter catalog).",
    "meter_inactive": "The event_name's meter is deactivated.",
    # Stripe
    "stripe_rejected": "Stripe refused the event (a 400 isolated to this event); see ingestor.stripe_code.",
    "cancel_rejected": "Stripe refused the cancellation (e.g. invalid_cancel_configuration: no such event received "
    "within 24 hours, or already cancelled); see ingestor.stripe_code.",
    "retries_exhausted": "Transient failures outlasted INGESTOR_RETRY_DEADLINE_S.",
    "stripe_async_error": "Stripe accepted the event, then reported it failed validation (webhook error report).",
}


class IngestorError(Exception):
    """Base of every error the runtime raises on purpose; nothing raises it directly."""

    retriable: bool = False


class Rejection(IngestorError):  # noqa: N818 - a rejection is an outcome, not a crash
    """The event can never be billed as it is: dead-lettered with `reason`, never retried."""

    retriable = False

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


class StripeUnreachable(IngestorError):  # noqa: N818 - reads as a state, like httpx's names
    """A Stripe request got no answer: retried by every caller. `code`: ``timeout`` or ``connection_error``.

    The stream and adjustments turn it into a `retry` answer, sessions into a `SessionUnavailable`, the
    catalog into a `CatalogError`. Its message never holds a key or a token.
    """

    retriable = True

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SessionError(IngestorError):
    """Creating a meter event session failed. ``code``: Stripe's error code or our own short code.

    Retried by the session rotator with backoff whatever `retriable` says; `retriable` tells a caller
    of `SessionManager.token` whether waiting can help. A malformed 200 is one (retriable); another 4xx
    is one, not retriable.
    """

    retriable: bool = False

    def __init__(
        self, message: str, *, code: str | None = None, status: int | None = None, retriable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        if retriable is not None:
            self.retriable = retriable


class SessionAuthError(SessionError):
    """401/403: the secret key is wrong, revoked or lacks permission.

    Fatal at start (the worker exits 2 naming STRIPE_API_KEY); once running, retried with backoff and alerted.
    """

    retriable = False


class SessionUnavailable(SessionError):  # noqa: N818 - reads as a state, like httpx's names
    """429, 408, 409, 5xx, a redirect or another 2xx, a timeout or a connection error: retried."""

    retriable = True


class CatalogError(IngestorError, ValueError):
    """The meter catalog could not be read or parsed; `status`: Stripe's HTTP status, when it answered one.

    From Stripe at start: a 401/403 is fatal (exit 2), anything else retried until it loads; on a refresh
    the last catalog is kept. From INGESTOR_METERS: fatal at start (settings turn it into a SettingsError).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NoShareError(IngestorError):
    """`RequestBudget.reserve` was called while this replica owns no partitions (rate 0): a bug, not retried."""


class WebhookError(IngestorError):
    """A webhook delivery refused with a 400 (Stripe retries it, but it will fail the same way)."""


class SignatureError(WebhookError):
    """The `Stripe-Signature` header is missing, malformed, wrong or outside the tolerance."""


class WebhookPayloadError(WebhookError):
    """The body is not JSON, or an error report lacks a field it must have."""


class ReplayError(IngestorError):
    """`ingestor replay` cannot go on (exit 2); the message says why, for the command line."""


class AuditError(IngestorError):
    """`ingestor audit` cannot be made (exit 2); the message names the setting to look at."""
