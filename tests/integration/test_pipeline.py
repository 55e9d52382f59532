"""The worker end to end: real Kafka broker, the Stripe emulator, the worker in-process."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter

import orjson
import pytest

from ingestor import settings
from ingestor.worker import Worker
from ingestor_dev.devkafka import committed_offsets, produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.integration.harness import (
    StripeApi,
    end_offsets,
    minute_window,
    running_worker,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.kafka

METERS = ("api_calls", "tokens", "storage_gb")
CUSTOMERS = tuple(f"cus_{i:04d}" for i in range(12))


def usage(n: int, *, seed: int = 7, with_ids: float = 0.5) -> tuple[list[bytes], Counter[tuple[str, str]]]:
    """`n` valid events over several meters and customers, and the expected totals per (meter, customer)."""
    rng = random.Random(seed)
    now = time.time()
    values, totals = [], Counter[tuple[str, str]]()
    run = uuid.uuid4().hex[:8]
    for i in range(n):
        meter, customer, value = rng.choice(METERS), rng.choice(CUSTOMERS), rng.randint(1, 1000)
        event: dict[str, object] = {
            "event_name": meter,
            "payload": {"stripe_customer_id": customer, "value": str(value)},
        }
        if rng.random() < with_ids:
            event["identifier"] = f"evt-{run}-{i}"
        if rng.random() < 0.3:
            event["timestamp"] = int(now) - rng.randint(0, 3600)
        values.append(orjson.dumps(event))
        totals[meter, customer] += value
    return values, totals


async def create_meters(api: StripeApi) -> dict[str, str]:
    return {name: await api.create_meter(name, "sum") for name in METERS}


async def assert_totals(api: StripeApi, meter_ids: dict[str, str], totals: Counter[tuple[str, str]]) -> None:
    start, end = minute_window()
    for (meter, customer), expected in sorted(totals.items()):
        got = await api.total(meter_ids[meter], customer, start, end)
        assert got == expected, f"{meter}/{customer}: billed {got}, produced {expected}"


async def assert_committed_to_end(bootstrap: str, group: str, topic: str) -> None:
    ends = await end_offsets(bootstrap, topic)

    async def at_end() -> bool:
        return await committed_offsets(bootstrap, group, topic) == ends

    await wait_for(at_end, 30, "committed offsets at the end of every partition")


async def test_fifty_thousand_events_over_six_partitions_are_billed_exactly_once(kafka_bootstrap, topic_factory):
    topic = await topic_factory(6, "usage")
    values, totals = usage(50_000)
    assert await produce(kafka_bootstrap, topic, values) == len(values)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_ids = await create_meters(api)
        env = worker_env(kafka_bootstrap, topic, emu.url)
        async with running_worker(env):

            async def all_accepted() -> bool:
                return (await api.stats())["events_accepted"] >= len(values)

            await wait_for(all_accepted, 120, "every event accepted")
            await assert_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
        stats = await api.stats()
        assert stats["events_accepted"] == len(values)
        assert stats["unique_identifiers"] == len(values)
        assert stats["max_events_per_request"] <= 100
        await assert_totals(api, meter_ids, totals)


async def test_the_worker_refuses_to_start_without_its_dead_letter_topic(kafka_bootstrap, topic_factory):
    topic = await topic_factory(1, "nodlq")
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_METER_CATALOG="off")
        worker = Worker(settings.load(env))
        with pytest.raises(settings.SettingsError, match="INGESTOR_DLQ_TOPIC"):
            async with worker:
                pass
