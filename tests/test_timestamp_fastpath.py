"""The decoder's timestamp fast paths give exactly what the reference (`parse_timestamp` + `format_ms`) gives.

`YYYY-MM-DDTHH:MM:SS.mmmZ` is passed through and `...mmm±hh:mm` formatted from a cached second; unix
seconds are formatted from a cached second. For any string or number, in a poll of its own or among
others (warm caches), the decoder must accept the same values with the same text and reject the rest
with the same reason and message as the reference reading of the contract.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor import events as events_module
from ingestor.catalog import MeterCatalog
from ingestor.events import FUTURE_WINDOW_S, PAST_WINDOW_S, Decoder, format_ms, parse_timestamp
from tests.corpus import DEFAULT_MAX_RECORD_BYTES, FakeRecord, event_bytes

#: 2026-01-01T00:00:00Z
NOW = 1_767_225_600.0
NOW_MS = int(NOW * 1000)
PROPS = settings(max_examples=300, deadline=None)


def expected(raw: Any, now: float = NOW) -> tuple[str, str]:
    """The reference reading: ("ok", text) or (reason, message)."""
    if type(raw) is str:
        try:
            seconds = parse_timestamp(raw)
        except (ValueError, OverflowError):
            return "timestamp_invalid", f"timestamp {raw[:64]!r} is not RFC 3339 with a time zone"
        shown = f"timestamp {raw[:64]!r}"
    else:
        seconds, shown = float(raw), f"timestamp {raw!r}"
    if seconds < now - PAST_WINDOW_S:
        return "timestamp_too_far_in_past", f"{shown} is more than 35 days old"
    if seconds > now + FUTURE_WINDOW_S:
        return "timestamp_in_future", f"{shown} is more than 5 minutes ahead"
    return "ok", format_ms(round(seconds * 1000))


def decode_all(dec: Decoder, stamps: list[Any], now: float = NOW) -> list[tuple[str, str]]:
    records = [
        FakeRecord("t", 0, i, NOW_MS, None, event_bytes(identifier=f"id-{i}", timestamp=raw), ())
        for i, raw in enumerate(stamps)
    ]
    events, sources, rejected = dec.decode(records, now)
    out: dict[int, tuple[str, str]] = {}
    for event, record in zip(events, sources, strict=True):
        out[record.offset] = ("ok", event["timestamp"])
    for record, rejection in rejected:
        out[record.offset] = (rejection.reason, rejection.message)
    return [out[i] for i in range(len(stamps))]


def decoder() -> Decoder:
    return Decoder(MeterCatalog(), max_record_bytes=DEFAULT_MAX_RECORD_BYTES)


# -- strategies: mostly the fast paths' forms, near and across every edge ------------------------------

_instants = st.integers(min_value=NOW_MS - (PAST_WINDOW_S + 86400) * 1000, max_value=NOW_MS + 600_000)
_zones = st.sampled_from(["Z", "z", "+00:00", "-00:00", "+05:30", "-04:00", "+23:59", "-23:59", "+24:00", "+5:30"])
_digit_swaps = st.sampled_from(["0", "9", "\u0663", "\uff11", "a", " ", ".", ":", "-", "T", "Z", "+"])


def _text(ms: int, zone: str, tee: str) -> str:
    stamp = datetime.fromtimestamp(ms // 1000, UTC)
    if zone not in {"Z", "z"} and zone[1:3].isdigit() and zone[4:6].isdigit() and len(zone) == 6:
        sign = 1 if zone[0] == "+" else -1
        stamp += sign * timedelta(hours=int(zone[1:3]) % 24, minutes=int(zone[4:6]))
    return stamp.strftime(f"%Y-%m-%d{tee}%H:%M:%S") + f".{ms % 1000:03d}{zone}"


@st.composite
def stamps(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["canonical", "canonical", "mutated", "edge", "number", "fraction"]))
    ms = draw(_instants)
    if kind == "number":
        return draw(st.sampled_from([ms // 1000, ms / 1000, ms // 1000 + 0.5]))
    text = _text(ms, draw(_zones), draw(st.sampled_from(["T", "T", "t"])))
    if kind == "mutated":
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(_digit_swaps) + text[at + 1 :]
    elif kind == "edge":
        field = draw(st.sampled_from([(5, "13"), (8, "32"), (8, "00"), (11, "24"), (14, "60"), (17, "60"), (5, "02")]))
        at, two = field
        text = text[:at] + two + text[at + 2 :]
        if at == 5:
            text = text[:8] + draw(st.sampled_from(["29", "30", "31"])) + text[10:]
    elif kind == "fraction":
        digits = draw(st.sampled_from(["", ".1", ".12", ".1234", ".123456"]))
        text = text[:19] + digits + text[23:]
    return text


@PROPS
@given(st.lists(stamps(), min_size=1, max_size=40))
def test_a_poll_of_timestamps_reads_as_the_reference(raws: list[Any]) -> None:
    assert decode_all(decoder(), raws) == [expected(raw) for raw in raws]


@PROPS
@given(stamps(), st.lists(stamps(), max_size=20))
def test_warm_caches_change_nothing(raw: Any, before: list[Any]) -> None:
    dec = decoder()
    decode_all(dec, before)
    assert decode_all(dec, [raw]) == [expected(raw)]
    assert decode_all(dec, [raw, raw]) == [expected(raw)] * 2


@PROPS
@given(st.integers(min_value=0, max_value=999), st.sampled_from(["Z", "+05:30", "-04:00"]), st.booleans())
def test_the_window_edges_are_the_reference_edges(millis: int, zone: str, past: bool) -> None:
    """Instants exactly on, one millisecond inside and one outside each edge of the window."""
    now = NOW + millis / 1000
    edge_ms = round((now - PAST_WINDOW_S) * 1000) if past else round((now + FUTURE_WINDOW_S) * 1000)
    raws = [_text(edge_ms + d, zone, "T") for d in (-1, 0, 1)] * 2  # the second time, from the warm cache
    assert decode_all(decoder(), raws, now) == [expected(raw, now) for raw in raws]


def test_a_canonical_timestamp_is_passed_through_unchanged() -> None:
    raw = "2025-12-31T23:59:58.007Z"
    assert decode_all(decoder(), [raw, raw]) == [("ok", raw)] * 2


def test_offsets_and_lower_case_are_formatted_as_utc() -> None:
    raws = ["2026-01-01T05:29:58.007+05:30", "2025-12-31t23:59:58.007z", "2025-12-31T19:59:58.007-04:00"]
    assert decode_all(decoder(), raws) == [("ok", "2025-12-31T23:59:58.007Z")] * 3


@pytest.mark.parametrize(
    "raw",
    [
        "2026-02-30T00:00:00.000Z",  # no such day: the second is parsed, and refused
        "2025-12-31T23:59:60.000Z",  # leap second
        "2025-12-31T23:59:59.\u0663\u0663\u0663Z",  # non-ASCII digits in the milliseconds
        "2025-12-31T23:59:59.000+24:00",
        "2025-12-31T23:59:59.000+0530",
    ],
)
def test_invalid_forms_of_the_fast_lengths_are_rejected_as_before(raw: str) -> None:
    assert decode_all(decoder(), [raw]) == [("timestamp_invalid", expected(raw)[1])]


def test_the_second_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "_TS_CACHE_LIMIT", 4)
    dec = decoder()
    raws = [format_ms(NOW_MS - i * 1000 - i) for i in range(10)]
    raws += [_text(NOW_MS - i * 1000, "+05:30", "T") for i in range(10)]
    assert decode_all(dec, raws) == [expected(raw) for raw in raws]
    assert len(dec._second_ms) <= 4
