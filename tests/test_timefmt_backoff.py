"""The one backoff and the one RFC 3339 formatter give what each former copy gave (behaviour unchanged)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from ingestor import backoff, session, timefmt

MS_2000_TO_2100 = st.integers(min_value=946_684_800_000, max_value=4_102_444_800_000)


@given(MS_2000_TO_2100)
def test_format_ms_is_the_decoders_former_formula(ms: int) -> None:
    seconds, millis = divmod(ms, 1000)
    assert timefmt.format_ms(ms) == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


@given(st.floats(min_value=946_684_800, max_value=4_102_444_800))
def test_format_seconds_is_the_dead_letters_former_formula(seconds: float) -> None:
    former = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}Z"
    assert timefmt.format_seconds(seconds) == former


@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
)
def test_format_datetime_is_the_webhooks_former_formula(naive: datetime, offset_minutes: int) -> None:
    moment = naive.replace(tzinfo=timezone(timedelta(minutes=offset_minutes)))
    utc = moment.astimezone(UTC)
    former = utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    assert timefmt.format_datetime(moment) == former


def test_formats() -> None:
    assert timefmt.format_ms(1_763_702_357_123) == "2025-11-21T05:19:17.123Z"
    assert timefmt.format_seconds(1_763_702_357.5) == "2025-11-21T05:19:17.500Z"
    assert timefmt.format_ms(-1) == "1969-12-31T23:59:59.999Z"


@given(st.integers(min_value=1, max_value=10_000), st.floats(min_value=0, max_value=0.999_999))
def test_session_backoff_is_the_former_formula(failures: int, rand: float) -> None:
    policy = session.Backoff(base=0.5, cap=30.0)
    former = rand * (policy.cap if failures > 64 else min(policy.cap, policy.base * 2.0 ** max(0, failures - 1)))
    assert policy.delay(failures, rand) == former


@given(st.integers(min_value=1, max_value=10_000), st.floats(min_value=0, max_value=0.999_999))
def test_stream_retry_backoff_is_the_former_formula(attempts: int, rand: float) -> None:
    base, cap = 0.5, 30.0
    former = 0 + (min(cap, base * 2 ** min(attempts - 1, 30)) - 0) * rand  # random.uniform(0, ceiling)
    assert backoff.delay(attempts, base, cap, rand) == former


@given(st.integers(min_value=2, max_value=100_000))
def test_reauth_interval_is_the_former_formula(streak: int) -> None:
    former = min(session.REAUTH_MAX_INTERVAL_S, session.REAUTH_FIRST_INTERVAL_S * 2.0 ** min(streak - 2, 64))
    assert session.reauth_interval(streak) == former


def test_ceiling_stays_finite_after_days_of_failures() -> None:
    assert backoff.ceiling(10**9, 1e-30, math.inf) == 1e-30 * 2.0**60
    assert backoff.delay(10**9, 0.5, 30.0, 0.5) == 15.0
