"""A cancellation on a source topic: Stripe's meter event adjustment, validated before it is sent (pure).

The contract for producers (README, `ingestor/schemas/meter-event.schema.json`): a record value that is a
JSON object with a `type` key is an adjustment, in exactly the shape of the body of
`POST /v2/billing/meter_event_adjustments`::

    {"event_name": "api_requests", "type": "cancel", "cancel": {"identifier": "req_8f2c1"}}

`type` must be `"cancel"` (the only adjustment Stripe has: `adjustment_type_invalid`), `event_name` a
string of 1 to 100 characters (`event_name_missing`, `event_name_invalid`), `cancel` an object holding
only `identifier`, a string of 1 to 100 characters (`cancel_invalid`); no other top-level field
(`unknown_field`). What Stripe decides (the event exists, was received within 24 hours, is not cancelled
yet) is left to Stripe: its refusal is dead-lettered as `cancel_rejected` with Stripe's code.

The `Idempotency-Key` of the request is derived from the record (topic, partition, offset and value), so
every redelivery of one record (crash, rebalance) sends the same key and Stripe answers a retry after a
timeout as it answered the first try; a record replayed from the dead-letter topic is a new record and
gets a new key (so a cancellation refused because its event had not arrived yet can be replayed).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson

from ingestor.errors import Rejection

if TYPE_CHECKING:
    from ingestor.events import Record

MAX_CHARS: Final = 100
FIELDS: Final = frozenset({"event_name", "type", "cancel"})
IDEMPOTENCY_PREFIX: Final = "ingestor-cancel-"


@dataclass(frozen=True, slots=True)
class Cancellation:
    """One valid cancellation and the record it came from."""

    record: Record
    event_name: str
    identifier: str

    def body(self) -> bytes:
        """The request body, in Stripe's shape."""
        cancel = {"identifier": self.identifier}
        return orjson.dumps({"event_name": self.event_name, "type": "cancel", "cancel": cancel})

    def idempotency_key(self) -> str:
        return idempotency_key(self.record)


def idempotency_key(record: Record) -> str:
    """Stable across redeliveries of one record; different for any other record (a replay included)."""
    digest = hashlib.sha256()
    digest.update(f"{record.topic}\0{record.partition}\0{record.offset}\0".encode())
    digest.update(record.value or b"")
    return IDEMPOTENCY_PREFIX + digest.hexdigest()[:48]


def is_adjustment(document: dict[str, Any]) -> bool:
    """Whether a decoded record value is an adjustment rather than an event."""
    return "type" in document


def parse(record: Record, document: dict[str, Any]) -> Cancellation:
    """A cancellation from a decoded record value that `is_adjustment`, or a Rejection saying why not."""
    kind = document.get("type")
    if kind != "cancel":
        raise Rejection("adjustment_type_invalid", f"type is {str(kind)[:40]!r}; the only adjustment is 'cancel'")
    extra = sorted(set(document) - FIELDS)
    if extra:
        shown = ", ".join(map(repr, extra))[:200]
        raise Rejection("unknown_field", f"unexpected field(s) {shown} in a cancellation")
    name = document.get("event_name")
    if name is None:
        raise Rejection("event_name_missing", "event_name is required")
    if type(name) is not str or not 0 < len(name) <= MAX_CHARS:
        raise Rejection("event_name_invalid", "event_name must be a string of 1 to 100 characters")
    cancel = document.get("cancel")
    identifier = cancel.get("identifier") if type(cancel) is dict and cancel.keys() == {"identifier"} else None
    if type(identifier) is not str or not 0 < len(identifier) <= MAX_CHARS:
        raise Rejection("cancel_invalid", 'cancel must be {"identifier": a string of 1 to 100 characters}')
    return Cancellation(record, name, identifier)
