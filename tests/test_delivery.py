"""Delivery with fakes at the boundaries: the stream client, sessions, budget and dead-letter writer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from ingestor.batching import Batch
from ingestor.delivery import STALE_SLOT_S, Delivery
from ingestor.metrics import Metrics
from ingestor.offsets import OffsetTracker, TopicPartition
from ingestor.session import SessionGrant, SessionManager, SessionUnavailable
from ingestor.stream_client import ACCEPTED, Answer, Outcome, classify
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


class FreeGate:
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
        gate=FreeGate(),  # type: ignore[arg-type]
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


ERROR_BODY = b'{"error": {"type": "invalid_request_error", "code": "x", "message": "events[7].payload bad"}}'
RETRY_FALSE = {"Stripe-Should-Retry": "false"}


@pytest.mark.parametrize(
    ("status", "headers", "body", "outcome"),
    [
        (200, {}, b"{}", Outcome.ACCEPTED),
        (200, {}, b" { }\n", Outcome.ACCEPTED),
        (200, {}, b"", Outcome.UNEXPECTED),
        (200, {}, b"<html>welcome to the proxy</html>", Outcome.UNEXPECTED),
        (200, {}, b'{"status": "ok"}', Outcome.UNEXPECTED),
        (200, {}, b"[]", Outcome.UNEXPECTED),
        (201, {}, b"{}", Outcome.UNEXPECTED),
        (202, {}, b"{}", Outcome.UNEXPECTED),
        (204, {}, b"", Outcome.UNEXPECTED),
        (301, {"Location": "https://elsewhere/"}, b"", Outcome.UNEXPECTED),
        (302, {"Location": "/login"}, b"", Outcome.UNEXPECTED),
        (307, {}, b"", Outcome.UNEXPECTED),
        (308, RETRY_FALSE, b"", Outcome.UNEXPECTED),
        (400, {}, ERROR_BODY, Outcome.REJECTED),
        (400, RETRY_FALSE, ERROR_BODY, Outcome.REJECTED),
        (400, {"Stripe-Should-Retry": "true"}, ERROR_BODY, Outcome.RETRY),
        (401, {}, ERROR_BODY, Outcome.REAUTH),
        (401, RETRY_FALSE, ERROR_BODY, Outcome.REAUTH),
        (403, {}, ERROR_BODY, Outcome.RETRY),
        (403, RETRY_FALSE, ERROR_BODY, Outcome.RETRY),
        (404, RETRY_FALSE, ERROR_BODY, Outcome.RETRY),
        (409, RETRY_FALSE, ERROR_BODY, Outcome.RETRY),
        (413, {}, ERROR_BODY, Outcome.REJECTED),
        (413, {}, b"", Outcome.REJECTED),
        (429, {"Stripe-Rate-Limited-Reason": "global-rate"}, ERROR_BODY, Outcome.RETRY),
        (429, {}, ERROR_BODY, Outcome.RETRY),
        (500, {}, ERROR_BODY, Outcome.RETRY),
        (500, RETRY_FALSE, ERROR_BODY, Outcome.RETRY),
        (503, RETRY_FALSE, ERROR_BODY, Outcome.RETRY),
    ],
)
def test_classify(status, headers, body, outcome):
    answer = classify(status, headers or {}, body)
    assert answer.outcome is outcome
    if outcome is Outcome.REJECTED and body:
        assert answer.bad_index == 7
    if status == 429:
        assert answer.rate_limit_reason == headers.get("Stripe-Rate-Limited-Reason", "")
    if outcome is Outcome.UNEXPECTED:
        assert answer.code == "unexpected_answer"
        assert f"HTTP {status}" in answer.message


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
        gate=FreeGate(),  # type: ignore[arg-type]
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


# -- what is split and what is not ---------------------------------------------------------------------


def classified(status: int, headers: dict[str, str], body: bytes = ERROR_BODY, times: int = 3):
    """The real classification of (status, headers, body) for the first `times` requests, then `200 {}`."""

    def rule(events, token, n):
        return classify(status, headers, body) if n <= times else classify(200, {}, b"{}")

    return rule


@pytest.mark.parametrize("status", [500, 502, 503, 403, 404, 409, 429])
async def test_should_retry_false_on_an_answer_that_is_not_about_content_is_retried_never_split(status):
    delivery, batch, client, _, dead, tracker = make(
        classified(status, RETRY_FALSE, b'{"error": {"type": "api_error"}}')
    )
    await delivery.deliver(batch)
    assert len(client.bodies) == 4  # three retries of the whole batch, then accepted: no bisection
    assert all(len(body) == 100 for body in client.bodies)
    assert dead.letters == []
    assert batch.attempts == 3
    assert tracker.committable() == {TP: 100}
    assert delivery._metrics.registry.get_sample_value("ingestor_bisections_total") == 0


async def test_a_413_splits_the_batch_and_a_single_event_answered_413_is_dead_lettered():
    too_large = 37

    def rule(events, token, n):
        ids = {int(e["identifier"].split("-")[1]) for e in events}
        if len(events) > 10 or too_large in ids:
            return classify(413, {}, b'{"error": {"type": "invalid_request_error", "message": "too large"}}')
        return classify(200, {}, b"{}")

    delivery, batch, client, _, dead, tracker = make(rule, retry_deadline=5.0)
    await delivery.deliver(batch)
    assert [(offset, reason) for offset, reason, _ in dead.letters] == [(too_large, "stripe_rejected")]
    assert accepted_identifiers(client) == sorted(f"id-{i}" for i in range(100) if i != too_large)
    assert tracker.committable() == {TP: 100}


def requests_count(delivery: Delivery, outcome: str, status: int) -> float:
    labels = {"outcome": outcome, "status": str(status)}
    return delivery._metrics.registry.get_sample_value("ingestor_requests_total", labels) or 0.0


async def test_an_unexpected_answer_is_retried_counted_and_never_taken_as_delivered():
    script = [
        classify(302, {"Location": "https://login.example/"}, b""),
        classify(200, {}, b"<html>proxy</html>"),
        classify(202, {}, b"{}"),
    ]
    clock = FakeClock()
    delivery, batch, _client, _, dead, tracker = make(lambda events, token, n: script[(n - 1) % 3])
    delivery._clock = clock
    task = asyncio.create_task(delivery.deliver(batch))
    for _ in range(60):  # a minute of a misconfigured base URL
        await clock.advance(1.0)
    assert not task.done()
    assert tracker.committable() == {}  # nothing committed, nothing dead-lettered
    assert dead.letters == []
    assert requests_count(delivery, "unexpected", 302) >= 3
    assert requests_count(delivery, "unexpected", 200) >= 3
    assert requests_count(delivery, "accepted", 200) == 0
    retries = delivery._metrics.registry.get_sample_value("ingestor_retries_total", {"cause": "unexpected_answer"})
    assert retries == batch.attempts
    script[:] = [classify(200, {}, b"{}")] * 3  # the base URL is fixed
    for _ in range(60):
        await clock.advance(1.0)
    await task
    assert tracker.committable() == {TP: 100}
    assert requests_count(delivery, "accepted", 200) == 1


class SlowSessions(FakeSessions):
    """A token is at hand only after `wait_s` (a new session being created), once per `refuse()`."""

    def __init__(self, clock: FakeClock, wait_s: float) -> None:
        super().__init__()
        self.clock = clock
        self.wait_s = wait_s
        self.ready = False

    def refuse(self) -> None:
        self.ready = False

    async def token(self) -> str:
        if not self.ready:
            await self.clock.sleep(self.wait_s)
            self.ready = True
        return self.tokens[-1]


class RecordingBudget(FreeGate):
    def __init__(self, clock: FakeClock, wait_s: float = 0.0, during_wait: Any = None) -> None:
        self.clock = clock
        self.wait_s = wait_s
        self.during_wait = during_wait
        self.slots: list[float] = []

    async def acquire(self) -> None:
        if self.during_wait is not None:
            self.during_wait()
            self.during_wait = None
        await self.clock.sleep(self.wait_s)
        self.slots.append(self.clock.now)


def sending_delivery(sessions_wait: float, budget_wait: float = 0.0, *, refuse_during_slot: bool = False):
    delivery, batch, _, _, _, _ = make(lambda *_: Answer(Outcome.ACCEPTED, 200), n=10)
    clock = delivery._clock
    sent: list[float] = []

    class Client:
        async def send(self, body: bytes, token: str) -> Answer:
            sent.append(clock.now)
            return ACCEPTED

    sessions = SlowSessions(clock, sessions_wait)
    if refuse_during_slot:
        sessions.ready = True
    budget = RecordingBudget(clock, budget_wait, sessions.refuse if refuse_during_slot else None)
    delivery._client, delivery._sessions, delivery._gate = Client(), sessions, budget
    return delivery, batch, budget, sent


async def test_a_request_waits_for_its_session_before_its_budget_slot_not_after():
    """The slot must be followed by the send at once: a request that passed the gate and then waited for a
    new session went out with every other such request when the session came (146 in a second on the wire
    for a budget of 100)."""
    delivery, batch, budget, sent = sending_delivery(sessions_wait=0.5)
    await delivery.deliver(batch)
    assert len(sent) == len(budget.slots) == 1
    assert sent[0] - budget.slots[0] <= STALE_SLOT_S


async def test_a_session_refused_while_a_request_waits_for_its_slot_costs_a_new_slot():
    delivery, batch, budget, sent = sending_delivery(sessions_wait=0.5, budget_wait=0.3, refuse_during_slot=True)
    await delivery.deliver(batch)
    assert len(budget.slots) == 2  # the first slot went stale while the new session was created
    assert len(sent) == 1
    assert sent[0] - budget.slots[-1] <= STALE_SLOT_S
