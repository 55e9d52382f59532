"""Demand-based shares of the account's request budget: the pure core of the demand exchange.

Every replica publishes its *demand* (requests/s it could use) on a small Kafka topic and reads every
other replica's. From the same picture each replica computes, deterministically, its *grant*: an
integer number of requests per 1-second window. Grants are an integer max-min fair share (water
filling) of the budget's units over the live demands, so a replica with work may use what idle ones
leave. This module holds the decisions; `ingestor.exchange` moves the records.

**Why the grants of all replicas never sum above the budget, although their pictures differ.** For a
fixed picture, `fair_grants` gives each member at most its demand and the grants sum to at most the
units. Member i's grant *rises* with its own demand and the pool, and *falls* when another member's
demand rises (integer water filling with a fixed priority order is monotone in that way). So if
every replica computes with (a) its own *effective* demand ``D*_i`` and (b) values for the others
that are at least their effective demands ``D*_j``, then ``Σ g_i(view_i) ≤ Σ g_i(D*) ≤ units``. The
protocol makes (a) and (b) hold at every instant:

- **Raise late, lower at once.** A replica's effective demand is the minimum of the values it
  published over the last ``settle`` seconds, each counted from the moment Kafka acknowledged it
  (and at most its current raw demand). A lower demand takes effect at once; a higher one only
  ``settle`` seconds after it is in the log. A replica not yet heard of has effective demand 0.
- **Fresh pictures only.** The topic has one partition that every replica writes and reads, so
  reading one's own record back means having read everything appended before it. A replica computes
  a grant only while its latest echoed record was sent less than ``settle`` seconds ago; otherwise
  its grant is 0. A fresh reader has therefore seen every value a peer published more than
  ``settle`` seconds ago, and the peer's effective demand is at most the value it sees: (b).
- **The same priority for the leftover units**, given by the wall-clock epoch (every
  ``ROTATION_S`` seconds, so that with more busy replicas than units each gets its turn). Near an
  epoch change a replica takes the smaller of its grants under the epochs ``MAX_CLOCK_SKEW_S``
  before and after now, so clocks apart by less than that never give one unit to two replicas.
- **1-second windows.** The quota a replica enforces (at most that many sends in any 1-second
  window of its own sends) is the minimum of its grants over the last second, so the sends of all
  replicas in any 1-second window are bounded by their grants at one instant: at most the units.

**Expiry.** A peer's entry expires ``ttl`` seconds after its last record was received (a crashed
replica's share returns after that; until then it is held, which errs on the safe side). A replica
stopping cleanly writes a tombstone and its share returns at once.

**Cut off.** A replica that cannot keep a fresh picture for ``ttl`` seconds *leaves*: it stops
publishing, writes a tombstone if it can, and sends nothing until every fresh peer has forgotten it
(``settle`` after the tombstone's ack, or ``ttl + settle`` plus the producer's timeout after its last
write). Then it paces at its *fallback* share: owned/all partitions. That one is safe where
1/(known replicas) is not: the peers' pool is the budget times the fraction of partitions owned by
the members they see, so the partitions of a replica they do not see (cut off, or not yet joined)
keep their slice; 1/(known replicas) would take a slice nobody leaves free. A fallback share below
one request per second gives no quota at all: the edge case (many replicas on a sandbox budget)
waits rather than oversends. AIMD on 429s (`ingestor.budget`) stays the last line of defence.

Everything here is pure: callers pass ``now`` (monotonic seconds) and ``wall`` (epoch seconds).
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

#: Leftover units (more busy replicas than units) rotate among the busy replicas this often.
ROTATION_S: Final = 10.0
#: Wall clocks of two replicas are assumed to differ by less than this.
MAX_CLOCK_SKEW_S: Final = 1.0
#: The quota is the smallest grant over this long: the width of the account's rate windows.
WINDOW_S: Final = 1.0
#: A fallback replica retries the exchange at least this often (sooner when it reads records again).
REJOIN_PROBE_S: Final = 30.0


def budget_units(total_rps: int, headroom: float) -> int:
    """Requests per 1-second window the account may receive from ingestor: the budget less headroom,
    at least 1 (a budget of 1 request/s stays usable)."""
    return max(1, math.floor(total_rps * (1.0 - headroom) + 1e-9))


def _water_level(units: int, demands: Sequence[int]) -> int:
    """The largest integer level with Σ min(demand, level) ≤ units."""
    lo, hi = 0, max(demands, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(d, mid) for d in demands) <= units:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fair_grants(units: int, demands: Mapping[str, int], priority: Sequence[str]) -> dict[str, int]:
    """Integer max-min fair shares of ``units`` over ``demands``; leftover units go one each to the
    members still wanting more, in ``priority`` order (members missing from it come last, by name)."""
    units = max(0, units)
    wanted = {m: max(0, d) for m, d in demands.items()}
    level = _water_level(units, list(wanted.values()))
    grants = {m: min(d, level) for m, d in wanted.items()}
    left = units - sum(grants.values())
    ranked = {m: i for i, m in enumerate(priority)}
    hungry = sorted((m for m, d in wanted.items() if d > level), key=lambda m: (ranked.get(m, len(ranked)), m))
    for member in hungry[:left]:
        grants[member] += 1
    return grants


def priority(members: Sequence[str], epoch: int) -> list[str]:
    """Every replica's same order of ``members`` for one rotation epoch."""

    def rank(member: str) -> bytes:
        return hashlib.blake2b(f"{epoch}\x00{member}".encode(), digest_size=8).digest()

    return sorted(members, key=rank)


def epochs_near(wall: float) -> set[int]:
    """The rotation epochs some replica may be in now, given the assumed clock skew."""
    return {math.floor((wall - MAX_CLOCK_SKEW_S) / ROTATION_S), math.floor((wall + MAX_CLOCK_SKEW_S) / ROTATION_S)}


class MinWindow:
    """A step function of time: the minimum value in effect over the last ``width`` seconds."""

    def __init__(self, width: float, initial: int, now: float) -> None:
        self.width = width
        self._steps: deque[tuple[float, int]] = deque([(now, initial)])

    def set(self, value: int, now: float) -> None:
        self._steps.append((now, value))

    def min(self, now: float) -> int:
        steps = self._steps
        while len(steps) > 1 and steps[1][0] <= now - self.width:
            steps.popleft()  # the first step still in effect at now - width stays
        return min(v for _, v in steps)

    @property
    def last(self) -> int:
        return self._steps[-1][1]


@dataclass(frozen=True, slots=True)
class Timing:
    """The exchange's clocks: publish every ``interval``; ``settle`` and ``ttl`` follow from it."""

    interval: float = 0.5
    #: the producer gives up on a record after this long (bounds when an unacked write can land)
    send_timeout: float = 5.0
    #: how often the shell applies a decision: a quota stands this long on a picture this old
    tick: float = 0.1

    @property
    def settle(self) -> float:
        return 4.0 * self.interval

    @property
    def ttl(self) -> float:
        return 10.0 * self.interval


@dataclass(frozen=True, slots=True)
class Peer:
    demand: int
    owned: int
    received: float


@dataclass(frozen=True, slots=True)
class Inputs:
    """This replica's side of a decision: its raw demand, its partitions and the budget's units."""

    demand: int
    owned: int
    partitions: int
    units: int


class Mode(Enum):
    EXCHANGE = "exchange"
    LEAVING = "leaving"
    FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the shell applies: a quota (requests per 1-second window) or the fallback share."""

    mode: Mode
    quota: int
    members: int


class DemandBook:
    """One replica's picture of every member's demand, its own published history and its mode."""

    def __init__(self, member: str, timing: Timing, now: float) -> None:
        self.member = member
        self.timing = timing
        self.mode = Mode.EXCHANGE
        self.peers: dict[str, Peer] = {}
        self._own = MinWindow(timing.settle, 0, now)
        self._grants = MinWindow(WINDOW_S, 0, now)
        self._sent: dict[int, tuple[float, int]] = {}
        self._seq = 0
        self._echo_sent: float | None = None
        self._fresh_since_or_start = now
        self._last_send = now
        self._tombstone_acked: float | None = None
        self._mode_since = now
        self._last_received = -math.inf

    # ---------------------------------------------------------------- records

    def next_record(self, demand: int, owned: int, now: float) -> dict[str, int]:
        """The value to publish now (a dict for the wire); remember when it was sent."""
        self._seq += 1
        self._sent[self._seq] = (now, demand)
        self._last_send = now
        return {"seq": self._seq, "demand": demand, "owned": owned}

    def acked(self, seq: int, now: float) -> None:
        """Kafka acknowledged our record ``seq``: from now on peers may count on its demand."""
        sent = self._sent.get(seq)
        if sent is not None and self.mode is Mode.EXCHANGE:
            self._own.set(sent[1], now)

    def tombstone_acked(self, now: float) -> None:
        self._tombstone_acked = now

    def received(self, member: str, value: Mapping[str, int] | None, now: float) -> None:
        """A record of the topic (``None``: a tombstone) for ``member`` of our group."""
        self._last_received = now
        if member == self.member:
            self._echo(value)
            return
        if value is None:
            self.peers.pop(member, None)
        else:
            self.peers[member] = Peer(int(value["demand"]), int(value["owned"]), now)

    def _echo(self, value: Mapping[str, int] | None) -> None:
        if value is None:
            return
        seq = int(value["seq"])
        sent = self._sent.get(seq)
        if sent is None:
            return  # an earlier incarnation's record
        self._echo_sent = sent[0]
        for old in [s for s in self._sent if s < seq]:
            del self._sent[old]

    # ---------------------------------------------------------------- decisions

    def fresh(self, now: float) -> bool:
        """Our latest echo was sent recently enough that the quota decided now still holds at the next
        tick: everything a peer may already count on (published ``settle`` ago) is in our picture."""
        limit = self.timing.settle - 2 * self.timing.tick
        return self._echo_sent is not None and now - self._echo_sent < limit

    def effective_demand(self, demand: int, now: float) -> int:
        """Our own demand as the grant computation may use it: lowered at once, raised after settling."""
        return min(demand, self._own.min(now))

    def live_peers(self, now: float) -> dict[str, Peer]:
        ttl = self.timing.ttl
        for member in [m for m, p in self.peers.items() if now - p.received >= ttl]:
            del self.peers[member]
        return self.peers

    def decide(self, inputs: Inputs, now: float, wall: float) -> Decision:
        """This replica's quota now; moves between exchange, leaving and fallback (module docstring)."""
        self._step_mode(now)
        peers = self.live_peers(now)
        if self.mode is not Mode.EXCHANGE:
            self._grants.set(0, now)
            return Decision(self.mode, 0, len(peers) + 1)
        grant = self._grant(inputs, now, wall) if self.fresh(now) else 0
        self._grants.set(grant, now)
        return Decision(self.mode, self._grants.min(now), len(peers) + 1)

    def _grant(self, inputs: Inputs, now: float, wall: float) -> int:
        units = inputs.units
        demands = {m: min(p.demand, units) for m, p in self.peers.items()}
        demands[self.member] = self.effective_demand(min(inputs.demand, units), now)
        seen_owned = inputs.owned + sum(p.owned for p in self.peers.values())
        pool = units
        if inputs.partitions > 0:
            pool = math.floor(units * min(1.0, seen_owned / inputs.partitions) + 1e-9)
        members = sorted(demands)
        return min(fair_grants(pool, demands, priority(members, e))[self.member] for e in epochs_near(wall))

    def _step_mode(self, now: float) -> None:
        timing = self.timing
        if self.fresh(now):
            self._fresh_since_or_start = now
        if self.mode is Mode.EXCHANGE and now - self._fresh_since_or_start >= timing.ttl:
            self._set_mode(Mode.LEAVING, now)
        elif self.mode is Mode.LEAVING and self._peers_forgot_us(now):
            self._set_mode(Mode.FALLBACK, now)
        elif self.mode is Mode.FALLBACK and self._may_rejoin(now):
            self._set_mode(Mode.EXCHANGE, now)

    def _peers_forgot_us(self, now: float) -> bool:
        t = self.timing
        if self._tombstone_acked is not None and now - self._tombstone_acked >= t.settle:
            return True
        return now - self._last_send >= t.send_timeout + t.settle + t.ttl

    def _may_rejoin(self, now: float) -> bool:
        reading = now - self._last_received < self.timing.settle and self._last_received > self._mode_since
        return reading or now - self._mode_since >= REJOIN_PROBE_S

    def _set_mode(self, mode: Mode, now: float) -> None:
        self.mode = mode
        self._mode_since = now
        if mode is Mode.EXCHANGE:
            # a new start: our published history no longer counts, peers must see us again first
            self._own = MinWindow(self.timing.settle, 0, now)
            self._echo_sent = None
            self._fresh_since_or_start = now
            self._sent.clear()
        elif mode is Mode.LEAVING:
            self._tombstone_acked = None
