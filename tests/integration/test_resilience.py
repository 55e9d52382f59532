"""The worker under token rotation, revocation, a request budget, SIGKILL and SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from ingestor_dev.devkafka import committed_offsets, produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from ingestor_dev.wiretap import WireTap
from tests.integration.harness import (
    StripeApi,
    ensure_topic,
    running_worker,
    start_worker_process,
    stop_process,
    wait_for,
    worker_env,
)
from tests.integration.test_pipeline import assert_committed_to_end, assert_totals, create_meters, usage

pytestmark = pytest.mark.kafka

STREAM = "/v2/billing/meter_event_stream"


def stream_status(stats: dict, status: int) -> int:
    return int(stats["requests"].get(STREAM, {}).get(str(status), 0))


async def accepted_at_least(api: StripeApi, n: int) -> bool:
    return (await api.stats())["events_accepted"] >= n


async def test_tokens_rotate_before_expiry_and_a_revoked_session_is_recovered(kafka_bootstrap, topic_factory):
    topic = await topic_factory(3, "rotate")
    values, totals = usage(20_000, seed=11)
    async with Emulator(EmulatorConfig(session_ttl=3.0, stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_ids = await create_meters(api)
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_SESSION_REFRESH_MARGIN_S="1")
        async with running_worker(env) as worker:
            started = time.monotonic()
            for second in range(20):  # a steady stream over 20 s
                await produce(kafka_bootstrap, topic, values[second * 1000 : (second + 1) * 1000])
                if second == 10:
                    before_revoke = stream_status(await api.stats(), 401)
                    await api.revoke_sessions()
                await asyncio.sleep(max(0.0, started + second + 1 - time.monotonic()))
            await wait_for(lambda: accepted_at_least(api, len(values)), 60, "every event accepted")
            await assert_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
            assert worker.sessions is not None
            rotations = worker.sessions.rotations_total
        stats = await api.stats()
        await assert_totals(api, meter_ids, totals)
    # 20 s with a 3 s lifetime: at least 6 sessions, and no 401 before the revocation (rotated in time).
    assert rotations >= 6
    assert stats["sessions_created"] >= 6
    assert before_revoke == 0
    # The revocation cost at most one 401 per request in flight, then a new session carried on.
    assert 1 <= stream_status(stats, 401) <= int(env.get("INGESTOR_MAX_IN_FLIGHT", "64"))
    assert stats["events_accepted"] == stats["unique_identifiers"] == len(values)


SESSIONS = "/v2/billing/meter_event_session"


def session_attempts(stats: dict) -> int:
    return sum(int(n) for n in stats["requests"].get(SESSIONS, {}).values())


async def test_401s_while_session_creation_fails_keep_the_worker_running_and_bill_once(kafka_bootstrap, topic_factory):
    topic = await topic_factory(3, "reauth")
    values, totals = usage(6_000, seed=13)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_ids = await create_meters(api)
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_DRAIN_TIMEOUT_S="2")
        async with running_worker(env) as worker:
            await produce(kafka_bootstrap, topic, values[:2_000])
            await wait_for(lambda: accepted_at_least(api, 2_000), 60, "the first events accepted")
            # Session creation (and every other call) fails 95% of the time, and the live session is
            # revoked: the 5% of stream requests that get through are answered 401.
            await api.set_faults(error_no_header=0.95, scope="all")
            await api.revoke_sessions()
            before = await api.stats()
            await produce(kafka_bootstrap, topic, values[2_000:])
            await asyncio.sleep(8)  # four times the drain deadline: a dead sender would have stopped it
            during = await api.stats()
            assert worker.health.running, "the worker stopped during the outage"
            await api.set_faults(replace=True)
            await wait_for(lambda: accepted_at_least(api, len(values)), 60, "every event accepted after recovery")
            await assert_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
            assert worker.health.running
        stats = await api.stats()
        await assert_totals(api, meter_ids, totals)
    assert stream_status(during, 401) > stream_status(before, 401)  # the outage did produce 401s
    # Creations followed the session backoff, not the 401s (one attempt per refusal would be hundreds).
    assert session_attempts(during) - session_attempts(before) <= 30
    assert stats["events_accepted"] == stats["unique_identifiers"] == len(values)


async def test_budget_of_200_requests_per_second_is_respected_and_used(kafka_bootstrap, topic_factory):
    topic = await topic_factory(4, "budget")
    values, _ = usage(16_000, seed=5)
    await produce(kafka_bootstrap, topic, values)
    config = EmulatorConfig(stream_rps_limit=0, trust_arrival_header=True)
    async with Emulator(config, host="127.0.0.1", port=0) as emu, WireTap(emu.url, stamp=True) as tap:
        api = StripeApi(emu.url)
        await create_meters(api)
        env = worker_env(kafka_bootstrap, topic, tap.url, INGESTOR_RPS_BUDGET="200", INGESTOR_BATCH_MAX_EVENTS="2")
        async with running_worker(env) as worker:
            await asyncio.sleep(12)  # well into the backlog: the budget, not the worker, is the limit
            saturated_midway = worker.budget.saturated(worker.clock.monotonic())
            utilization_midway = worker.budget.utilization(worker.clock.monotonic())
            await wait_for(lambda: accepted_at_least(api, len(values)), 90, "every event accepted")
            waited = worker.budget.waited_seconds_total
    # The budget metrics say so: saturated, fully used, requests waiting for their slots.
    assert saturated_midway
    assert utilization_midway >= 0.9
    assert waited > 0
    wire = tap.arrivals()  # counted on the wire: the emulator shares its loop with this worker
    per_second = sorted(wire.per_second().items())
    assert wire.max_in_window() <= 200, per_second
    # Full seconds while the backlog lasted (drop the first and the last, partial ones): at least 85 % of the
    # budget (194 per 1-second window after the 3 % headroom, paced over 1.1-second windows so that delays on
    # the way to the wire fit: 176/s, 88 %).
    full = [n for _, n in per_second[1:-1]]
    assert len(full) >= 20
    assert sum(full) / len(full) >= 0.85 * 200, per_second


async def test_sigkill_mid_run_then_restart_bills_every_event_once(kafka_bootstrap, topic_factory, tmp_path):
    topic = await topic_factory(6, "kill")
    values, totals = usage(60_000, seed=3, with_ids=0.3)
    await produce(kafka_bootstrap, topic, values)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_ids = await create_meters(api)
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_RPS_BUDGET="150", INGESTOR_COMMIT_INTERVAL_MS="500")
        log = str(tmp_path / "worker.log")
        await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        first = start_worker_process(env, log)
        try:
            await wait_for(lambda: accepted_at_least(api, 10_000), 60, "the first worker to deliver")
        finally:
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
        killed_at = (await api.stats())["events_accepted"]
        assert killed_at < len(values), "the worker finished before it was killed; the test proves nothing"
        second = start_worker_process({**env, "INGESTOR_RPS_BUDGET": "2000"}, log)
        try:
            await wait_for(lambda: accepted_at_least(api, len(values)), 90, "the restarted worker to finish")
            await assert_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
        finally:
            assert await asyncio.to_thread(stop_process, second, signal.SIGTERM, 30) == 0
        stats = await api.stats()
        await assert_totals(api, meter_ids, totals)
    assert stats["events_accepted"] == stats["unique_identifiers"] == len(values)


async def test_sigterm_mid_run_drains_commits_and_exits_zero(kafka_bootstrap, topic_factory, tmp_path):
    topic = await topic_factory(3, "term")
    values, _ = usage(60_000, seed=9, with_ids=0.0)
    await produce(kafka_bootstrap, topic, values)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        await create_meters(api)
        drain = 15
        env = worker_env(
            kafka_bootstrap, topic, emu.url, INGESTOR_RPS_BUDGET="100", INGESTOR_DRAIN_TIMEOUT_S=str(drain)
        )
        await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        proc = start_worker_process(env, str(tmp_path / "worker.log"))
        try:
            await wait_for(lambda: accepted_at_least(api, 5_000), 60, "the worker to deliver")
        except BaseException:
            proc.kill()
            raise
        asked = time.monotonic()
        code = await asyncio.to_thread(stop_process, proc, signal.SIGTERM, drain + 10)
        took = time.monotonic() - asked
        stats = await api.stats()
        committed = await committed_offsets(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
    assert code == 0
    assert took <= drain + 5
    # Everything the worker took in was delivered and committed: what Stripe accepted is exactly
    # the records below the committed offsets (identifiers derive from offsets, so none is double).
    assert stats["events_accepted"] < len(values)
    assert sum(committed.values()) == stats["events_accepted"] == stats["unique_identifiers"]
