"""The request budget: how fast this replica may call the meter event stream.

The account's stream budget (``total_rps``, e.g. 10,000 requests/s live) is shared by every replica.
This replica's *quota* (requests in any 1-second window of its sends) comes from one of two places:

- a *grant* (`set_quota`): by default, the demand exchange (`ingestor.demand`, `ingestor.exchange`)
  shares the budget by demand among the replicas and sets an integer quota; or
- a *share* (`set_share`): the fraction of the topics' partitions this replica owns, when the
  exchange is off (INGESTOR_BUDGET_TOPIC=off) or as the exchange's fallback. Then
  ``quota = floor(total_rps * share * (1 - headroom))``; below one request/s that is 0, not 1: a
  replica cannot round itself up (30 replicas on a 25 requests/s sandbox must not send 30 in a second).

``factor`` is AIMD: halved on a 429 (at most once per ``decrease_cooldown``, so one burst of 429s
halves once) and recovered linearly over time. It scales the pacing rate, never the quota up. It
absorbs what neither grants nor shares can see, e.g. a second deployment on the same account.

Pacing is GCRA (virtual scheduling). Each reservation takes the next slot on a virtual timeline that
advances ``1/rate`` per reservation; a caller that is early by more than the burst tolerance ``tau``
waits. For every pair of reservations i < j::

    send_j ≥ send_i + (j - i)/rate - tau

so any half-open window of W seconds holds at most ``ceil(W·rate + burst - 1)`` of this replica's
sends, where ``burst = max(1, rate·burst_seconds)`` and ``tau = (burst - 1)/rate``.

The per-second *quota* turns that into an account-wide guarantee. With ``W = 1 + send_jitter`` (0.1 s), the
pacing ``rate = min(quota/W, (quota + 1)/(W + burst_seconds)) * factor``, which makes
``ceil(W·rate + burst - 1) ≤ quota``: no window of W seconds holds more than ``quota`` sends of this
replica, and `SendWindow` enforces it on the actual send times as well. W is wider than a second
because a request that passed the gate reaches the wire a little later, by a delay that varies (the
event loop was busy): as long as it varies by less than ``send_jitter``, every 1-second window on
the wire still holds at most ``quota``. (Measured before: 306 requests in one second at the emulator
for a quota of 291 per 1-second window at the gate.) Grants sum to at most the
budget's units (see `ingestor.demand`), shares to at most 1, so the quotas of all replicas sum to at
most ``total_rps``. The cost is the burst's room (``burst_seconds``, 2 %) and the rounding.

Saturation (the signal that keeps autoscaling from adding replicas when the budget, not the worker, is
the bottleneck) is true when, over the last 10 s (at least 1 s observed, rate > 0), either:

- callers were waiting on the budget ≥ 80 % of the time (some reserved request had a send time still
  in the future): demand exceeds what the budget admits, a queue persists; or
- utilization ≥ 95 %: reservations ÷ the requests the budget allowed (∫ rate dt, so it stays right
  across rate changes). This catches a worker that paces itself just under the budget without waiting.

Both are O(1) per reservation: one ring of ten 1-second buckets, updated lazily from ``now``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from typing import Final

from ingestor.clock import SYSTEM_CLOCK, Clock
from ingestor.errors import NoShareError

DEFAULT_HEADROOM: Final = 0.03
DEFAULT_BURST_SECONDS: Final = 0.02
DEFAULT_DECREASE_FACTOR: Final = 0.5
DEFAULT_MIN_FACTOR: Final = 0.05
DEFAULT_DECREASE_COOLDOWN_S: Final = 1.0
DEFAULT_RECOVERY_PER_S: Final = 0.05

#: The sliding window behind `utilization` and `saturated`: buckets * width seconds.
WINDOW_BUCKETS: Final = 10
WINDOW_BUCKET_S: Final = 1.0
#: Saturated when callers waited on the budget at least this fraction of the window ...
SATURATION_WAITING: Final = 0.8
#: ... or when at least this fraction of the allowed requests were reserved.
SATURATION_UTILIZATION: Final = 0.95
#: Too little observed time to judge saturation below this many seconds.
SATURATION_MIN_OBSERVED_S: Final = 1.0

#: A caller waking this much later than its slot takes a new one (see `BudgetGate.acquire`) ...
LATE_WAKE_TOLERANCE_S: Final = 0.05
#: ... at most this many times, so that a permanently overloaded process still makes progress.
MAX_RESERVATIONS_PER_ACQUIRE: Final = 3

#: A request that passed the gate may reach the wire up to this much later (the event loop was busy with a
#: poll, a collection, a slow neighbour): quotas hold over windows this much wider than 1 s, so that any
#: 1-second window *on the wire* holds at most the quota while the delays vary by less than this.
DEFAULT_SEND_JITTER_S: Final = 0.1

#: Absorbs float error at integer quotas (300 * 1/3 * 0.97 must give 97, not 96).
_QUOTA_EPSILON: Final = 1e-9


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    """The budget's knobs; the defaults suit Stripe's meter event stream."""

    headroom: float = DEFAULT_HEADROOM
    burst_seconds: float = DEFAULT_BURST_SECONDS
    decrease_factor: float = DEFAULT_DECREASE_FACTOR
    min_factor: float = DEFAULT_MIN_FACTOR
    decrease_cooldown: float = DEFAULT_DECREASE_COOLDOWN_S
    recovery_per_s: float = DEFAULT_RECOVERY_PER_S
    send_jitter: float = DEFAULT_SEND_JITTER_S

    @property
    def window(self) -> float:
        """The width of the windows a quota holds over at the gate (see the module docstring)."""
        return 1.0 + self.send_jitter

    def __post_init__(self) -> None:
        checks = {
            "headroom": 0.0 <= self.headroom < 1.0,
            "burst_seconds": 0.0 <= self.burst_seconds <= 1.0,
            "decrease_factor": 0.0 < self.decrease_factor < 1.0,
            "min_factor": 0.0 < self.min_factor <= 1.0,
            "decrease_cooldown": self.decrease_cooldown >= 0.0,
            "recovery_per_s": self.recovery_per_s >= 0.0,
            "send_jitter": 0.0 <= self.send_jitter <= 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"BudgetPolicy.{name} is out of range: {getattr(self, name)!r}")


DEFAULT_POLICY: Final = BudgetPolicy()


def share_of(owned: int, total: int) -> float:
    """This replica's fraction of the budget: owned/total partitions; 1 when the total is unknown (≤ 0)."""
    if owned <= 0:
        return 0.0
    if total <= 0:
        return 1.0
    return min(1.0, owned / total)


def pacing(nominal: float, burst_seconds: float, window: float = 1.0) -> tuple[float, int]:
    """(pacing rate, per-second quota) for a nominal rate; see the module docstring for the proof.

    Below one request/s the quota is 0: rounding up would let many small shares together exceed the
    budget within one second."""
    if not nominal > 0.0:
        return 0.0, 0
    quota = math.floor(nominal + _QUOTA_EPSILON)
    return quota_rate(quota, burst_seconds, window), quota


def quota_rate(quota: int, burst_seconds: float, window: float = 1.0) -> float:
    """The GCRA rate that keeps every ``window`` of this replica's sends within ``quota``:
    ``ceil(window·rate + burst - 1) ≤ quota``."""
    if quota < 1:
        return 0.0
    return min(quota / window, (quota + 1) / (window + burst_seconds))


class _ActivityWindow:
    """Sums over the last ``buckets`` * ``width`` seconds, in a ring of buckets.

    Per bucket: seconds observed, seconds during which some caller was waiting on the budget,
    requests allowed (∫ rate dt) and reservations. `accrue` spreads a time span over the buckets it
    covers (at most ``buckets + 1`` of them), so every update is O(1).
    """

    __slots__ = ("_allowed", "_count", "_head", "_n", "_observed", "_waiting", "_width")

    def __init__(self, now: float, width: float = WINDOW_BUCKET_S, buckets: int = WINDOW_BUCKETS) -> None:
        self._width = width
        self._n = buckets
        self._head = self._index(now)
        self._observed = [0.0] * buckets
        self._waiting = [0.0] * buckets
        self._allowed = [0.0] * buckets
        self._count = [0] * buckets

    def _index(self, t: float) -> int:
        return math.floor(t / self._width)

    def _rotate(self, now: float) -> None:
        """Make the bucket holding ``now`` the head, clearing the buckets that fell out of the window."""
        index = self._index(now)
        if index <= self._head:
            return
        for bucket in range(max(self._head + 1, index - self._n + 1), index + 1):
            slot = bucket % self._n
            self._observed[slot] = self._waiting[slot] = self._allowed[slot] = 0.0
            self._count[slot] = 0
        self._head = index

    def accrue(self, start: float, end: float, rate: float, waiting_until: float) -> None:
        """Account for [start, end): paced at ``rate``, with callers waiting until ``waiting_until``."""
        self._rotate(end)
        start = max(start, (self._head - self._n + 1) * self._width)
        bucket = self._index(start)
        while start < end:
            edge = min(end, (bucket + 1) * self._width)
            slot = bucket % self._n
            self._observed[slot] += edge - start
            self._allowed[slot] += (edge - start) * rate
            self._waiting[slot] += max(0.0, min(edge, waiting_until) - start)
            start = edge
            bucket += 1

    def count(self, now: float) -> None:
        self._rotate(now)
        self._count[self._head % self._n] += 1

    def totals(self) -> tuple[float, float, float, int]:
        """(observed seconds, waiting seconds, allowed requests, reservations) in the window."""
        return sum(self._observed), sum(self._waiting), sum(self._allowed), sum(self._count)


class RequestBudget:
    """Pure core of the request budget: every method takes ``now`` (monotonic seconds).

    Starts owning nothing (rate 0) until `set_share` or `set_quota`. Attributes for the metrics
    collector, read at scrape time: `rate` (pacing, requests/s), `quota`, `share`, `factor`, `total_rps`,
    `waited_seconds_total`, `reservations_total`, `rate_limited_total`, `decreases_total`. `rate` and
    `factor` are as of the last call; the lazy recovery moves them forward on the next one.
    """

    def __init__(self, total_rps: float, now: float, policy: BudgetPolicy = DEFAULT_POLICY) -> None:
        if not (total_rps > 0.0 and math.isfinite(total_rps)):
            raise ValueError(f"total_rps must be a positive number, not {total_rps!r}")
        self.total_rps = float(total_rps)
        self.policy = policy
        self.owned = 0
        self.partitions = 0
        self.share = 0.0
        #: the exchange's grant (requests per 1-second window); None: the share decides
        self.granted: int | None = None
        self.factor = 1.0
        self.rate = 0.0
        self.quota = 0
        self.waited_seconds_total = 0.0
        self.reservations_total = 0
        self.rate_limited_total = 0
        self.decreases_total = 0
        self._interval = math.inf
        self._tau = 0.0
        self._tat = now  # theoretical arrival time: the next slot on the virtual timeline
        self._waiting_until = now  # latest send time handed out
        self._updated_at = now
        self._last_decrease = -math.inf
        self._window = _ActivityWindow(now)

    @property
    def has_share(self) -> bool:
        return self.quota > 0

    @property
    def nominal_rate(self) -> float:
        """The share's rate before AIMD (requests/s); with a grant, the grant."""
        if self.granted is not None:
            return float(self.granted)
        return self.total_rps * self.share * (1.0 - self.policy.headroom)

    def _retune(self) -> None:
        if self.granted is not None:
            self.quota = self.granted
        else:
            self.quota = pacing(self.nominal_rate, self.policy.burst_seconds)[1]
        self.rate = quota_rate(self.quota, self.policy.burst_seconds, self.policy.window) * self.factor
        if self.rate > 0.0:
            self._interval = 1.0 / self.rate
            self._tau = max(0.0, self.policy.burst_seconds - self._interval)  # (burst - 1)/rate
        else:
            self._interval, self._tau = math.inf, 0.0

    def _advance(self, now: float) -> None:
        """Bring the window and the AIMD recovery up to ``now``."""
        elapsed = now - self._updated_at
        if elapsed <= 0.0:
            return
        self._window.accrue(self._updated_at, now, self.rate, self._waiting_until)
        self._updated_at = now
        if self.factor < 1.0:
            self.factor = min(1.0, self.factor + self.policy.recovery_per_s * elapsed)
            self._retune()

    def reserve(self, now: float) -> float:
        """Take the next slot; returns how long (seconds ≥ 0) the caller must wait before sending.

        Raises `NoShareError` when this replica owns no partitions. Slots already handed out stay
        when the rate changes; only later reservations use the new rate.
        """
        self._advance(now)
        if self.rate <= 0.0:
            raise NoShareError("this replica has no request budget now (no partitions, or no grant)")
        send_at = max(now, self._tat - self._tau)
        self._tat = max(self._tat, now) + self._interval
        self._waiting_until = max(self._waiting_until, send_at)
        self._window.count(now)
        delay = send_at - now
        self.reservations_total += 1
        self.waited_seconds_total += delay
        return delay

    def set_share(self, owned: int, total: int, now: float) -> None:
        """This replica owns ``owned`` of the ``total`` partitions of its topics (total ≤ 0: unknown)."""
        if owned < 0:
            raise ValueError(f"owned partitions cannot be negative: {owned}")
        self._advance(now)
        self.owned, self.partitions = owned, total
        self.share = share_of(owned, total)
        self.granted = None
        self._retune()

    def set_quota(self, quota: int, now: float) -> None:
        """The demand exchange granted ``quota`` requests per 1-second window (0: none for now)."""
        if quota < 0:
            raise ValueError(f"a quota cannot be negative: {quota}")
        self._advance(now)
        if quota == self.granted:
            return
        self.granted = quota
        usable = max(1.0, math.floor(self.total_rps * (1.0 - self.policy.headroom) + _QUOTA_EPSILON))
        self.share = min(1.0, quota / usable)  # as a partition share: of the budget less its headroom
        self._retune()

    def on_rate_limited(self, now: float) -> bool:
        """Stripe answered 429: halve the factor unless it was cut within the cooldown. True if cut."""
        self._advance(now)
        self.rate_limited_total += 1
        if now - self._last_decrease < self.policy.decrease_cooldown:
            return False
        self._last_decrease = now
        self.factor = max(self.policy.min_factor, self.factor * self.policy.decrease_factor)
        self.decreases_total += 1
        self._retune()
        return True

    def backlog(self, now: float) -> float:
        """Seconds until the last reserved slot is sent (0: nobody waits on the budget)."""
        return max(0.0, self._waiting_until - now)

    def utilization(self, now: float) -> float:
        """Reservations in the window ÷ requests the budget allowed in it (∫ rate dt); 0 when none."""
        self._advance(now)
        _, _, allowed, count = self._window.totals()
        return count / allowed if allowed > 0.0 else 0.0

    def waiting_fraction(self, now: float) -> float:
        """Fraction of the window during which some caller was waiting on the budget."""
        self._advance(now)
        observed, waiting, _, _ = self._window.totals()
        return waiting / observed if observed > 0.0 else 0.0

    def saturated(self, now: float) -> bool:
        """True when the budget, not the worker, is the bottleneck (see the module docstring)."""
        self._advance(now)
        observed, waiting, allowed, count = self._window.totals()
        if self.rate <= 0.0 or observed < SATURATION_MIN_OBSERVED_S or allowed <= 0.0:
            return False
        return waiting >= SATURATION_WAITING * observed or count >= SATURATION_UTILIZATION * allowed


class BudgetGate:
    """The async shell: ``await gate.acquire()`` once per stream request.

    While this replica owns no partitions, `acquire` waits until `set_share` gives it some; the wait
    is cancellation-safe (nothing is reserved until the share is there). A caller cancelled while
    sleeping on its slot wastes that slot, which only ever errs on the side of sending less.
    """

    def __init__(self, budget: RequestBudget, clock: Clock = SYSTEM_CLOCK) -> None:
        self.budget = budget
        self._clock = clock
        self._has_share = asyncio.Event()
        self._window = SendWindow(budget.policy.window)
        #: callers inside `acquire` (the demand exchange reads it to tell demand from idling)
        self.waiters = 0
        self._sync_event()

    def _sync_event(self) -> None:
        if self.budget.has_share:
            self._has_share.set()
        else:
            self._has_share.clear()

    def set_share(self, owned: int, total: int) -> None:
        self.budget.set_share(owned, total, self._clock.monotonic())
        self._sync_event()

    def set_quota(self, quota: int) -> None:
        self.budget.set_quota(quota, self._clock.monotonic())
        self._sync_event()

    def on_rate_limited(self) -> bool:
        return self.budget.on_rate_limited(self._clock.monotonic())

    def saturated(self) -> bool:
        return self.budget.saturated(self._clock.monotonic())

    def utilization(self) -> float:
        return self.budget.utilization(self._clock.monotonic())

    async def acquire(self) -> None:
        """Wait for this request's slot in the budget.

        A caller that wakes up much later than its slot (the process was starved of CPU, the event
        loop was blocked) takes a new slot instead of sending at once: otherwise every caller whose
        slot passed during the stall would send together, a burst the pacing was meant to prevent.
        Finally the send window makes sure no 1-second window of actual sends exceeds the quota,
        whatever the scheduler did.
        """
        self.waiters += 1
        try:
            await self._reserve_slot()
            await self._within_window()
        finally:
            self.waiters -= 1

    async def _reserve_slot(self) -> None:
        for _ in range(MAX_RESERVATIONS_PER_ACQUIRE):
            while not self.budget.has_share:
                await self._has_share.wait()
            delay = self.budget.reserve(self._clock.monotonic())
            if delay <= 0.0:
                return
            due = self._clock.monotonic() + delay
            await self._clock.sleep(delay)
            if self._clock.monotonic() - due <= LATE_WAKE_TOLERANCE_S:
                return

    async def _within_window(self) -> None:
        window = self._window
        while True:
            while not self.budget.has_share:  # the quota fell to 0 while this caller waited
                await self._has_share.wait()
            wait = window.delay(self._clock.monotonic(), self.budget.quota)
            if wait <= 0.0:
                break
            await self._clock.sleep(wait)
        window.record(self._clock.monotonic())


class SendWindow:
    """The actual send times of the last second: a hard cap of `quota` sends in any 1-second window.

    Pure: callers pass `now`. O(1) amortized per send.
    """

    def __init__(self, width: float = 1.0) -> None:
        self.width = width
        self._sent: deque[float] = deque()

    def delay(self, now: float, quota: int) -> float:
        """Seconds to wait before one more send keeps every window within `quota` (0: send now)."""
        sent = self._sent
        while sent and sent[0] <= now - self.width:
            sent.popleft()
        if quota <= 0 or len(sent) < quota:
            return 0.0
        return sent[len(sent) - quota] + self.width - now

    def record(self, now: float) -> None:
        self._sent.append(now)
