"""Stripe's limits and the emulator's own defaults, named once.

Where Stripe documents a number (FACTS.md) it is used as is; where it does not, the emulator picks
one and says so here.
"""

from __future__ import annotations

from typing import Final

#: Events per stream request (documented).
MAX_EVENTS_PER_REQUEST: Final = 100
#: Length of `event_name` and `identifier` (documented for v1; applied to every endpoint).
MAX_NAME_LENGTH: Final = 100
#: Digits in a value. Not documented by Stripe: 18 digits always fit a signed 64-bit integer, so
#: every accepted value is exact in Stripe's storage and in the emulator's `array("q")` columns.
MAX_VALUE_DIGITS: Final = 18
#: Identifier de-duplication window, and how long an event can still be cancelled (documented).
DEDUP_WINDOW_S: Final = 24 * 3600.0
CANCEL_WINDOW_S: Final = 24 * 3600.0
#: Accepted timestamps: up to 35 calendar days in the past, 5 minutes in the future (documented).
MAX_PAST_S: Final = 35 * 86400.0
MAX_FUTURE_S: Final = 300.0
#: Session token lifetime (documented: 15 minutes).
DEFAULT_SESSION_TTL_S: Final = 15 * 60.0
#: Stream requests per second: live mode (documented) and the sandbox's basic global limit.
LIVE_STREAM_RPS: Final = 10_000
TEST_STREAM_RPS: Final = 25
#: Body cap for one request (the emulator's choice; 100 large events fit comfortably).
MAX_BODY_BYTES: Final = 1024 * 1024
#: Failing identifiers carried by one error report / one webhook (the emulator's choice).
MAX_ERRORS_PER_REPORT: Final = 100
#: How often the background validator drains accepted stream events.
DEFAULT_VALIDATION_INTERVAL_S: Final = 0.1
#: v1 list pagination.
DEFAULT_LIST_LIMIT: Final = 10
MAX_LIST_LIMIT: Final = 100
