"""Drives one batch to done: accepted by Stripe, or its events dead-lettered.

- Every request waits for a session token, then for its slot in the budget, then goes out at once: a
  request that had to wait for a new token after its slot takes a new slot (the budget holds on the
  wire only while requests reach it right after their slots).
- `reauth` (401): the refused token is invalidated (never raises: the session manager creates its
  successor, single-flight and rate limited) and the batch resent once a new token is at hand, like
  any request that waits for a session; up to `MAX_FREE_REAUTHS` in a row are not failed attempts.
- `retry`: exponential backoff with full jitter, capped; on rate-limit 429s the budget also backs off.
  Transient failures are retried until INGESTOR_RETRY_DEADLINE_S (0: forever): a billing pipeline
  should stall and alert rather than dead-letter events Stripe would have taken a minute later.
- `unexpected` (a redirect, another 2xx, a 200 whose body is not Stripe's `{}`): a misconfiguration (a
  wrong base URL, a proxy); logged, counted (`ingestor_requests_total{outcome="unexpected"}`) and
  retried like `retry`; the events are never taken as delivered.
- `rejected` (400, 413): the batch is split so the valid events are delivered and only the offending ones
  dead-lettered. When Stripe's message names the bad event (`events[17]`), it is isolated at once
  (three requests); otherwise the batch is bisected (at most 2·k·log2(n) extra requests for k bad events).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from ingestor import backoff
from ingestor.errors import Rejection
from ingestor.stream_client import Answer, Outcome

if TYPE_CHECKING:
    from ingestor.batching import Batch
    from ingestor.budget import BudgetGate
    from ingestor.clock import Clock
    from ingestor.deadletter import DeadLetterWriter
    from ingestor.metrics import Metrics
    from ingestor.offsets import OffsetTracker
    from ingestor.stream_client import StreamClient

log = logging.getLogger("ingestor.delivery")

#: Consecutive 401s on fresh tokens after which a 401 counts as a failed attempt (backs off).
MAX_FREE_REAUTHS = 3
#: A request that waited this long for its token after its budget slot takes a new slot (see `_slot_and_token`).
STALE_SLOT_S = 0.02


class Sessions(Protocol):
    async def token(self) -> str:
        """A valid token; raises when none can be had now (a transient failure for the caller)."""
        ...

    async def invalidate(self, token: str) -> None:
        """The stream refused `token` (401): replace it. Never raises."""
        ...


class Progress(Protocol):
    def delivered(self, now: float) -> None: ...


class Delivery:
    """Sends batches; one instance shared by every sender task."""

    def __init__(  # noqa: PLR0913 - the collaborators are explicit on purpose
        self,
        *,
        client: StreamClient,
        sessions: Sessions,
        gate: BudgetGate,
        dead_letters: DeadLetterWriter,
        tracker: OffsetTracker,
        metrics: Metrics,
        clock: Clock,
        retry_base: float,
        retry_max: float,
        retry_deadline: float = 0.0,
    ) -> None:
        self._client = client
        self._sessions = sessions
        self._gate = gate
        self._dead_letters = dead_letters
        self._tracker = tracker
        self._metrics = metrics
        self._clock = clock
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._retry_deadline = retry_deadline
        self.last_delivery = clock.monotonic()
        # Labelled children, looked up once (a `labels()` call per request costs a lock and a hash).
        self._request_counters: dict[tuple[str, int], Any] = {}
        self._delivered_counters: dict[str, Any] = {}

    async def deliver(self, batch: Batch) -> None:
        """Return once every event of `batch` is accepted or handed to the dead-letter writer."""
        body = orjson.dumps({"events": batch.events})
        reauths = 0
        while True:
            answer = await self._send(batch, body)
            if answer.outcome is Outcome.ACCEPTED:
                self._accepted(batch)
                return
            if answer.outcome is Outcome.REJECTED:
                await self._rejected(batch, answer)
                return
            if answer.outcome is Outcome.REAUTH and reauths < MAX_FREE_REAUTHS:
                reauths += 1
                continue
            if await self._retry_or_give_up(batch, answer):
                return

    async def _send(self, batch: Batch, body: bytes) -> Answer:
        try:
            token = await self._slot_and_token()
        except Exception as exc:  # noqa: BLE001 - no token: a transient failure like any other
            return Answer(Outcome.RETRY, 0, "session_unavailable", type(exc).__name__)
        metrics = self._metrics
        metrics.requests_in_flight.inc()
        started = self._clock.monotonic()
        try:
            answer = await self._client.send(body, token)
        finally:
            metrics.requests_in_flight.dec()
        metrics.request_duration.observe(self._clock.monotonic() - started)
        key = (answer.outcome.value, answer.status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = metrics.requests.labels(key[0], str(key[1]))
        counter.inc()
        if answer.outcome is Outcome.REAUTH:
            await self._invalidate(token)
        elif answer.outcome is Outcome.UNEXPECTED:
            log.warning(
                "the meter event stream gave an answer Stripe does not give; check the base URL and proxies",
                extra={"status": answer.status, "detail": answer.message, "events": len(batch)},
            )
        elif answer.status == 429:
            metrics.rate_limited.labels(answer.rate_limit_reason or "none").inc()
            if answer.rate_limit_reason:
                self._gate.on_rate_limited()
        if answer.outcome is Outcome.ACCEPTED:
            metrics.batch_size.observe(len(batch))
            metrics.batch_bytes.observe(len(body))
        return answer

    async def _slot_and_token(self) -> str:
        """A slot in the budget, and a token to send with at once: nothing waits between the two.

        The budget holds on the wire only while a request reaches it soon after its slot (less than the
        budget's ``send_jitter``). Waiting for a session after the slot broke that: every request that
        passed the gate while a new session was being created went out together when it came (146
        requests in one second on the wire for a budget of 100, a slow session creation after a
        revocation). So the token comes first; if it has to be replaced while this request waits for its
        slot, the slot is given up and a new one taken once the new token is at hand.
        """
        while True:
            await self._sessions.token()  # may wait for a new session: before the slot, not after
            await self._gate.acquire()
            slot = self._clock.monotonic()
            token = await self._sessions.token()  # at once, unless the session was refused meanwhile
            if self._clock.monotonic() - slot <= STALE_SLOT_S:
                return token

    async def _invalidate(self, token: str) -> None:
        """Report a refused token; whatever goes wrong there, the batch is simply sent again."""
        try:
            await self._sessions.invalidate(token)
        except Exception as exc:  # noqa: BLE001 - a sender task must outlive any session failure
            log.warning("invalidating a refused session token failed", extra={"error": type(exc).__name__})

    def _accepted(self, batch: Batch) -> None:
        complete = self._tracker.complete
        for chunk, count in batch.parts:
            complete(chunk, count)
        now_wall = self._clock.time()
        self._metrics.end_to_end_latency.observe(max(0.0, now_wall - batch.oldest_timestamp_ms() / 1000))
        topics = {chunk.tp.topic for chunk, _ in batch.parts}
        if len(topics) == 1:
            self._delivered_counter(topics.pop()).inc(len(batch))
        else:
            for chunk, count in batch.parts:
                self._delivered_counter(chunk.tp.topic).inc(count)
        self.last_delivery = self._clock.monotonic()

    def _delivered_counter(self, topic: str) -> Any:
        counter = self._delivered_counters.get(topic)
        if counter is None:
            counter = self._delivered_counters[topic] = self._metrics.events_delivered.labels(topic)
        return counter

    async def _retry_or_give_up(self, batch: Batch, answer: Answer) -> bool:
        """Back off before the next attempt; True when the batch was dead-lettered instead."""
        now = self._clock.time()
        batch.attempts += 1
        batch.first_failure = batch.first_failure or now
        batch.last_failure = now
        cause = answer.code or (f"http_{answer.status}" if answer.status else "error")
        self._metrics.retries.labels(_cause_label(answer)).inc()
        if self._retry_deadline and now - batch.first_failure >= self._retry_deadline:
            message = f"gave up after {batch.attempts} attempts; last: {answer.status} {cause}"
            self._dead_letter_all(batch, Rejection("retries_exhausted", message), answer)
            return True
        pause = backoff.delay(batch.attempts, self._retry_base, self._retry_max, random.random())  # noqa: S311 - jitter
        await self._clock.sleep(pause)
        return False

    async def _rejected(self, batch: Batch, answer: Answer) -> None:
        if len(batch) == 1:
            message = answer.message or f"Stripe answered {answer.status}"
            self._dead_letter_all(batch, Rejection("stripe_rejected", message), answer)
            return
        self._metrics.bisections.inc()
        await asyncio.gather(*(self.deliver(part) for part in _split(batch, answer.bad_index) if len(part)))

    def _dead_letter_all(self, batch: Batch, rejection: Rejection, answer: Answer) -> None:
        for event, record, chunk in batch.entries():
            self._dead_letters.submit(
                chunk,
                record,
                rejection,
                attempts=batch.attempts + 1,
                stripe_code=answer.code,
                identifier=str(event.get("identifier", "")),
                first_failure=batch.first_failure or self._clock.time(),
                last_failure=self._clock.time(),
            )


def _cause_label(answer: Answer) -> str:
    if answer.outcome is Outcome.UNEXPECTED:
        return "unexpected_answer"
    return _status_cause(answer)


def _status_cause(answer: Answer) -> str:
    if answer.status == 429:
        return "rate_limited" if answer.rate_limit_reason else "lock_timeout"
    if answer.status >= 500:
        return "server_error"
    if answer.status == 409:
        return "conflict"
    if answer.outcome is Outcome.REAUTH:
        return "reauth"
    if answer.status == 0:
        return answer.code or "error"
    return f"http_{answer.status}"


def _split(batch: Batch, bad_index: int | None) -> list[Batch]:
    """Isolate the named bad event when Stripe names one, else halve."""
    if bad_index is not None and 0 <= bad_index < len(batch):
        head, rest = batch.split_at(bad_index)
        bad, tail = rest.split_at(1)
        return [head, bad, tail]
    return list(batch.split())
