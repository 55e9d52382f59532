"""Cancellations from the source topics to `POST /v2/billing/meter_event_adjustments`, in partition order.

Order. A producer that writes an event and then its cancellation (same key, so the same partition) must
never see the cancellation overtake the event. `split_poll` gives every cancellation a chunk of its own in
the offset tracker (the records before it, itself, the records after it), and the cancellation is sent only
once its chunk is the oldest open chunk of its partition (`OffsetTracker.is_next`): every earlier record of
the partition is done (accepted by Stripe or dead-lettered). Records after it are batched and sent as usual;
a later cancellation of the same partition waits for this one too, so cancellations of one partition go
one at a time, in order. A poll without cancellations is one chunk, as before (nothing on the hot path).

Calls. Adjustments are ordinary API calls on the API host (`ingestor.stripe_http` with the secret key), not
stream calls: one request per cancellation, paced at INGESTOR_API_RPS (Stripe documents 100 requests/s in live
mode and 25/s in sandboxes for ordinary endpoints), with an `Idempotency-Key` derived from the record
(`ingestor.cancellation.idempotency_key`) and reused on every retry, so a retry after a timeout gets the
answer the first try got. Answers are classified as stream answers are (`stream_client.classify`), except
that a 401 is retried like any misconfiguration (there is no session to rotate): 2xx done; 400 (or
`Stripe-Should-Retry: false`) dead-lettered as `cancel_rejected` with Stripe's code; anything else retried
with exponential backoff and full jitter (INGESTOR_ADJUSTMENT_RETRY_BASE_S to _MAX_S) until
INGESTOR_RETRY_DEADLINE_S (0: forever), then `retries_exhausted`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson

from ingestor import backoff
from ingestor.errors import Rejection, StripeUnreachable
from ingestor.stream_client import ACCEPTED, Answer, Outcome, classify, unreachable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ingestor.cancellation import Cancellation
    from ingestor.clock import Clock
    from ingestor.deadletter import DeadLetterWriter
    from ingestor.events import Record
    from ingestor.metrics import Metrics
    from ingestor.offsets import Chunk, OffsetTracker
    from ingestor.stripe_http import StripeHttp

log = logging.getLogger("ingestor.adjustments")

ADJUSTMENTS_PATH: Final = "/v2/billing/meter_event_adjustments"
#: How often waiting cancellations are checked against their partition's progress.
TICK_S: Final = 0.01


# --- the pure core: a poll cut around its cancellations ---------------------------------------------------


@dataclass(slots=True)
class Segment:
    """Records [start, end) of one poll that become one offset chunk."""

    start: int
    end: int
    events: list[dict[str, Any]] = field(default_factory=list)
    sources: list[Record] = field(default_factory=list)
    rejected: list[tuple[Record, Rejection]] = field(default_factory=list)
    cancellation: Cancellation | None = None

    @property
    def count(self) -> int:
        return len(self.events) + len(self.rejected) + (self.cancellation is not None)


def split_poll(
    records: Sequence[Record],
    events: list[dict[str, Any]],
    sources: list[Record],
    rejected: list[tuple[Record, Rejection]],
    cancellations: Sequence[Cancellation],
) -> list[Segment]:
    """One poll of one partition as segments: each cancellation alone, the records between them together.

    `events`/`sources`, `rejected` and `cancellations` are what the decoder made of `records`, each in
    offset order. Without cancellations: one segment, the lists as they are."""
    last = records[-1].offset + 1
    if not cancellations:
        return [Segment(records[0].offset, last, events, sources, rejected)]
    segments: list[Segment] = []
    at_event = at_rejected = 0
    start = records[0].offset
    for cancel in [*cancellations, None]:
        cut = last if cancel is None else cancel.record.offset
        segment = Segment(start, cut)
        while at_event < len(sources) and sources[at_event].offset < cut:
            segment.events.append(events[at_event])
            segment.sources.append(sources[at_event])
            at_event += 1
        while at_rejected < len(rejected) and rejected[at_rejected][0].offset < cut:
            segment.rejected.append(rejected[at_rejected])
            at_rejected += 1
        if segment.count:
            segments.append(segment)
        if cancel is not None:
            segments.append(Segment(cut, cut + 1, cancellation=cancel))
            start = cut + 1
    return segments


class Pacer:
    """At most `rate` calls a second, evenly spaced (GCRA with no burst); `rate` 0: unpaced."""

    def __init__(self, rate: float, clock: Clock) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._clock = clock
        self._next = 0.0

    def reserve(self, now: float) -> float:
        """Seconds to wait before the call reserved now may go."""
        at = max(now, self._next)
        self._next = at + self._interval
        return at - now

    async def acquire(self) -> None:
        wait = self.reserve(self._clock.monotonic())
        if wait > 0:
            await self._clock.sleep(wait)


# --- the I/O shell -----------------------------------------------------------------------------------------


class AdjustmentClient:
    """POSTs one cancellation on the API host (secret key) and classifies the answer. Never raises for I/O."""

    def __init__(self, http: StripeHttp) -> None:
        self._http = http

    async def send(self, cancel: Cancellation) -> Answer:
        try:
            reply = await self._http.request(
                "POST", ADJUSTMENTS_PATH, body=cancel.body(), idempotency_key=cancel.idempotency_key()
            )
        except StripeUnreachable as exc:
            return unreachable(exc)
        status, body = reply.status, reply.body
        if status == 200 and _is_adjustment(body):  # Stripe's documented success: the adjustment object
            return ACCEPTED
        answer = classify(status, reply.headers, body)  # errors as for the stream; any other 2xx is unexpected
        if answer.outcome is Outcome.REAUTH:  # the secret key was refused: a misconfiguration, retried
            return Answer(Outcome.RETRY, status, answer.code, answer.message)
        return answer


def _is_adjustment(body: bytes) -> bool:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(answer, dict) and answer.get("object") == "v2.billing.meter_event_adjustment"


@dataclass(slots=True, eq=False)
class _Waiting:
    chunk: Chunk
    cancel: Cancellation


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base: float
    cap: float
    #: 0: retry forever
    deadline: float = 0.0


class Adjuster:
    """Holds cancellations until their partition's earlier records are done, then sends them."""

    def __init__(  # noqa: PLR0913 - explicit collaborators
        self,
        *,
        client: AdjustmentClient,
        tracker: OffsetTracker,
        dead_letters: DeadLetterWriter,
        metrics: Metrics,
        clock: Clock,
        pacer: Pacer,
        retry: RetryPolicy,
    ) -> None:
        self._client = client
        self._tracker = tracker
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._clock = clock
        self._pacer = pacer
        self._retry = retry
        self._waiting: list[_Waiting] = []
        self._sending = 0

    @property
    def pending(self) -> int:
        """Cancellations consumed and not yet done (waiting or in flight)."""
        return len(self._waiting) + self._sending

    def submit(self, chunk: Chunk, cancel: Cancellation) -> None:
        """Take a cancellation alone in `chunk` (see `split_poll`)."""
        self._waiting.append(_Waiting(chunk, cancel))

    def ready(self) -> list[_Waiting]:
        """Take the cancellations whose earlier records are all done; forget those no longer ours."""
        is_next = self._tracker.is_next
        ready = [w for w in self._waiting if not w.chunk.released and is_next(w.chunk)]
        if ready or any(w.chunk.released for w in self._waiting):
            taken = {id(w) for w in ready}
            self._waiting = [w for w in self._waiting if not w.chunk.released and id(w) not in taken]
        return ready

    async def run(self) -> None:
        """Send cancellations as they become ready, until cancelled (in-flight sends are cancelled too)."""
        async with asyncio.TaskGroup() as group:
            while True:
                for item in self.ready():
                    self._sending += 1
                    group.create_task(self._send(item))
                await asyncio.sleep(TICK_S)

    async def _send(self, item: _Waiting) -> None:
        try:
            await self._deliver(item)
        finally:
            self._sending -= 1

    async def _deliver(self, item: _Waiting) -> None:
        failures, first_failure = 0, 0.0
        while not item.chunk.released:
            answer = await self._attempt(item.cancel)
            if answer.outcome is Outcome.ACCEPTED:
                self._tracker.complete(item.chunk, 1)
                return
            now = self._clock.time()
            if answer.outcome is Outcome.REJECTED:
                message = answer.message or f"Stripe answered {answer.status}"
                self._dead_letter(item, Rejection("cancel_rejected", message), answer, failures, (first_failure, now))
                return
            failures += 1
            first_failure = first_failure or now
            if self._retry.deadline and now - first_failure >= self._retry.deadline:
                message = f"gave up after {failures} attempts; last: {answer.status} {answer.code}"
                self._dead_letter(item, Rejection("retries_exhausted", message), answer, failures, (first_failure, now))
                return
            log.warning(
                "cancellation not accepted; retrying",
                extra={"status": answer.status, "code": answer.code, "attempts": failures},
            )
            pause = backoff.delay(failures, self._retry.base, self._retry.cap, random.random())  # noqa: S311
            await self._clock.sleep(pause)

    async def _attempt(self, cancel: Cancellation) -> Answer:
        await self._pacer.acquire()
        metrics = self._metrics
        started = self._clock.monotonic()
        answer = await self._client.send(cancel)
        metrics.adjustment_duration.observe(self._clock.monotonic() - started)
        metrics.adjustments.labels(answer.outcome.value, str(answer.status)).inc()
        return answer

    def _dead_letter(
        self, item: _Waiting, rejection: Rejection, answer: Answer, failures: int, times: tuple[float, float]
    ) -> None:
        self._dead_letters.submit(
            item.chunk,
            item.cancel.record,
            rejection,
            attempts=failures + 1,
            stripe_code=answer.code,
            identifier=item.cancel.identifier,
            first_failure=times[0] or times[1],
            last_failure=times[1],
        )
