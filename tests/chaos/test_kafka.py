"""Chaos on Kafka's side: the broker stopped and started again (2), the DLQ unwritable across a
rebalance (8), a DLQ replay run twice (10) and a record too large for the DLQ (10)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import replace

import orjson
import pytest

from ingestor.events import identifier_prefix
from tests.chaos.accounting import wait_settled
from tests.chaos.profile import CURRENT
from tests.chaos.run import chaos_run
from tests.chaos.workload import CUSTOMERS
from tests.integration.harness import RestartableKafka, StripeApi, cluster_id, wait_for
from tests.integration.test_dead_letters import Sent, set_topic_config

pytestmark = [pytest.mark.kafka, pytest.mark.chaos, pytest.mark.timeout(CURRENT.timeout(300))]

#: The broker's default message.max.bytes (1 MiB plus the batch overhead).
DEFAULT_MAX_MESSAGE_BYTES = "1048588"


async def test_broker_stopped_and_started_again_mid_run(tmp_path, chaos_seed, profile):
    async with RestartableKafka() as kafka, chaos_run(kafka.bootstrap, tmp_path, chaos_seed, profile) as run:
        run.fleet.start()
        await run.progress(run.rng.uniform(0.1, 0.4))
        await kafka.halt()
        await asyncio.sleep(profile.fault_s)
        await kafka.resume()
        await run.finish()


async def test_dlq_unwritable_for_a_while_and_across_a_rebalance(kafka_bootstrap, tmp_path, chaos_seed, profile):
    # Every dead-letter write fails (MessageSizeTooLarge) until the topic's limit is raised again.
    tiny = {"max.message.bytes": "100"}
    async with chaos_run(kafka_bootstrap, tmp_path, chaos_seed, profile, dlq_config=tiny, partitions=6) as run:
        first = run.fleet.start()
        await run.progress(0.2)
        run.fleet.start()  # a rebalance while the DLQ refuses writes
        await run.progress(0.5)
        await run.fleet.stop(first)  # another: the leaving worker drains what it can and hands over
        await asyncio.sleep(profile.fault_s / 2)
        await set_topic_config(kafka_bootstrap, run.ledger.dlq, {"max.message.bytes": DEFAULT_MAX_MESSAGE_BYTES})
        await run.finish()


def late_events(n: int, partitions: int) -> list[Sent]:
    """Events for meter `late`, created only after they were dead-lettered (meter_unknown): half with an
    identifier, half with none (their identifier derives from where they were first produced)."""
    out = []
    for i in range(n):
        customer, amount = CUSTOMERS[i % len(CUSTOMERS)], i + 1
        event: dict[str, object] = {
            "event_name": "late",
            "payload": {"stripe_customer_id": customer, "value": str(amount)},
        }
        if i % 2:
            event["identifier"] = f"late-{i}"
        out.append(
            Sent(
                i % partitions,
                None,
                orjson.dumps(event),
                reason="meter_unknown",
                label=f"late {i}",
                bills=("late", customer, amount),
                identifier=f"late-{i}" if i % 2 else "",
            )
        )
    return out


async def meter_list_reads(api: StripeApi) -> int:
    return int((await api.stats())["requests"].get("/v1/billing/meters", {}).get("200", 0))


async def _more(api: StripeApi, reads: int) -> bool:
    return await meter_list_reads(api) >= reads


async def replay_dlq(bootstrap: str, dlq: str, topic: str) -> str:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "INGESTOR_DLQ_TOPIC": dlq}
    command = [sys.executable, "-m", "ingestor", "dlq", "replay", "--to-topic", topic, "--reason", "meter_unknown"]
    done = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


async def test_dlq_replay_run_twice_bills_once(kafka_bootstrap, tmp_path, chaos_seed, profile):
    late = late_events(40, 4)
    env = {"INGESTOR_METER_REFRESH_S": "1"}
    # The corpus' own unknown-meter record would be replayed and dead-lettered again: left out here.
    async with chaos_run(
        kafka_bootstrap, tmp_path, chaos_seed, profile, extra_records=late, env=env, exclude={"meter unknown"}
    ) as run:
        ledger = run.ledger
        run.fleet.start()
        assert await wait_settled(run.api, kafka_bootstrap, ledger, run.fleet, profile.settle_s), "no first pass"
        catalog_reads = await meter_list_reads(run.api)
        ledger.meter_ids["late"] = await run.api.create_meter("late", "sum")
        ledger.formulas["late"] = "sum"
        # The worker re-reads the meter catalog every second: wait until it did, twice.
        await wait_for(lambda: _more(run.api, catalog_reads + 2), 30, "the worker to re-read the meter catalog")
        namespace = await cluster_id(kafka_bootstrap)
        for record in late:  # each replayed event keeps its identifier: given, or derived from where it was
            derived = identifier_prefix(ledger.topic, record.partition, namespace) + str(record.offset)
            ledger.billed.append(replace(record, reason=None, identifier=record.identifier or derived))
        outputs = [await replay_dlq(kafka_bootstrap, ledger.dlq, ledger.topic) for _ in range(2)]
        print("\n".join(outputs))
        await run.finish()


async def test_a_record_too_large_for_the_dlq(kafka_bootstrap, tmp_path, chaos_seed, profile):
    # ~1.5 MB: the source topic takes it, the DLQ topic keeps the broker's default limit (1 MiB).
    pad = "x" * 1_500_000
    value = orjson.dumps(
        {"event_name": "api_requests", "payload": {"stripe_customer_id": "cus_big", "value": "1", "pad": pad}}
    )
    big = Sent(1, b"big", value, reason="record_too_large", label="1.5 MB record")
    source = {"max.message.bytes": "2097152"}
    async with chaos_run(
        kafka_bootstrap, tmp_path, chaos_seed, profile, source_config=source, extra_records=[big]
    ) as run:
        run.ledger.value_not_kept.add((big.partition, big.offset))
        run.fleet.start()
        await run.finish()
