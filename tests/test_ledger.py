"""The ledger folds events as Stripe does: de-duplication within 24 hours, cancellations, formulas, windows."""

from __future__ import annotations

from ingestor.catalog import Meter
from ingestor.ledger import Ledger
from ingestor.timefmt import format_ms

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a day boundary
HOUR_MS = 3_600_000
METERS = [
    Meter("calls", formula="sum"),
    Meter("logins", formula="count", needs_value=False),
    Meter("seats", formula="last"),
    Meter("hourly", formula="sum", event_time_window="hour"),
]


def ev(name: str, identifier: str, ms: int, value: int = 1, customer: str = "cus_1") -> dict[str, object]:
    payload = {"stripe_customer_id": customer, "value": str(value)}
    return {"event_name": name, "payload": payload, "identifier": identifier, "timestamp": format_ms(ms)}


def ledger(cancelled: frozenset[str] = frozenset(), hours: int = 48) -> Ledger:
    return Ledger(METERS, T0, T0 + hours * 3600, set(cancelled))


def test_sum_count_and_last():
    book = ledger()
    for i, (ms, value) in enumerate([(T0 * 1000 + 5, 3), (T0 * 1000 + 9, 4), (T0 * 1000 + 1, 8)]):
        for name in ("calls", "logins", "seats"):
            book.add(ev(name, f"{name}-{i}", ms, value), ms)
    assert book.totals() == {("calls", "cus_1"): 15, ("logins", "cus_1"): 3, ("seats", "cus_1"): 4}


def test_last_ties_go_to_the_later_arrival():
    book = ledger()
    book.add(ev("seats", "a", T0 * 1000, 5), 0)
    book.add(ev("seats", "b", T0 * 1000, 6), 1)
    assert book.totals() == {("seats", "cus_1"): 6}


def test_a_duplicate_counts_once_within_24_hours_and_again_after():
    book = ledger()
    at = T0 * 1000
    book.add(ev("calls", "dup", at, 5), at)
    book.add(ev("calls", "dup", at + 1, 5), at + 23 * HOUR_MS)
    assert book.totals() == {("calls", "cus_1"): 5}
    book.add(ev("calls", "dup", at + 2, 5), at + 26 * HOUR_MS)
    assert book.totals() == {("calls", "cus_1"): 10}
    assert book.counts.duplicates == 1


def test_identifiers_older_than_the_horizon_are_forgotten():
    book = ledger(hours=24 * 30)
    for hour in range(60):
        at = T0 * 1000 + hour * HOUR_MS
        book.add(ev("calls", f"id-{hour}", at), at)
    assert len(book._seen) <= 26


def test_cancelled_events_are_left_out_and_their_customer_is_still_listed():
    book = ledger(frozenset({"x", "y"}))
    book.add(ev("calls", "x", T0 * 1000, 5, customer="cus_gone"), 0)
    book.add(ev("calls", "y", T0 * 1000, 5), 0)
    book.add(ev("calls", "z", T0 * 1000, 7), 0)
    assert book.totals() == {("calls", "cus_gone"): 0, ("calls", "cus_1"): 7}
    assert book.counts.cancelled == 2


def test_only_events_within_the_range_count():
    book = ledger(hours=1)
    book.add(ev("calls", "before", T0 * 1000 - 1, 100), 0)
    book.add(ev("calls", "first", T0 * 1000, 1), 0)
    book.add(ev("calls", "last", (T0 + 3600) * 1000 - 1, 2), 0)
    book.add(ev("calls", "after", (T0 + 3600) * 1000, 100), 0)
    assert book.totals() == {("calls", "cus_1"): 3}


def test_an_event_time_window_keeps_the_latest_event_of_each_window():
    book = ledger(hours=3)
    base = T0 * 1000
    for identifier, ms, value in [("a", base + 10, 5), ("b", base + 20, 7), ("c", base + HOUR_MS + 1, 2)]:
        book.add(ev("hourly", identifier, ms, value), ms)
    # an event after the range in the last window suppresses nothing inside it (other window)
    book.add(ev("hourly", "d", base + 3 * HOUR_MS + 5, 50), 0)
    assert book.totals() == {("hourly", "cus_1"): 9}
