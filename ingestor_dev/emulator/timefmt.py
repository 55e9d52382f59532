"""RFC 3339 parsing (cached, for the hot path) and formatting with milliseconds and `Z`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

_CACHE_LIMIT: Final = 65_536
_cache: dict[str, float] = {}


class TimestampError(ValueError):
    """The string is not an RFC 3339 date-time with a time zone."""


def parse_rfc3339(text: str) -> float:
    """Unix seconds for an RFC 3339 date-time such as `2026-11-21T05:19:17.123Z`."""
    cached = _cache.get(text)
    if cached is not None:
        return cached
    value = _parse(text)
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[text] = value
    return value


def cached_lookup() -> dict[str, float]:
    """The cache itself, for callers that look up a whole batch with `map(cache.get, ...)`."""
    return _cache


def _parse(text: str) -> float:
    if len(text) < 20 or text[10] not in "Tt":
        raise TimestampError(text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise TimestampError(text) from exc
    if parsed.tzinfo is None:
        raise TimestampError(text)
    return parsed.timestamp()


def format_rfc3339(unix_seconds: float) -> str:
    """`2024-06-01T12:15:00.000Z` (UTC, milliseconds)."""
    moment = datetime.fromtimestamp(unix_seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
