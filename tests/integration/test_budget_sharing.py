"""Replicas share the account's budget by demand (the demand exchange), measured at the emulator."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from ingestor import settings
from ingestor.demand import Mode
from ingestor.worker import Worker
from ingestor_dev.devkafka import committed_offsets, produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from ingestor_dev.wiretap import Arrivals, WireTap
from tests.integration.harness import (
    StripeApi,
    end_offsets,
    ensure_topic,
    running_worker,
    start_worker_process,
    stop_process,
    wait_for,
    worker_env,
)
from tests.integration.test_pipeline import assert_committed_to_end, assert_totals, create_meters, usage

pytestmark = pytest.mark.kafka


async def assert_partition_committed_to_end(bootstrap: str, group: str, topic: str, partition: int) -> None:
    end = (await end_offsets(bootstrap, topic))[partition]

    async def at_end() -> bool:
        return (await committed_offsets(bootstrap, group, topic)).get(partition) == end

    await wait_for(at_end, 30, f"the committed offset at the end of partition {partition}")


#: the emulator behind a wire tap, which counts the replicas' requests as the kernel received them
WIRED = EmulatorConfig(stream_rps_limit=0, trust_arrival_header=True)


async def run_replicas(
    kafka_bootstrap, topic, tmp_path, api, values, *, tap, replicas: int, budget: int, batch: int, partition: int | None
) -> tuple[float, float]:
    """Start `replicas` workers (talking to Stripe through `tap`), let them join, produce `values` (to one
    `partition`, or spread), wait until everything is accepted and committed; returns (when producing ended,
    when the last event was accepted)."""
    env = worker_env(
        kafka_bootstrap,
        topic,
        tap.url,
        INGESTOR_RPS_BUDGET=str(budget),
        INGESTOR_BATCH_MAX_EVENTS=str(batch),
        INGESTOR_BUDGET_TOPIC=f"{topic}.budget",
    )
    await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
    procs = [start_worker_process(env, str(tmp_path / f"worker-{i}.log")) for i in range(replicas)]
    try:
        await asyncio.sleep(12)  # every replica joined the group and the exchange
        await produce(kafka_bootstrap, topic, values, partition=partition)
        produced_at = time.time()

        async def all_accepted() -> bool:
            return (await api.stats())["events_accepted"] >= len(values)

        await wait_for(all_accepted, 200, "the replicas to deliver everything")
        done_at = time.time()
        if partition is None:
            await assert_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
        else:
            await assert_partition_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic, partition)
    finally:
        for proc in procs:
            if proc.poll() is None:
                await asyncio.to_thread(stop_process, proc, signal.SIGTERM, 40)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0] * replicas
    return produced_at, done_at


@pytest.mark.timeout(300)
async def test_the_busy_replica_uses_the_budget_the_idle_ones_leave(kafka_bootstrap, topic_factory, tmp_path):
    """3 replicas, budget 300, every event on one of 6 partitions: shares by partitions gave the busy
    replica 32 %; by demand it gets at least 80 %, and no 1-second window exceeds the budget."""
    budget = 300
    topic = await topic_factory(6, "skew")
    values, totals = usage(36_000, seed=23)
    async with Emulator(WIRED, host="127.0.0.1", port=0) as emu, WireTap(emu.url, stamp=True) as tap:
        api = StripeApi(emu.url)
        meter_ids = await create_meters(api)
        produced_at, done_at = await run_replicas(
            kafka_bootstrap, topic, tmp_path, api, values, tap=tap, replicas=3, budget=budget, batch=4, partition=0
        )
        stats = await api.stats()
        await assert_totals(api, meter_ids, totals)
    assert stats["events_accepted"] == stats["unique_identifiers"] == len(values)
    wire: Arrivals = tap.arrivals()
    assert wire.max_in_window() <= budget, wire.per_second()
    # Over the backlog (after the ramp-up: the demand settles in about 2 s), at least 80 % of the budget.
    per_second = wire.per_second()
    backlog = [n for second, n in per_second.items() if produced_at + 4 <= second <= done_at - 2]
    assert len(backlog) >= 10, per_second
    assert sum(backlog) / len(backlog) >= 0.8 * budget, backlog


@pytest.mark.timeout(300)
async def test_more_replicas_than_requests_per_second_never_exceed_the_budget(kafka_bootstrap, topic_factory, tmp_path):
    """8 replicas on a budget of 5: a share below one request/s used to round up to one each (8 > 5)."""
    budget = 5
    topic = await topic_factory(6, "tiny")
    values, totals = usage(600, seed=29)
    async with Emulator(WIRED, host="127.0.0.1", port=0) as emu, WireTap(emu.url, stamp=True) as tap:
        api = StripeApi(emu.url)
        meter_ids = await create_meters(api)
        await run_replicas(
            kafka_bootstrap, topic, tmp_path, api, values, tap=tap, replicas=8, budget=budget, batch=10, partition=None
        )
        stats = await api.stats()
        await assert_totals(api, meter_ids, totals)
    assert stats["events_accepted"] == stats["unique_identifiers"] == len(values)
    wire = tap.arrivals()
    assert wire.max_in_window() <= budget, wire.per_second()


async def test_the_worker_creates_its_demand_topic_or_refuses_to_start_naming_it(kafka_bootstrap, topic_factory):
    topic = await topic_factory(2, "exchange")
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_METER_CATALOG="off")
        await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        bad = Worker(settings.load({**env, "INGESTOR_BUDGET_TOPIC": "no/such topic"}))
        with pytest.raises(settings.SettingsError, match="INGESTOR_BUDGET_TOPIC"):
            async with bad:
                pass
        demand_topic = f"{topic}.demand"
        async with running_worker({**env, "INGESTOR_BUDGET_TOPIC": demand_topic}) as worker:
            assert worker.exchange is not None

            values, _ = usage(200, seed=31)
            await produce(kafka_bootstrap, topic, values)
            api = StripeApi(emu.url)

            async def delivered() -> bool:
                return (await api.stats())["events_accepted"] >= len(values)

            await wait_for(delivered, 60, "delivery under a grant of the exchange")
            assert worker.exchange.decision.mode is Mode.EXCHANGE
            assert worker.exchange.decision.members == 1
            assert set(await end_offsets(kafka_bootstrap, demand_topic)) == {0}  # one partition
