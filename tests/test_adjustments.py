"""Cancellations: the decoder's hook, the poll split around them, the order they are sent in, their answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from ingestor.adjustments import Adjuster, AdjustmentClient, Pacer, RetryPolicy, split_poll
from ingestor.cancellation import Cancellation, idempotency_key
from ingestor.catalog import MeterCatalog
from ingestor.events import Decoder
from ingestor.metrics import Metrics
from ingestor.offsets import OffsetTracker, TopicPartition
from ingestor.stripe_http import StripeHttp
from tests.corpus import FakeRecord, event_bytes
from tests.fakes import STRIPE_VERSION, FakeClock, settle

NOW = 1_767_225_600.0
TP = TopicPartition("usage", 0)


def cancel_bytes(identifier: Any = "evt-1", **fields: Any) -> bytes:
    body: dict[str, Any] = {"event_name": "api_requests", "type": "cancel", "cancel": {"identifier": identifier}}
    body.update(fields)
    return orjson.dumps({k: v for k, v in body.items() if v is not None})


def records(values: list[bytes], start: int = 0) -> list[FakeRecord]:
    return [FakeRecord("usage", 0, start + i, int(NOW * 1000), None, v, ()) for i, v in enumerate(values)]


def decode(values: list[bytes], *, with_cancellations: bool = True):
    cancels: list[Cancellation] = []
    decoder = Decoder(MeterCatalog(), max_record_bytes=65536)
    polled = records(values)
    decoded = decoder.decode(polled, NOW, cancels if with_cancellations else None)
    return polled, decoded, cancels


def test_a_cancellation_in_stripes_shape_is_taken_with_its_record():
    _, (events, _, rejected), cancels = decode([event_bytes(), cancel_bytes("evt-9"), event_bytes()])
    assert (len(events), rejected) == (2, [])
    assert [(c.record.offset, c.event_name, c.identifier) for c in cancels] == [(1, "api_requests", "evt-9")]
    assert orjson.loads(cancels[0].body()) == {
        "event_name": "api_requests",
        "type": "cancel",
        "cancel": {"identifier": "evt-9"},
    }


def test_without_a_cancellation_list_the_decoder_rejects_the_shape_as_before():
    _, (events, _, rejected), _ = decode([cancel_bytes()], with_cancellations=False)
    assert events == []
    assert [r.reason for _, r in rejected] == ["unknown_field"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (cancel_bytes(type="refund"), "adjustment_type_invalid"),
        (orjson.dumps({"event_name": "api_requests", "cancel": {"identifier": "x"}}), "unknown_field"),  # no type
        (orjson.dumps({"type": "cancel", "cancel": {"identifier": "x"}}), "event_name_missing"),
        (cancel_bytes(event_name=""), "event_name_invalid"),
        (cancel_bytes(""), "cancel_invalid"),
        (cancel_bytes("x" * 101), "cancel_invalid"),
        (cancel_bytes(7), "cancel_invalid"),
        (cancel_bytes(cancel="evt-1"), "cancel_invalid"),
        (cancel_bytes(cancel={"identifier": "a", "extra": 1}), "cancel_invalid"),
        (cancel_bytes(payload={"stripe_customer_id": "c", "value": "1"}), "unknown_field"),
    ],
)
def test_a_bad_cancellation_is_rejected_with_its_reason(value, reason):
    _, (events, _, rejected), cancels = decode([value])
    assert (events, cancels) == ([], [])
    assert [r.reason for _, r in rejected] == [reason]


def test_the_idempotency_key_is_the_records_own():
    one = FakeRecord("usage", 3, 41, 0, None, cancel_bytes(), ())
    again = FakeRecord("usage", 3, 41, 999, b"k", cancel_bytes(), ())  # a redelivery of the same record
    replayed = FakeRecord("usage", 3, 90, 0, None, cancel_bytes(), ())  # the same cancellation, republished
    assert idempotency_key(one) == idempotency_key(again)
    assert idempotency_key(one) != idempotency_key(replayed)
    assert len(idempotency_key(one)) <= 255  # Stripe's limit


def test_a_poll_without_cancellations_is_one_segment():
    polled, decoded, cancels = decode([event_bytes(), b"nope", event_bytes()])
    [segment] = split_poll(polled, *decoded, cancels)
    assert (segment.start, segment.end, segment.count) == (0, 3, 3)


def test_each_cancellation_gets_a_segment_of_its_own_between_its_neighbours():
    values = [event_bytes(), b"bad", cancel_bytes("a"), cancel_bytes("b"), event_bytes(), event_bytes(), cancel_bytes()]
    polled, decoded, cancels = decode(values)
    segments = split_poll(polled, *decoded, cancels)
    shape = [(s.start, s.end, len(s.events), len(s.rejected), s.cancellation is not None) for s in segments]
    assert shape == [
        (0, 2, 1, 1, False),
        (2, 3, 0, 0, True),
        (3, 4, 0, 0, True),
        (4, 6, 2, 0, False),
        (6, 7, 0, 0, True),
    ]
    assert sum(s.count for s in segments) == len(values)


# --- the adjuster ----------------------------------------------------------------------------------------


@dataclass
class Answering:
    """A transport that answers from a list of (status, body) and records what was sent."""

    answers: list[tuple[int, dict[str, Any]]]
    sent: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)

    async def request(
        self, method: str, url: str, headers: Any, body: bytes | None, timeout: float
    ) -> tuple[int, dict[str, str], bytes]:
        assert (method, timeout) == ("POST", 5.0)
        assert body is not None
        self.sent.append((url, orjson.loads(body), dict(headers)))
        status, answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return status, {}, orjson.dumps(answer)


@dataclass
class Letters:
    tracker: OffsetTracker
    letters: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)

    def submit(self, chunk, record, rejection, **extra: Any) -> None:
        self.letters.append((record.offset, rejection.reason, extra))
        self.tracker.complete(chunk, 1)


def make_adjuster(transport: Answering, clock: FakeClock, deadline: float = 0.0):
    tracker = OffsetTracker()
    tracker.assign(TP)
    letters = Letters(tracker)
    adjuster = Adjuster(
        client=AdjustmentClient(
            StripeHttp(transport, "http://stripe.test", stripe_version=STRIPE_VERSION, timeout=5.0, api_key="sk_test_x")
        ),
        tracker=tracker,
        dead_letters=letters,  # type: ignore[arg-type]
        metrics=Metrics(),
        clock=clock,
        pacer=Pacer(0, clock),
        retry=RetryPolicy(0.5, 5.0, deadline),
    )
    return adjuster, tracker, letters


def ingest(tracker: OffsetTracker, adjuster: Adjuster, values: list[bytes]):
    polled, decoded, cancels = decode(values)
    chunks = []
    for part in split_poll(polled, *decoded, cancels):
        chunk = tracker.open(TP, part.start, part.end, part.count)
        chunks.append(chunk)
        if part.cancellation is not None:
            adjuster.submit(chunk, part.cancellation)
    return chunks


async def test_a_cancellation_waits_until_every_earlier_record_of_its_partition_is_done():
    transport = Answering([(200, {"object": "v2.billing.meter_event_adjustment"})])
    clock = FakeClock()
    adjuster, tracker, _ = make_adjuster(transport, clock)
    before, cancel, after = ingest(tracker, adjuster, [event_bytes(), cancel_bytes("evt-0"), event_bytes()])
    task = asyncio.create_task(adjuster.run())
    try:
        await asyncio.sleep(0.05)
        tracker.complete(after, 1)  # a later record finishing first changes nothing
        await asyncio.sleep(0.05)
        assert transport.sent == []
        assert adjuster.pending == 1
        tracker.complete(before, 1)
        for _ in range(100):
            if transport.sent and adjuster.pending == 0:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    [(url, body, headers)] = transport.sent
    assert url == "http://stripe.test/v2/billing/meter_event_adjustments"
    assert body == {"event_name": "api_requests", "type": "cancel", "cancel": {"identifier": "evt-0"}}
    assert headers["Authorization"] == "Bearer sk_test_x"
    assert headers["Content-Type"] == "application/json"
    assert headers["Stripe-Version"] == "2026-06-24.dahlia"
    sent_record = FakeRecord("usage", 0, 1, int(NOW * 1000), None, cancel_bytes("evt-0"), ())
    assert headers["Idempotency-Key"] == idempotency_key(sent_record)
    assert cancel.pending == 0
    assert tracker.done_up_to(TP) == 3


async def drive(adjuster: Adjuster, clock: FakeClock, done, rounds: int = 200) -> None:
    task = asyncio.create_task(adjuster.run())
    try:
        for _ in range(rounds):
            await asyncio.sleep(0.011)
            await clock.advance(10)
            if done():
                break
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await settle()


async def test_a_cancellation_stripe_refuses_is_dead_lettered_with_stripes_code():
    refusal = {"error": {"type": "invalid_request_error", "code": "invalid_cancel_configuration", "message": "no"}}
    transport = Answering([(400, refusal)])
    clock = FakeClock()
    adjuster, tracker, letters = make_adjuster(transport, clock)
    [chunk] = ingest(tracker, adjuster, [cancel_bytes("gone")])
    await drive(adjuster, clock, lambda: bool(letters.letters))
    assert letters.letters == [
        (
            0,
            "cancel_rejected",
            {
                "attempts": 1,
                "stripe_code": "invalid_cancel_configuration",
                "identifier": "gone",
                "first_failure": letters.letters[0][2]["first_failure"],
                "last_failure": letters.letters[0][2]["last_failure"],
            },
        )
    ]
    assert chunk.pending == 0


@pytest.mark.parametrize("status", [401, 409, 429, 500, 503])
async def test_transient_answers_are_retried_with_the_same_idempotency_key(status):
    transport = Answering([(status, {"error": {"type": "api_error"}})] * 3 + [(200, {})])
    clock = FakeClock()
    adjuster, tracker, letters = make_adjuster(transport, clock)
    [chunk] = ingest(tracker, adjuster, [cancel_bytes()])
    await drive(adjuster, clock, lambda: chunk.pending == 0)
    assert chunk.pending == 0
    assert letters.letters == []
    keys = {headers["Idempotency-Key"] for _, _, headers in transport.sent}
    assert len(transport.sent) == 4
    assert len(keys) == 1


async def test_a_deadline_dead_letters_a_cancellation_that_keeps_failing():
    transport = Answering([(503, {"error": {"type": "api_error"}})])
    clock = FakeClock()
    adjuster, tracker, letters = make_adjuster(transport, clock, deadline=60)
    ingest(tracker, adjuster, [cancel_bytes()])
    await drive(adjuster, clock, lambda: bool(letters.letters))
    assert [(offset, reason) for offset, reason, _ in letters.letters] == [(0, "retries_exhausted")]


def test_the_pacer_spaces_calls_evenly():
    pacer = Pacer(4, FakeClock())
    assert [pacer.reserve(10.0) for _ in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert pacer.reserve(20.0) == 0.0
    assert Pacer(0, FakeClock()).reserve(1.0) == Pacer(0, FakeClock()).reserve(1.0) == 0.0
