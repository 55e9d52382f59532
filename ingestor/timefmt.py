"""RFC 3339 in UTC with milliseconds (``2026-11-21T05:19:17.123Z``): the one formatter of the runtime.

Pure. Every place that writes such a time goes through `format_ms`: the decoder (events; its hot path keeps
its own per-second cache on top), dead letters, webhook reports and the JSON logs. The audit's whole-second
query bounds are another format, and the Stripe emulator (ingestor_dev) keeps its own, as Stripe's stand-in.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from typing import Final

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


def format_ms(ms: int) -> str:
    """Unix milliseconds -> RFC 3339 UTC with milliseconds, e.g. 2026-11-21T05:19:17.123Z."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def format_seconds(seconds: float) -> str:
    """Unix seconds -> the same, the milliseconds truncated (never rounded into the next second)."""
    return format_ms(math.floor(seconds * 1000))


def format_datetime(moment: datetime) -> str:
    """An aware datetime -> the same in UTC, the milliseconds truncated (exact: no float on the way)."""
    return format_ms((moment - _EPOCH) // _ONE_MS)
