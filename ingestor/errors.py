"""Every way an event can fail, in one place.

```
IngestorError
├── Rejection                 the event can never be billed as it is: dead-letter it (not retriable)
│     reason: a stable code from REASONS, message: for humans
└── TransientError            try again later (retriable): 5xx, 429, 409, timeouts, connection errors
      └── SessionExpiredError the session token was refused: rotate it, resend, not a failed attempt
```

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
    """Base of every error the worker raises on purpose."""

    retriable: bool = False


class Rejection(IngestorError):  # noqa: N818 - a rejection is an outcome, not a crash
    """The event can never be billed as it is; it goes to the dead-letter topic."""

    retriable = False

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


class TransientError(IngestorError):
    """Try again later."""

    retriable = True


class SessionExpiredError(TransientError):
    """The stream refused the session token (401 billing_meter_event_session_expired)."""
