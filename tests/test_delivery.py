"""Delivery with fakes at the boundaries: the stream client, sessions, budget and dead-letter writer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from ingestor.batching import Batch
from ingestor.delivery import Delivery
from ingestor.metrics import Metrics
from ingestor.offsets import OffsetTracker, TopicPartition
from ingestor.session import SessionGrant, SessionManager, SessionUnavailable
from ingestor.stream_client import Answer, Outcome, classify
from tests.corpus import FakeRecord
from tests.fakes import FakeClock

TP = TopicPartition("usage", 0)


class FakeClient:
    """Answers from a script, or by a rule over the events of each body."""

    def __init__(self, rule):
        self.rule = rule
        self.bodies: list[list[dict[str, Any]]] = []
        self.answers: list[Answer] = []

    async def send(self, body: bytes, token: str) -> Answer:
        events = orjson.loads(body)["events"]
        self.bodies.append(events)
        self.answers.append(self.rule(events, token, len(self.bodies)))
        return self.answers[-1]


@dataclass
class FakeSessions:
    tokens: list[str] = field(default_factory=lambda: ["tok_1"])
    invalidated: list[str] = field(default_factory=list)

    async def token(self) -> str:
        return self.tokens[-1]

    async def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        self.tokens.append(f"tok_{len(self.tokens) + 1}")


class FreeBudget:
    limited = 0

    async def acquire(self) -> None:
        return None

    def on_rate_limited(self) -> bool:
        self.limited += 1
        return True


@dataclass
class FakeDeadLetters:
    tracker: OffsetTracker
    letters: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)

    def submit(self, chunk, record, rejection, **extra: Any) -> None:
        self.letters.append((record.offset, rejection.reason, extra))
        self.tracker.complete(chunk, 1)  # acked at once


def make(rule, n: int = 100, **options: Any):
    tracker = OffsetTracker()
    tracker.assign(TP)
    chunk = tracker.open(TP, 0, n, n)
    records = [FakeRecord("usage", 0, i, 1_700_000_000_000, None, b"{}", ()) for i in range(n)]
    events = [{"event_name": "e", "payload": {}, "identifier": f"id-{i}"} for i in range(n)]
    batch = Batch(events, records, [(chunk, n)], n * 10)
    client, sessions, dead = FakeClient(rule), FakeSessions(), FakeDeadLetters(tracker)
    delivery = Delivery(
        client=client,  # type: ignore[arg-type]
        sessions=sessions,
        budget=FreeBudget(),  # type: ignore[arg-type]
        dead_letters=dead,  # type: ignore[arg-type]
        tracker=tracker,
        metrics=Metrics(),
        clock=FakeClockNoSleep(),
        retry_base=0.01,
        retry_max=0.05,
        **options,
    )
    return delivery, batch, client, sessions, dead, tracker


class FakeClockNoSleep(FakeClock):
    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def bad_ids(bad: set[int], *, name_index: bool):
    def rule(events, token, _):
        for i, event in enumerate(events):
            if int(event["identifier"].split("-")[1]) in bad:
                message = f"events[{i}].payload.value is invalid" if name_index else "invalid request"
                return Answer(Outcome.REJECTED, 400, "invalid_request", message, bad_index=i if name_index else None)
        return Answer(Outcome.ACCEPTED, 200)

    return rule


@pytest.mark.parametrize("name_index", [True, False])
async def test_a_rejected_batch_is_split_until_only_the_bad_events_are_dead_lettered(name_index):
    bad = {3, 57, 58}
    delivery, batch, client, _, dead, tracker = make(bad_ids(bad, name_index=name_index))
    await delivery.deliver(batch)
    assert sorted(offset for offset, _, _ in dead.letters) == sorted(bad)
    assert {reason for _, reason, _ in dead.letters} == {"stripe_rejected"}
    delivered = {
        e["identifier"]
        for body in client.bodies
        for e in body
        if not any(int(x["identifier"].split("-")[1]) in bad for x in body)
    }
    assert delivered == {f"id-{i}" for i in range(100)} - {f"id-{i}" for i in bad}
    assert tracker.committable() == {TP: 100}
    # bounded: at most 2·k·log2(n) + 1 requests
    assert len(client.bodies) <= 2 * len(bad) * 7 + 1


async def test_transient_failures_are_retried_with_the_same_body():
    answers = [Answer(Outcome.RETRY, 503), Answer(Outcome.RETRY, 429, rate_limit_reason="global-rate")]
    delivery, batch, client, _, dead, tracker = make(
        lambda events, token, n: answers[n - 1] if n <= len(answers) else Answer(Outcome.ACCEPTED, 200)
    )
    await delivery.deliver(batch)
    assert len(client.bodies) == 3
    assert client.bodies[0] == client.bodies[2]
    assert dead.letters == []
    assert tracker.committable() == {TP: 100}
    assert batch.attempts == 2


async def test_a_refused_token_is_rotated_and_the_batch_resent_without_counting_an_attempt():
    def rule(events, token, n):
        return (
            Answer(Outcome.REAUTH, 401, "billing_meter_event_session_expired")
            if token == "tok_1"
            else Answer(Outcome.ACCEPTED, 200)
        )

    delivery, batch, _client, sessions, _, tracker = make(rule)
    await delivery.deliver(batch)
    assert sessions.invalidated == ["tok_1"]
    assert batch.attempts == 0
    assert tracker.committable() == {TP: 100}


async def test_retries_past_the_deadline_dead_letter_every_event():
    delivery, batch, _client, _, dead, tracker = make(
        lambda events, token, n: Answer(Outcome.RETRY, 500), n=10, retry_deadline=0.2
    )
    await delivery.deliver(batch)
    assert len(dead.letters) == 10
    assert {reason for _, reason, _ in dead.letters} == {"retries_exhausted"}
    assert all(extra["attempts"] >= 2 for _, _, extra in dead.letters)
    assert tracker.committable() == {TP: 10}


@pytest.mark.parametrize(
    ("status", "headers", "outcome"),
    [
        (200, {}, Outcome.ACCEPTED),
        (202, {}, Outcome.ACCEPTED),
        (400, {}, Outcome.REJECTED),
        (400, {"Stripe-Should-Retry": "true"}, Outcome.RETRY),
        (401, {}, Outcome.REAUTH),
        (403, {}, Outcome.RETRY),
        (409, {}, Outcome.RETRY),
        (429, {"Stripe-Rate-Limited-Reason": "global-rate"}, Outcome.RETRY),
        (429, {}, Outcome.RETRY),
        (500, {}, Outcome.RETRY),
        (503, {"Stripe-Should-Retry": "false"}, Outcome.REJECTED),
    ],
)
def test_classify(status, headers, outcome):
    body = b'{"error": {"type": "invalid_request_error", "code": "x", "message": "events[7].payload bad"}}'
    answer = classify(status, headers, body)
    assert answer.outcome is outcome
    if outcome is Outcome.REJECTED:
        assert answer.bad_index == 7
    if status == 429:
        assert answer.rate_limit_reason == headers.get("Stripe-Rate-Limited-Reason", "")


def test_classify_survives_a_garbage_body():
    answer = classify(502, {}, b"<html>bad gateway</html>")
    assert answer.outcome is Outcome.RETRY
    assert "bad gateway" in answer.message


# -- 401s against the real session manager ------------------------------------------------------------


class ScriptedCreate:
    """Session creation for a `SessionManager`: fails while `failing`, else issues tok_1, tok_2..."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls = 0
        self.issued = 0
        self.failing = False

    async def __call__(self) -> SessionGrant:
        self.calls += 1
        await asyncio.sleep(0)
        if self.failing:
            raise SessionUnavailable("HTTP 500", code="http_500", status=500)
        self.issued += 1
        expires = self.clock.monotonic() + 900.0
        return SessionGrant(
            f"tok_{self.issued}", f"mes_{self.issued}", livemode=False, ttl_seconds=900.0, expires_monotonic=expires
        )


def with_manager(rule, create: ScriptedCreate, clock: FakeClock, batches: int = 1, n: int = 100):
    tracker = OffsetTracker()
    tracker.assign(TP)
    chunk = tracker.open(TP, 0, batches * n, batches * n)
    out = []
    for b in range(batches):
        records = [FakeRecord("usage", 0, b * n + i, 1_700_000_000_000, None, b"{}", ()) for i in range(n)]
        events = [{"event_name": "e", "payload": {}, "identifier": f"id-{b * n + i}"} for i in range(n)]
        out.append(Batch(events, records, [(chunk, n)], n * 10))
    manager = SessionManager(create, clock=clock, rand=lambda: 0.5)
    client, dead = FakeClient(rule), FakeDeadLetters(tracker)
    delivery = Delivery(
        client=client,  # type: ignore[arg-type]
        sessions=manager,
        budget=FreeBudget(),  # type: ignore[arg-type]
        dead_letters=dead,  # type: ignore[arg-type]
        tracker=tracker,
        metrics=Metrics(),
        clock=clock,
        retry_base=0.05,
        retry_max=1.0,
    )
    return delivery, out, client, manager, dead, tracker


def accepted_identifiers(client: FakeClient) -> list[str]:
    pairs = zip(client.bodies, client.answers, strict=True)
    return sorted(e["identifier"] for body, answer in pairs if answer.outcome is Outcome.ACCEPTED for e in body)


async def test_a_401_while_session_creation_fails_is_retried_until_creation_recovers():
    clock = FakeClock()
    create = ScriptedCreate(clock)
    refused = {"tok_1"}
    delivery, (batch,), client, manager, dead, tracker = with_manager(
        lambda events, token, n: Answer(Outcome.REAUTH, 401) if token in refused else Answer(Outcome.ACCEPTED, 200),
        create,
        clock,
    )
    async with manager:
        await clock.advance(0.0)
        create.failing = True
        task = asyncio.create_task(delivery.deliver(batch))
        for _ in range(100):  # 10 s of failing creation: the batch waits, nothing raises
            await clock.advance(0.1)
            assert not task.done()
        create.failing = False
        for _ in range(300):
            if task.done():
                break
            await clock.advance(0.1)
        await task  # raises if delivery did
    assert accepted_identifiers(client) == sorted(f"id-{i}" for i in range(100))  # exactly once
    assert dead.letters == []
    assert tracker.committable() == {TP: 100}
    assert create.issued == 2


async def test_fifty_senders_all_refused_make_one_creation_at_a_time_at_a_bounded_rate():
    clock = FakeClock()
    create = ScriptedCreate(clock)
    refuse_all = [True]
    delivery, batches, client, manager, dead, tracker = with_manager(
        lambda events, token, n: Answer(Outcome.REAUTH, 401) if refuse_all[0] else Answer(Outcome.ACCEPTED, 200),
        create,
        clock,
        batches=50,
        n=2,
    )
    async with manager:
        senders = [asyncio.create_task(delivery.deliver(batch)) for batch in batches]
        for _ in range(600):  # 60 s of a stream that refuses every token
            await clock.advance(0.1)
        assert not any(task.done() for task in senders)  # none raised, none gave up
        created_during_the_storm = create.calls
        refuse_all[0] = False
        for _ in range(600):
            if all(task.done() for task in senders):
                break
            await clock.advance(0.1)
        await asyncio.gather(*senders)
    # 0 s, at once after the first 401, then 1, 2, 4, 8, 16 s apart: not one creation per 401
    assert created_during_the_storm <= 8
    assert accepted_identifiers(client) == sorted(f"id-{i}" for i in range(100))  # exactly once
    assert dead.letters == []
    assert tracker.committable() == {TP: 100}


async def test_an_invalidation_that_raises_does_not_escape_delivery():
    class RaisingSessions(FakeSessions):
        async def invalidate(self, token: str) -> None:
            await super().invalidate(token)
            raise RuntimeError("boom")

    delivery, batch, _client, _, dead, tracker = make(
        lambda events, token, n: Answer(Outcome.REAUTH, 401) if token == "tok_1" else Answer(Outcome.ACCEPTED, 200)
    )
    delivery._sessions = RaisingSessions()
    await delivery.deliver(batch)
    assert dead.letters == []
    assert tracker.committable() == {TP: 100}
