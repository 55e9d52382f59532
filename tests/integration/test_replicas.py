"""Several replicas in one consumer group share one request budget; a killed replica is replaced."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from ingestor_dev.devkafka import produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from ingestor_dev.wiretap import WireTap
from tests.integration.harness import (
    StripeApi,
    ensure_topic,
    start_worker_process,
    stop_process,
    wait_for,
    worker_env,
)
from tests.integration.test_pipeline import assert_committed_to_end, assert_totals, create_meters, usage

pytestmark = pytest.mark.kafka

BUDGET = 300


@pytest.mark.timeout(240)
async def test_three_replicas_share_one_budget_and_survive_a_kill(kafka_bootstrap, topic_factory, tmp_path):
    topic = await topic_factory(6, "replicas")
    values, totals = usage(36_000, seed=17)
    await produce(kafka_bootstrap, topic, values)
    config = EmulatorConfig(stream_rps_limit=0, trust_arrival_header=True)
    async with Emulator(config, host="127.0.0.1", port=0) as emu, WireTap(emu.url, stamp=True) as tap:
        api = StripeApi(emu.url)
        meter_ids = await create_meters(api)
        env = worker_env(
            kafka_bootstrap, topic, tap.url, INGESTOR_RPS_BUDGET=str(BUDGET), INGESTOR_BATCH_MAX_EVENTS="4"
        )
        await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        procs = [start_worker_process(env, str(tmp_path / f"worker-{i}.log")) for i in range(3)]
        try:
            # Let the group settle (every replica owns two partitions), then measure a steady stretch.
            await asyncio.sleep(12)
            steady_from = time.time()
            await asyncio.sleep(10)
            steady_to = time.time()
            procs[0].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs[0].wait, 10)

            async def all_accepted() -> bool:
                return (await api.stats())["events_accepted"] >= len(values)

            await wait_for(all_accepted, 150, "the surviving replicas to deliver everything")
            await assert_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
        finally:
            for proc in procs[1:]:
                if proc.poll() is None:
                    await asyncio.to_thread(stop_process, proc, signal.SIGTERM, 40)
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        stats = await api.stats()
        await assert_totals(api, meter_ids, totals)
    assert [p.returncode for p in procs[1:]] == [0, 0]
    assert stats["events_accepted"] == stats["unique_identifiers"] == len(values)
    # Never more than the account's budget in any 1-second window on the wire, all replicas together.
    wire = tap.arrivals()
    assert wire.max_in_window() <= BUDGET, wire.per_second()
    # While the backlog lasted and all three ran, they used at least 85% of it between them (the budget less
    # its 3% headroom, paced over 1.1-second windows so that delays on the way to the wire fit: 88%).
    per_second = wire.per_second()
    steady = [n for second, n in per_second.items() if steady_from + 1 <= second <= steady_to - 1]
    assert len(steady) >= 7, per_second
    assert sum(steady) / len(steady) >= 0.85 * BUDGET, steady
