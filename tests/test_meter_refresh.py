"""The hold of `meter_unknown` records: only they wait, one refresh per interval, later ones wait for the next."""

from __future__ import annotations

from ingestor.errors import Rejection
from ingestor.meter_refresh import UnknownMeterHold
from ingestor.offsets import Chunk, TopicPartition
from tests.corpus import FakeRecord

CHUNK = Chunk(TopicPartition("t", 0), 0, 3, 3)


def rejected(*reasons: str) -> list[tuple[FakeRecord, Rejection]]:
    return [(FakeRecord(value=b"{}", offset=i), Rejection(reason, "")) for i, reason in enumerate(reasons)]


def test_only_unknown_meters_are_held_and_the_others_returned() -> None:
    hold = UnknownMeterHold(min_interval=10)
    rest = hold.hold(CHUNK, rejected("not_json", "meter_unknown", "meter_inactive"))
    assert [r.reason for _, r in rest] == ["not_json", "meter_inactive"]
    assert len(hold) == 1
    assert hold.waiting.is_set()


def test_nothing_unknown_is_not_held() -> None:
    hold = UnknownMeterHold()
    given = rejected("not_json")
    assert hold.hold(CHUNK, given) is given
    assert len(hold) == 0
    assert not hold.waiting.is_set()


def test_one_refresh_per_interval_and_records_held_during_a_refresh_wait_for_the_next() -> None:
    hold = UnknownMeterHold(min_interval=10)
    assert hold.refresh_in(now=0.0) <= 0  # the first refresh is not delayed
    hold.hold(CHUNK, rejected("meter_unknown"))
    taken = hold.take(now=100.0)
    assert [len(records) for _, records in taken] == [1]
    assert not hold.waiting.is_set()
    hold.hold(CHUNK, rejected("meter_unknown", "meter_unknown"))  # while the refresh runs
    assert hold.waiting.is_set()
    assert hold.refresh_in(now=104.0) == 6.0
    assert hold.refresh_in(now=110.0) <= 0
    assert [len(records) for _, records in hold.take(now=110.0)] == [2]
