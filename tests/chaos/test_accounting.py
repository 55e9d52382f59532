"""The identity itself: it holds for a run done exactly right (by hand, no worker), and a run broken in
every way the identity watches fails it with each violation named."""

from __future__ import annotations

import random

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from ingestor import dlq_format
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.chaos.accounting import assert_identity
from tests.chaos.run import new_topics
from tests.chaos.workload import Ledger, bad_records, create_meters, mix, produce_into, valid_records
from tests.integration.harness import StripeApi, WorkerFleet, end_offsets, worker_env
from tests.integration.test_dead_letters import Sent

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]


async def bill(api: StripeApi, records: list[Sent]) -> None:
    """What the worker does for valid events, through Stripe's synchronous endpoint."""
    for record in records:
        event = orjson.loads(record.value or b"{}")
        form = {"event_name": event["event_name"], "identifier": record.identifier}
        form |= {f"payload[{k}]": str(v) for k, v in event["payload"].items()}
        if "timestamp" in event:
            form["timestamp"] = str(event["timestamp"])
        await api._call("POST", "/v1/billing/meter_events", data=form)


async def dead_letter(bootstrap: str, ledger: Ledger, records: list[Sent]) -> None:
    """What the worker does for bad records: the original key and value, and the ingestor headers."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=2 * 1024 * 1024)
    await producer.start()
    try:
        for r in records:
            own = [
                (dlq_format.REASON, (r.reason or "").encode()),
                (dlq_format.SOURCE_TOPIC, ledger.topic.encode()),
                (dlq_format.SOURCE_PARTITION, str(r.partition).encode()),
                (dlq_format.SOURCE_OFFSET, str(r.offset).encode()),
            ]
            await producer.send_and_wait(ledger.dlq, r.value, key=r.key, headers=[*r.headers, *own])
    finally:
        await producer.stop()


async def commit_to_end(bootstrap: str, group: str, topic: str) -> None:
    ends = await end_offsets(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = {TopicPartition(topic, p): end for p, end in ends.items()}
        consumer.assign(list(tps))
        await consumer.commit(tps)
    finally:
        await consumer.stop()


def wrongly_dead(ledger: Ledger) -> Sent:
    valid = ledger.billed[0]
    return Sent(valid.partition, valid.key, valid.value, reason="not_json", offset=valid.offset)


async def test_the_identity_holds_when_exact_and_names_every_violation(kafka_bootstrap, tmp_path):
    topic, dlq = await new_topics(kafka_bootstrap, 2, source_config=None, dlq_config=None)
    rng = random.Random(5)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_ids, formulas = await create_meters(api)
        ledger = Ledger(topic, dlq, meter_ids, formulas, seed=5)
        bad = [r for r in bad_records(2) if r.value and r.key is None][:4]
        await produce_into(kafka_bootstrap, ledger, mix(rng, valid_records(rng, 12, 2), bad))
        fleet = WorkerFleet(worker_env(kafka_bootstrap, topic, emu.url), tmp_path)
        group = fleet.env["INGESTOR_GROUP_ID"]

        await bill(api, ledger.billed)
        await dead_letter(kafka_bootstrap, ledger, ledger.dead)
        await commit_to_end(kafka_bootstrap, group, topic)
        await assert_identity(api, kafka_bootstrap, ledger, fleet)

        # Now break it: one more valid event never billed (so one total short), one bad record written
        # twice, one valid record dead-lettered, a record past the committed offsets, a worker exiting 1.
        late = valid_records(rng, 1, 2)
        await produce_into(kafka_bootstrap, ledger, late)
        await dead_letter(kafka_bootstrap, ledger, [ledger.dead[0], wrongly_dead(ledger)])
        fleet.exit_codes.append(1)
        with pytest.raises(AssertionError) as failure:
            await assert_identity(api, kafka_bootstrap, ledger, fleet)
    message = str(failure.value)
    for violation in (
        "1 valid identifiers not accepted",
        f"Stripe accepted 12 events with 12 identifiers; {len(ledger.billed)} valid events were produced",
        "1 meter totals wrong",
        "1 bad records in the DLQ more than once",
        "1 records dead-lettered that were valid",
        "committed offsets not at the end",
        "exit codes on SIGTERM: [1]",
    ):
        assert violation in message, message
