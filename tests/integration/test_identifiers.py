"""Derived identifiers are unique across Kafka clusters billing into one Stripe account.

Two real brokers, each with a topic of the same name holding events at the same offsets, no identifier in
them; one worker per cluster, both billing into the same emulated Stripe account. Without a namespace the
second cluster's events get the first one's identifiers and Stripe drops them as duplicates.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from ingestor_dev.devkafka import LocalKafka, committed_offsets, create_topic
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.integration.harness import StripeApi, cluster_id, end_offsets, running_worker, wait_for, worker_env

if TYPE_CHECKING:
    from ingestor.worker import Worker

pytestmark = pytest.mark.kafka

METER = "cluster_calls"
CUSTOMER = "cus_two_clusters"
EVENTS = 120


async def produce_events(
    bootstrap: str, topic: str, amounts: list[int], *, timestamp_ms: int | None = None, partition: int = 0
) -> None:
    """Events without identifier, in order on one partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sends = []
        for amount in amounts:
            event = {"event_name": METER, "payload": {"stripe_customer_id": CUSTOMER, "value": str(amount)}}
            sends.append(
                await producer.send(topic, orjson.dumps(event), partition=partition, timestamp_ms=timestamp_ms)
            )
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def bill_everything(bootstrap: str, topic: str, emu_url: str) -> Worker:
    """Run a worker on `bootstrap` until every record of `topic` is done."""
    env = worker_env(bootstrap, topic, emu_url, INGESTOR_METER_CATALOG="off")
    async with running_worker(env) as worker:
        ends = await end_offsets(bootstrap, topic)

        async def done() -> bool:
            return await committed_offsets(bootstrap, env["INGESTOR_GROUP_ID"], topic) == ends

        await wait_for(done, 60, f"every record of {topic} on {bootstrap} done")
    return worker


@pytest.mark.timeout(240)
async def test_the_same_coordinates_on_two_clusters_are_billed_as_two_events(kafka_bootstrap):
    topic = f"usage-{uuid.uuid4().hex[:8]}"
    first = [i % 7 + 1 for i in range(EVENTS)]
    second = [i % 5 + 10 for i in range(EVENTS)]
    async with (
        LocalKafka() as other,
        Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu,
    ):
        api = StripeApi(emu.url)
        meter_id = await api.create_meter(METER, "sum")
        clusters = {kafka_bootstrap: first, other.bootstrap: second}
        for bootstrap, amounts in clusters.items():
            await create_topic(bootstrap, topic, 1)
            await produce_events(bootstrap, topic, amounts)
        workers = [await bill_everything(bootstrap, topic, emu.url) for bootstrap in clusters]
        ids = [await cluster_id(bootstrap) for bootstrap in clusters]
        stats = await api.stats()
        now = int(time.time())
        billed = await api.total(meter_id, CUSTOMER, now // 60 * 60 - 3600, now // 60 * 60 + 3600)
        seen = await api._call(
            "GET", "/_emulator/events", params=[("identifier", f"kafka-{ns}.{topic}-0-0") for ns in ids]
        )

    assert billed == sum(first) + sum(second), f"billed {billed}; duplicates dropped: {stats['duplicates_dropped']}"
    assert stats["duplicates_dropped"] == 0
    assert stats["events_accepted"] == stats["unique_identifiers"] == 2 * EVENTS
    # The default namespace is each cluster's id; the derived identifiers carry it.
    assert ids[0] != ids[1]
    assert [worker.decoder.namespace for worker in workers] == ids
    assert [(entry["accepted"], entry["duplicates"]) for entry in seen["data"]] == [(1, 0), (1, 0)], seen
