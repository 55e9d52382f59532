from __future__ import annotations

import asyncio
import bisect
import heapq
import math
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingestor.budget import (
    BudgetGate,
    BudgetPolicy,
    RequestBudget,
    SendWindow,
    pacing,
    share_of,
)
from ingestor.errors import NoShareError
from tests.fakes import FakeClock, settle

#: Send times that float error puts a hair inside a window edge must not count as a violation.
EDGE = 1e-6


def max_in_window(times: list[float], width: float = 1.0) -> int:
    """The most send times in any half-open window [t, t + width) (windows start at a send time)."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, t + width - EDGE) - i for i, t in enumerate(ordered)),
        default=0,
    )


def simulate(
    budgets: list[RequestBudget],
    starts: list[float],
    duration: float,
    callers: int = 8,
    latency: float = 0.0,
) -> list[float]:
    """Every replica's callers reserve as fast as allowed; returns the merged send times in [0, end)."""
    heap = [(start, r, c) for r, start in enumerate(starts) for c in range(callers)]
    heapq.heapify(heap)
    sends: list[float] = []
    end = starts[0] + duration
    while heap:
        now, r, c = heapq.heappop(heap)
        if now >= end:
            continue
        send_at = now + budgets[r].reserve(now)
        if send_at < end:
            sends.append(send_at)
        heapq.heappush(heap, (send_at + latency, r, c))
    return sends


def replica(total_rps: float, owned: int, total: int, now: float = 0.0, **policy: float) -> RequestBudget:
    budget = RequestBudget(total_rps, now, BudgetPolicy(**{"send_jitter": 0.0, **policy}))
    budget.set_share(owned, total, now)
    return budget


# -- the account-wide guarantee ----------------------------------------------------------------


def test_three_replicas_never_exceed_the_account_budget_and_use_90_percent() -> None:
    budgets = [replica(300, 1, 3) for _ in range(3)]
    sends = simulate(budgets, starts=[0.0, 0.0, 0.0], duration=20.0)
    assert max_in_window(sends) <= 300
    assert len(sends) / 20.0 >= 0.9 * 300


def test_three_replicas_out_of_phase_with_latency() -> None:
    budgets = [replica(300, 1, 3, now=s) for s in (0.0, 0.37, 0.71)]
    sends = simulate(budgets, starts=[0.0, 0.37, 0.71], duration=20.0, callers=3, latency=0.004)
    assert max_in_window(sends) <= 300
    steady = [t for t in sends if 1.0 <= t < 20.0]
    assert len(steady) / 19.0 >= 0.9 * 300


def test_three_replicas_at_live_mode_rate_with_real_bursts() -> None:
    budgets = [replica(10_000, 4, 12) for _ in range(3)]
    assert budgets[0].policy.burst_seconds * budgets[0].rate > 2  # the burst allowance is in play
    sends = simulate(budgets, starts=[0.0, 0.0, 0.0], duration=5.0, callers=32)
    assert max_in_window(sends) <= 10_000
    assert len(sends) / 5.0 >= 0.9 * 10_000


def test_single_replica_200_rps() -> None:
    budget = replica(200, 6, 6)
    sends = simulate([budget], starts=[0.0], duration=20.0)
    assert max_in_window(sends) <= 200
    assert len(sends) / 20.0 >= 0.9 * 200


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 5, 6])
def test_sandbox_budget_holds_for_any_replica_count(replicas: int) -> None:
    budgets = [replica(25, 1, replicas) for _ in range(replicas)]
    sends = simulate(budgets, starts=[0.0] * replicas, duration=20.0, callers=2)
    assert max_in_window(sends) <= 25
    assert sum(b.quota for b in budgets) <= 25


def test_idle_then_backlog_only_bursts_by_the_allowance() -> None:
    budget = replica(1000, 1, 1)
    assert budget.reserve(0.0) == 0.0
    delays = [budget.reserve(50.0) for _ in range(100)]
    free = sum(1 for d in delays if d == 0.0)
    burst = budget.rate * budget.policy.burst_seconds
    assert free == math.floor(burst + 1e-9)
    assert max_in_window([50.0 + d for d in delays]) <= budget.quota


# -- GCRA pacing -----------------------------------------------------------------------------------


def test_concurrent_callers_get_distinct_slots_one_interval_apart() -> None:
    budget = replica(100, 1, 1, burst_seconds=0.0, headroom=0.0)
    assert budget.rate == 100.0
    delays = [budget.reserve(5.0) for _ in range(10)]
    assert delays == pytest.approx([i / 100 for i in range(10)])
    assert budget.reservations_total == 10
    assert budget.waited_seconds_total == pytest.approx(sum(delays))
    assert budget.backlog(5.0) == pytest.approx(0.09)


def test_rate_change_keeps_reserved_slots_and_paces_later_ones_at_the_new_rate() -> None:
    budget = replica(100, 2, 2, burst_seconds=0.0, headroom=0.0)
    first = [budget.reserve(0.0) for _ in range(5)]  # slots 0 .. 0.04, next at 0.05
    budget.set_share(1, 2, 0.0)  # 50/s from now on
    later = [budget.reserve(0.0) for _ in range(3)]
    assert first[-1] == pytest.approx(0.04)
    assert later == pytest.approx([0.05, 0.07, 0.09])


def test_pacing_quota_and_rate() -> None:
    assert pacing(0.0, 0.02) == (0.0, 0)
    assert pacing(-1.0, 0.02) == (0.0, 0)
    assert pacing(0.4, 0.02) == (0.0, 0)  # below 1/s: no quota (rounding up would oversend, see below)
    assert pacing(97.0, 0.02) == pytest.approx((98 / 1.02, 97))
    assert pacing(20.5, 0.02) == (20.0, 20)  # burst of 1: the quota itself
    assert pacing(300 * (1 / 3) * 0.97, 0.02)[1] == 97  # float error does not cost a request


@given(nominal=st.floats(0.01, 50_000), burst_seconds=st.floats(0.0, 0.2))
def test_pacing_rate_fits_the_quota(nominal: float, burst_seconds: float) -> None:
    rate, quota = pacing(nominal, burst_seconds)
    if nominal < 1.0:
        assert (rate, quota) == (0.0, 0)  # never rounded up to one request per second
        return
    burst = max(1.0, rate * burst_seconds)
    assert 0 < rate <= nominal + 1e-9
    assert quota <= max(1, nominal + 1e-9)
    assert math.ceil(rate + burst - 1 - 1e-9) <= quota


@settings(deadline=None, max_examples=200)
@given(
    total_rps=st.floats(1.0, 5_000.0),
    share=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    burst_seconds=st.floats(0.0, 0.1),
    gaps=st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.01), st.floats(0.0, 2.0)), min_size=1, max_size=400),
)
def test_any_one_second_window_holds_at_most_the_quota(
    total_rps: float, share: tuple[int, int], burst_seconds: float, gaps: list[float]
) -> None:
    owned, total = share
    budget = replica(total_rps, owned, total, burst_seconds=burst_seconds)
    if budget.quota == 0:  # a share below one request/s: nothing at all, rather than one too many
        with pytest.raises(NoShareError):
            budget.reserve(0.0)
        return
    now, sends = 0.0, []
    for gap in gaps:
        now += gap
        sends.append(now + budget.reserve(now))
    assert max_in_window(sends) <= budget.quota
    assert sends == sorted(sends)


@settings(deadline=None, max_examples=200)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(0.0, 0.5),
            st.sampled_from(["reserve", "reserve", "reserve", "share", "429"]),
            st.integers(1, 6),
        ),
        min_size=1,
        max_size=300,
    )
)
def test_rate_changes_never_break_the_bound_of_the_fastest_rate(steps: list[tuple[float, str, int]]) -> None:
    budget = replica(400, 3, 6)
    now, sends, fastest = 0.0, [], budget.rate
    for gap, action, owned in steps:
        now += gap
        if action == "share":
            budget.set_share(owned, 6, now)
        elif action == "429":
            budget.on_rate_limited(now)
        else:
            delay = budget.reserve(now)
            assert delay >= 0.0
            sends.append(now + delay)
        fastest = max(fastest, budget.rate)
    # send_j ≥ send_i + (j - i)/rate_max - burst_seconds, so n ≤ ceil((1 + burst_seconds) · rate_max)
    assert max_in_window(sends) <= math.ceil((1 + budget.policy.burst_seconds) * fastest + 1e-9)


# -- share -------------------------------------------------------------------------------------------


def test_share_of() -> None:
    assert share_of(0, 12) == 0.0
    assert share_of(0, 0) == 0.0
    assert share_of(3, 12) == 0.25
    assert share_of(5, 0) == 1.0  # owning partitions of an unknown total: take it all
    assert share_of(5, -1) == 1.0
    assert share_of(13, 12) == 1.0


def test_set_share_scales_the_rate() -> None:
    budget = RequestBudget(1000, 0.0, BudgetPolicy(headroom=0.1, burst_seconds=0.0, send_jitter=0.0))
    assert budget.rate == 0.0
    assert not budget.has_share
    budget.set_share(1, 4, 0.0)
    assert (budget.share, budget.nominal_rate, budget.rate, budget.quota) == (0.25, 225.0, 225.0, 225)
    budget.set_share(2, 4, 1.0)
    assert budget.rate == 450.0
    budget.set_share(3, 0, 2.0)
    assert budget.rate == 900.0
    budget.set_share(0, 4, 3.0)
    assert budget.rate == 0.0
    with pytest.raises(NoShareError):
        budget.reserve(3.0)
    with pytest.raises(ValueError, match="negative"):
        budget.set_share(-1, 4, 3.0)


def test_a_fresh_budget_owns_nothing() -> None:
    with pytest.raises(NoShareError):
        RequestBudget(100, 0.0).reserve(0.0)


@pytest.mark.parametrize("total_rps", [0, -5, math.nan, math.inf])
def test_total_rps_must_be_positive(total_rps: float) -> None:
    with pytest.raises(ValueError, match="total_rps"):
        RequestBudget(total_rps, 0.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("headroom", 1.0),
        ("headroom", -0.1),
        ("burst_seconds", -1.0),
        ("decrease_factor", 1.0),
        ("decrease_factor", 0.0),
        ("min_factor", 0.0),
        ("decrease_cooldown", -1.0),
        ("recovery_per_s", -0.1),
    ],
)
def test_policy_rejects_out_of_range_values(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        BudgetPolicy(**{name: value})


# -- AIMD --------------------------------------------------------------------------------------------


def aimd_budget() -> RequestBudget:
    return replica(1000, 1, 1, headroom=0.0, burst_seconds=0.0, recovery_per_s=0.1, min_factor=0.1)


def test_a_burst_of_429s_halves_once_per_cooldown() -> None:
    budget = aimd_budget()
    assert budget.on_rate_limited(10.0)
    assert [budget.on_rate_limited(10.0 + i * 0.1) for i in range(1, 10)] == [False] * 9
    assert budget.factor == pytest.approx(0.5 + 0.1 * 0.9)  # recovered for 0.9 s meanwhile
    assert budget.rate_limited_total == 10
    assert budget.decreases_total == 1
    assert budget.on_rate_limited(11.0)
    assert budget.factor == pytest.approx((0.5 + 0.1) * 0.5)
    assert budget.decreases_total == 2


def test_decrease_has_a_floor() -> None:
    budget = replica(1000, 1, 1, headroom=0.0, burst_seconds=0.0, recovery_per_s=0.0, min_factor=0.1)
    for i in range(20):
        budget.on_rate_limited(float(i))
    assert budget.factor == pytest.approx(0.1)
    assert budget.rate == pytest.approx(100.0)


def test_recovery_is_linear_and_capped() -> None:
    budget = aimd_budget()
    budget.on_rate_limited(0.0)
    assert budget.rate == pytest.approx(500.0)
    budget.reserve(2.0)
    assert budget.factor == pytest.approx(0.7)
    assert budget.rate == pytest.approx(700.0)
    budget.utilization(4.0)
    assert budget.factor == pytest.approx(0.9)
    budget.reserve(60.0)
    assert budget.factor == 1.0
    assert budget.rate == 1000.0


def test_decrease_slows_later_reservations_only() -> None:
    budget = aimd_budget()
    budget.reserve(0.0)
    budget.on_rate_limited(0.0)
    assert budget.reserve(0.0) == pytest.approx(0.001)  # the slot reserved at 1000/s stays
    assert budget.reserve(0.0) == pytest.approx(0.003)  # then 500/s


# -- utilization and saturation ----------------------------------------------------------------------


def test_backlogged_replica_is_saturated() -> None:
    budget = replica(300, 1, 3)
    simulate([budget], starts=[0.0], duration=12.0)
    assert budget.utilization(12.0) == pytest.approx(1.0, abs=0.02)
    assert budget.waiting_fraction(12.0) > 0.95
    assert budget.saturated(12.0)


def test_lightly_loaded_replica_is_not_saturated() -> None:
    budget = replica(300, 1, 3)
    now = 0.0
    while now < 12.0:
        budget.reserve(now)
        now += 1 / 50  # 50 req/s of a ~97 req/s budget, evenly spaced
    assert budget.utilization(12.0) == pytest.approx(50 / budget.rate, rel=0.05)
    assert budget.waiting_fraction(12.0) == 0.0
    assert not budget.saturated(12.0)


def test_self_paced_worker_just_under_the_rate_is_saturated_by_utilization() -> None:
    budget = replica(100, 1, 1, burst_seconds=0.0)
    now = 0.0
    while now < 12.0:
        assert budget.reserve(now) == 0.0  # never waits ...
        now += 1 / (0.97 * budget.rate)
    assert budget.waiting_fraction(12.0) == 0.0
    assert budget.saturated(12.0)  # ... yet uses ≥ 95 % of what it may


def test_sequential_caller_waiting_on_a_slow_budget_is_saturated() -> None:
    budget = replica(10, 1, 1, burst_seconds=0.0, headroom=0.0)
    now = 0.0
    while now < 12.0:
        now += budget.reserve(now) + 0.01  # wait for the slot, then a 10 ms request
    assert budget.waiting_fraction(now) == pytest.approx(0.9, abs=0.02)
    assert budget.saturated(now)


def test_saturation_follows_the_window_and_needs_data() -> None:
    budget = replica(300, 1, 3)
    assert not budget.saturated(0.5)  # too little observed
    simulate([budget], starts=[0.0], duration=10.0)
    assert budget.saturated(10.0)
    assert not budget.saturated(25.0)  # idle for longer than the window since
    assert budget.utilization(25.0) == 0.0


def test_a_replica_without_share_is_never_saturated() -> None:
    budget = replica(300, 1, 3)
    simulate([budget], starts=[0.0], duration=10.0)
    budget.set_share(0, 3, 10.0)
    assert not budget.saturated(10.5)


def test_utilization_uses_the_allowed_requests_across_rate_changes() -> None:
    budget = replica(100, 1, 1, headroom=0.0, burst_seconds=0.0)
    simulate([budget], starts=[0.0], duration=10.0)
    budget.on_rate_limited(10.0)  # half the rate from now on; the window still remembers 100/s
    assert budget.utilization(10.0) == pytest.approx(1.0, abs=0.02)
    assert budget.saturated(10.0)


def test_time_going_backwards_is_harmless() -> None:
    budget = replica(100, 1, 1)
    budget.reserve(10.0)
    assert budget.reserve(9.0) >= 0.0
    assert budget.utilization(9.5) >= 0.0


# -- the async gate ------------------------------------------------------------------------------------


async def test_gate_sleeps_for_the_slot() -> None:
    clock = FakeClock(start=0.0)
    gate = BudgetGate(replica(10, 1, 1, headroom=0.0, burst_seconds=0.0), clock)
    done: list[float] = []

    async def send() -> None:
        await gate.acquire()
        done.append(clock.monotonic())

    tasks = [asyncio.create_task(send()) for _ in range(3)]
    await clock.advance(0.25)
    await asyncio.gather(*tasks)
    assert done == pytest.approx([0.0, 0.1, 0.2])


async def test_gate_without_share_waits_until_a_share_is_set() -> None:
    clock = FakeClock(start=0.0)
    gate = BudgetGate(RequestBudget(100, 0.0), clock)
    waiter = asyncio.create_task(gate.acquire())
    await clock.advance(5.0)
    assert not waiter.done()
    gate.set_share(1, 2)
    await settle()
    assert waiter.done()
    await waiter
    assert gate.budget.reservations_total == 1


async def test_gate_share_lost_again_before_the_waiter_runs() -> None:
    clock = FakeClock(start=0.0)
    gate = BudgetGate(RequestBudget(100, 0.0), clock)
    waiter = asyncio.create_task(gate.acquire())
    await settle()
    gate.set_share(1, 2)
    gate.set_share(0, 2)  # revoked before the waiter got to run
    await settle()
    assert not waiter.done()
    gate.set_share(2, 2)
    await settle()
    await waiter


async def test_gate_wait_for_share_is_cancellation_safe() -> None:
    clock = FakeClock(start=0.0)
    gate = BudgetGate(RequestBudget(100, 0.0), clock)
    waiter = asyncio.create_task(gate.acquire())
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.set_share(1, 1)
    await gate.acquire()
    assert gate.budget.reservations_total == 1


async def test_gate_with_the_real_clock() -> None:
    gate = BudgetGate(RequestBudget(1000, time.monotonic()))
    gate.set_share(1, 1)
    await asyncio.gather(*(gate.acquire() for _ in range(20)))
    assert gate.budget.reservations_total == 20
    gate.on_rate_limited()
    assert gate.budget.decreases_total == 1
    assert gate.utilization() >= 0.0
    assert not gate.saturated()


async def test_gate_callers_waking_late_take_new_slots_instead_of_bursting() -> None:
    clock = FakeClock(start=0.0)
    gate = BudgetGate(replica(10, 1, 1, headroom=0.0, burst_seconds=0.0), clock)
    sent: list[float] = []

    async def send() -> None:
        await gate.acquire()
        sent.append(clock.monotonic())

    tasks = [asyncio.create_task(send()) for _ in range(5)]
    await settle()  # slots at 0.0 .. 0.4 are reserved; the first caller sends at once
    clock.now += 2.0  # the process is starved for 2 s: every other slot passes unseen
    await clock.advance(1.0)
    await asyncio.gather(*tasks)
    late = sent[1:]
    assert late == pytest.approx([2.0, 2.1, 2.2, 2.3])  # paced again, not four at once


@settings(max_examples=200, deadline=None)
@given(
    quota=st.integers(min_value=1, max_value=30),
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.3), min_size=1, max_size=300),
)
def test_send_window_never_lets_a_second_hold_more_than_the_quota(quota: int, gaps: list[float]) -> None:
    window = SendWindow()
    now, sends = 0.0, []
    for gap in gaps:
        now += gap
        now += window.delay(now, quota)
        assert window.delay(now, quota) == 0.0
        window.record(now)
        sends.append(now)
    for i, start in enumerate(sends):
        assert sum(1 for t in sends[i:] if t < start + 1.0) <= quota


@settings(deadline=None, max_examples=150)
@given(
    quota=st.integers(1, 400),
    gaps=st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.01), st.floats(0.0, 1.5)), min_size=1, max_size=300),
    delays=st.lists(st.floats(0.0, 0.0999), min_size=1, max_size=300),
)
@example(quota=1, gaps=[0.0, 0.0], delays=[0.09, 0.0])
@example(quota=97, gaps=[0.0] * 200, delays=[0.09] * 97 + [0.0] * 103)
def test_sends_delayed_on_their_way_to_the_wire_still_fit_every_second(
    quota: int, gaps: list[float], delays: list[float]
) -> None:
    """A request reaches the wire a varying while after the gate (the loop was busy): before, a quota of 291
    per 1-second window at the gate measured 306 in one second at the emulator."""
    budget = RequestBudget(1000, 0.0, BudgetPolicy(headroom=0.0))
    budget.set_quota(quota, 0.0)
    now, wire = 0.0, []
    for i, gap in enumerate(gaps):
        now += gap
        wire.append(now + budget.reserve(now) + delays[i % len(delays)])
    assert max_in_window(wire) <= quota
