"""The dead-letter record format: header names shared by the writer, replay and the documentation.

A dead-letter record carries the original record's key, value and headers byte for byte, followed by
these headers (UTF-8 values). None of them ever holds a secret or a session token.
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "ingestor."

REASON: Final = "ingestor.reason"
MESSAGE: Final = "ingestor.message"
SOURCE_TOPIC: Final = "ingestor.source.topic"
SOURCE_PARTITION: Final = "ingestor.source.partition"
SOURCE_OFFSET: Final = "ingestor.source.offset"
SOURCE_TIMESTAMP: Final = "ingestor.source.timestamp"
IDENTIFIER: Final = "ingestor.identifier"
STRIPE_CODE: Final = "ingestor.stripe_code"
ATTEMPTS: Final = "ingestor.attempts"
FIRST_FAILURE_AT: Final = "ingestor.first_failure_at"
LAST_FAILURE_AT: Final = "ingestor.last_failure_at"
VERSION: Final = "ingestor.version"
NULL_VALUE: Final = "ingestor.null_value"
ORIGINAL_OMITTED: Final = "ingestor.original_omitted"
ORIGINAL_BYTES: Final = "ingestor.original_bytes"

#: header -> meaning, for the README.
HEADERS: Final[dict[str, str]] = {
    REASON: "Reason code (see the reason table).",
    MESSAGE: "Human-readable explanation.",
    SOURCE_TOPIC: "Topic of the original record.",
    SOURCE_PARTITION: "Partition of the original record (decimal).",
    SOURCE_OFFSET: "Offset of the original record (decimal).",
    SOURCE_TIMESTAMP: "Timestamp of the original record, unix milliseconds (decimal).",
    IDENTIFIER: "The meter event identifier used or derived, when known.",
    STRIPE_CODE: "Stripe's error code, when Stripe rejected the event.",
    ATTEMPTS: "Delivery attempts made before dead-lettering (0: rejected before sending).",
    FIRST_FAILURE_AT: "First failure, RFC 3339 UTC.",
    LAST_FAILURE_AT: "Last failure, RFC 3339 UTC.",
    VERSION: "Version of ingestor that wrote the record.",
    NULL_VALUE: "true when the original value was null and the record had no key (written with an empty value).",
    ORIGINAL_OMITTED: "true when the original record did not fit the dead-letter topic's max.message.bytes: its "
    "value, headers and (if over 1 KiB) key are omitted; the source headers locate it.",
    ORIGINAL_BYTES: "Size of the omitted original (key, value and headers), in bytes.",
}


def strip_own_headers(headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The original record's headers: everything not written by ingestor."""
    return [(k, v) for k, v in headers if not k.startswith(PREFIX)]
