"""The demand exchange's pure core: fair grants, settling, freshness, expiry and the cut-off fallback."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor.budget import BudgetPolicy, RequestBudget
from ingestor.demand import (
    MAX_CLOCK_SKEW_S,
    ROTATION_S,
    DemandBook,
    Inputs,
    MinWindow,
    Mode,
    Timing,
    budget_units,
    epochs_near,
    fair_grants,
    priority,
)
from ingestor.exchange import DemandMeter

TIMING = Timing(interval=0.5, send_timeout=5.0)  # settle 2 s, ttl 5 s

demand_maps = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3), st.integers(0, 400), max_size=12)


# -- fair_grants -------------------------------------------------------------------------------------


@given(units=st.integers(0, 400), demands=demand_maps, epoch=st.integers(0, 5))
def test_grants_never_sum_above_the_units_nor_above_a_demand(units: int, demands: dict[str, int], epoch: int) -> None:
    grants = fair_grants(units, demands, priority(sorted(demands), epoch))
    assert sum(grants.values()) <= units
    assert all(0 <= grants[m] <= demands[m] for m in demands)
    # nothing is left idle while someone wants more
    if sum(demands.values()) >= units:
        assert sum(grants.values()) == units


@given(units=st.integers(1, 400), demand=st.integers(0, 1000), idle=st.integers(0, 8))
def test_a_lone_demander_gets_everything_the_idle_leave(units: int, demand: int, idle: int) -> None:
    demands = {"busy": demand} | {f"idle{i}": 0 for i in range(idle)}
    assert fair_grants(units, demands, sorted(demands))["busy"] == min(units, demand)


def test_max_min_fairness() -> None:
    grants = fair_grants(291, {"a": 291, "b": 291, "c": 5}, ["a", "b", "c"])
    assert grants == {"a": 143, "b": 143, "c": 5}
    # more busy replicas than units: one each, in priority order
    grants = fair_grants(4, dict.fromkeys("abcdef", 4), list("fedcba"))
    assert grants == {"f": 1, "e": 1, "d": 1, "c": 1, "b": 0, "a": 0}


@settings(max_examples=300)
@given(
    units=st.integers(0, 100),
    demands=demand_maps,
    member=st.sampled_from("abc"),
    more=st.integers(0, 100),
    epoch=st.integers(0, 3),
)
def test_a_grant_never_rises_when_another_member_wants_more(
    units: int, demands: dict[str, int], member: str, more: int, epoch: int
) -> None:
    """The monotonicity the whole-budget proof rests on (see ingestor.demand)."""
    demands = {**demands, member: demands.get(member, 10), "other": demands.get("other", 0)}
    order = priority(sorted(demands), epoch)
    before = fair_grants(units, demands, order)[member]
    after = fair_grants(units, {**demands, "other": demands["other"] + more}, order)[member]
    assert after <= before
    assert fair_grants(units + more, demands, order)[member] >= before  # and never falls with a larger pool


def test_leftover_units_rotate_between_epochs() -> None:
    members = [f"r{i}" for i in range(6)]
    winners = set()
    for epoch in range(40):
        grants = fair_grants(4, dict.fromkeys(members, 4), priority(members, epoch))
        winners |= {m for m, g in grants.items() if g}
    assert winners == set(members)


def test_epochs_near_a_boundary_cover_both_sides() -> None:
    assert epochs_near(5 * ROTATION_S + 3) == {5}
    assert epochs_near(5 * ROTATION_S + MAX_CLOCK_SKEW_S / 2) == {4, 5}


def test_budget_units() -> None:
    assert budget_units(300, 0.03) == 291
    assert budget_units(5, 0.03) == 4
    assert budget_units(1, 0.03) == 1  # a budget of one stays usable
    assert budget_units(100, 0.0) == 100


def test_min_window() -> None:
    w = MinWindow(2.0, 0, 0.0)
    w.set(10, 1.0)
    assert w.min(2.9) == 0  # 0 was still in effect at 0.9
    assert w.min(3.0) == 10
    w.set(3, 3.5)
    assert w.min(3.5) == 3  # lower at once


# -- the book: several replicas, one shared log ------------------------------------------------------


class Log:
    """The demand topic's single partition, with every replica's read position."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, int] | None]] = []
        self.read: dict[str, int] = {}

    def append(self, member: str, value: dict[str, int] | None) -> None:
        self.records.append((member, value))

    def deliver(self, book: DemandBook, now: float) -> None:
        start = self.read.get(book.member, 0)
        for member, value in self.records[start:]:
            book.received(member, value, now)
        self.read[book.member] = len(self.records)


def publish(log: Log, book: DemandBook, demand: int, owned: int, now: float) -> None:
    value = book.next_record(demand, owned, now)
    log.append(book.member, value)
    book.acked(value["seq"], now)


def test_a_lone_replica_takes_the_pool_only_after_settling() -> None:
    log, book = Log(), DemandBook("a", TIMING, 0.0)
    inputs = Inputs(demand=291, owned=6, partitions=6, units=291)
    assert book.decide(inputs, 0.0, 0.0).quota == 0  # not fresh: no echo yet
    quotas = []
    for step in range(1, 60):
        now = step * 0.1
        if step % 5 == 0:
            publish(log, book, 291, 6, now)
        log.deliver(book, now)
        quotas.append((now, book.decide(inputs, now, 100.0).quota))
    assert all(q == 0 for t, q in quotas if t < TIMING.settle + 0.5)
    assert quotas[-1][1] == 291


def run_replicas(
    demands: dict[str, list[int]], steps: int, *, units: int = 291, read_every: list[int] | None = None
) -> list[int]:
    """Replicas publishing every 0.5 s and reading the log every `read_every[i]` ticks of 0.1 s (a lagging
    reader); returns, for every tick t, Σ over replicas of their largest quota in the second up to t."""
    log, partitions = Log(), 6
    books = {m: DemandBook(m, TIMING, 0.0) for m in demands}
    owned = partitions // len(demands)
    lags = read_every or [1] * len(demands)
    history: list[dict[str, int]] = []
    for step in range(1, steps):
        now = step * 0.1
        quotas = {}
        for i, (m, book) in enumerate(books.items()):
            want = demands[m][min(step // 50, len(demands[m]) - 1)]
            if step % 5 == i % 5:
                publish(log, book, want, owned, now)
            if step % lags[i] == 0:
                log.deliver(book, now)
            quotas[m] = book.decide(Inputs(want, owned, partitions, units), now, 1000.0 + now).quota
        history.append(quotas)
    return [sum(max(q[m] for q in history[max(0, t - 9) : t + 1]) for m in books) for t in range(len(history))]


def test_demand_follows_the_work_and_never_over_grants() -> None:
    # one busy replica, then the others wake up, then the busy one goes idle
    sums = run_replicas({"a": [291, 291, 291, 0], "b": [0, 291, 291, 291], "c": [0, 0, 291, 291]}, 200)
    assert max(sums) <= 291
    assert sums[45] >= 280  # the busy one alone used (nearly) everything


@settings(deadline=None, max_examples=80)
@given(
    plan=st.lists(st.lists(st.sampled_from([0, 1, 3, 50, 291]), min_size=1, max_size=5), min_size=2, max_size=5),
    units=st.sampled_from([4, 97, 291]),
    read_every=st.lists(st.integers(1, 12), min_size=5, max_size=5),
)
def test_changing_demands_never_over_grant_in_any_second(
    plan: list[list[int]], units: int, read_every: list[int]
) -> None:
    sums = run_replicas({f"r{i}": p for i, p in enumerate(plan)}, 250, units=units, read_every=read_every)
    assert max(sums) <= units


def test_a_stale_picture_grants_nothing() -> None:
    log, book = Log(), DemandBook("a", TIMING, 0.0)
    inputs = Inputs(100, 1, 1, 100)
    for step in range(1, 40):
        now = step * 0.1
        if step % 5 == 0:
            publish(log, book, 100, 1, now)
        log.deliver(book, now)
        book.decide(inputs, now, now)
    assert book.decide(inputs, 3.9, 3.9).quota > 0
    # the reader stops (publishing goes on): within `settle` of the last echo the grant is gone
    for step in range(40, 70):
        now = step * 0.1
        publish(log, book, 100, 1, now)
        decision = book.decide(inputs, now, now)
    assert decision.quota == 0


def test_a_crashed_peer_expires_and_a_stopped_peer_leaves_at_once() -> None:
    log, a = Log(), DemandBook("a", TIMING, 0.0)
    log.append("b", {"seq": 1, "demand": 291, "owned": 3})
    log.append("c", {"seq": 1, "demand": 291, "owned": 0})
    log.deliver(a, 0.0)
    assert set(a.live_peers(1.0)) == {"b", "c"}
    log.append("c", None)  # c stopped cleanly
    log.deliver(a, 1.0)
    assert set(a.live_peers(1.0)) == {"b"}
    assert set(a.live_peers(TIMING.ttl + 0.01)) == set()  # b went silent: expired


def test_a_cut_off_replica_waits_until_forgotten_then_paces_at_its_partition_share() -> None:
    book = DemandBook("a", TIMING, 0.0)
    inputs = Inputs(100, 2, 6, 100)
    book.next_record(100, 2, 0.0)  # written, never echoed: the topic cannot be read
    modes = []
    for step in range(1, 200):
        now = step * 0.1
        decision = book.decide(inputs, now, now)
        modes.append((now, decision.mode, decision.quota))
    leaving = [t for t, m, _ in modes if m is Mode.LEAVING]
    fallback = [t for t, m, _ in modes if m is Mode.FALLBACK]
    assert leaving
    assert min(leaving) >= TIMING.ttl - 1e-9
    # no tombstone acknowledged: wait for the peers to expire it, whatever they last read
    assert min(fallback) >= TIMING.send_timeout + TIMING.settle + TIMING.ttl - 1e-9
    assert all(q == 0 for _, _, q in modes)  # the fallback share is the gate's, not a grant


def test_an_acknowledged_tombstone_shortens_the_wait() -> None:
    book = DemandBook("a", TIMING, 0.0)
    inputs = Inputs(100, 2, 6, 100)
    for step in range(1, 60):
        book.decide(inputs, step * 0.1, 0.0)
    assert book.mode is Mode.LEAVING
    book.tombstone_acked(6.0)
    assert book.decide(inputs, 6.0 + TIMING.settle - 0.01, 0.0).mode is Mode.LEAVING
    assert book.decide(inputs, 6.0 + TIMING.settle, 0.0).mode is Mode.FALLBACK


def test_peers_reserve_the_partitions_of_replicas_they_do_not_see() -> None:
    log, a = Log(), DemandBook("a", TIMING, 0.0)
    inputs = Inputs(291, 2, 6, 291)
    for step in range(1, 40):
        now = step * 0.1
        if step % 5 == 0:
            publish(log, a, 291, 2, now)
        log.deliver(a, now)
        quota = a.decide(inputs, now, 100.0).quota
    assert quota == 97  # 4 of 6 partitions are owned by nobody a can see: their slice stays free


def test_sub_one_shares_no_longer_round_up() -> None:
    """30 replicas, one partition each, on a sandbox's 25 requests/s: before, each took a quota of one."""
    quotas = []
    for _ in range(30):
        budget = RequestBudget(25, 0.0, BudgetPolicy())
        budget.set_share(1, 30, 0.0)
        quotas.append(budget.quota)
    assert sum(quotas) <= 25


# -- demand ------------------------------------------------------------------------------------------


def test_demand_meter() -> None:
    meter = DemandMeter(0.0)
    assert meter.demand(291, 0.0) == 0
    meter.sample(10, blocked=False, now=1.0)
    meter.sample(20, blocked=False, now=2.0)
    assert meter.demand(291, 2.0) == 13  # 10/s used, asks 25 % more
    meter.sample(30, blocked=True, now=2.5)
    assert meter.demand(291, 2.5) == 291
    assert meter.demand(291, 4.4) == 291
    meter.sample(30, blocked=False, now=4.6)
    assert meter.demand(291, 4.6) < 291
