"""Replaying dead letters bills every event once, however often the same range is replayed.

Real broker, the Stripe emulator, the worker in-process and `ingestor dlq replay` as the operator runs it:
events for a meter that does not exist yet are dead-lettered as `meter_unknown`; the meter is created;
the dead-letter topic is replayed in overlapping `--limit` runs and then twice in full. Each event must
be billed once: its dead-letter record carries the identifier it would have been billed with, and every
replayed copy is delivered with that identifier, so Stripe counts it once.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import orjson
import pytest

from ingestor import dlq_format, replay
from ingestor.cli import build_parser
from ingestor.errors import Rejection
from ingestor_dev.devkafka import committed_offsets
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.integration.harness import (
    StripeApi,
    cluster_id,
    end_offsets,
    read_topic,
    running_worker,
    wait_for,
    worker_env,
)
from tests.integration.test_dead_letters import Sent, produce_records

if TYPE_CHECKING:
    from ingestor.catalog import MeterCatalog

pytestmark = pytest.mark.kafka

LATE_METER = "late_meter"
CUSTOMERS = ("cus_rp_0", "cus_rp_1", "cus_rp_2")
EVENTS = 300
#: `--limit` runs that overlap each other, then the whole range twice.
REPLAYS: tuple[tuple[str, ...], ...] = (("--limit", "120"), ("--limit", "200"), (), ())


def late_events(n: int, partitions: int) -> list[Sent]:
    """Events for LATE_METER: a third with the producer's identifier, a third with none, a third replayed
    before (no identifier in the value, the `ingestor.identifier` header that a replay sets)."""
    out = []
    for i in range(n):
        customer, amount = CUSTOMERS[i % len(CUSTOMERS)], i % 13 + 1
        event: dict[str, Any] = {"event_name": LATE_METER, "payload": {"stripe_customer_id": customer, "value": amount}}
        headers: tuple[tuple[str, bytes], ...] = (("trace", f"t-{i}".encode()),)
        identifier = ""
        if i % 3 == 0:
            identifier = event["identifier"] = f"late-{i}"
        elif i % 3 == 1:
            identifier = f"carried-{i}"
            headers += ((dlq_format.IDENTIFIER, identifier.encode()),)
        value = orjson.dumps(event)
        sent = Sent(i % partitions, customer.encode(), value, headers, bills=(LATE_METER, customer, amount))
        sent.identifier = identifier
        out.append(sent)
    return out


def parse(*argv: str) -> Any:
    args = ["dlq", "replay", *argv]
    return build_parser(args).parse_args(args)


def knows(catalog: MeterCatalog, name: str) -> bool:
    try:
        catalog.lookup(name)
    except Rejection:
        return False
    return True


@pytest.mark.timeout(180)
async def test_replaying_the_dead_letters_twice_and_in_overlapping_runs_bills_each_event_once(
    kafka_bootstrap, topic_factory
):
    partitions = 2
    topic = await topic_factory(partitions, "rp")
    dlq = await topic_factory(1, "rp-dlq")
    namespace = await cluster_id(kafka_bootstrap)
    records = late_events(EVENTS, partitions)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        await api.create_meter("api_requests", "sum")  # a catalog that is known, without LATE_METER
        await produce_records(kafka_bootstrap, topic, records)
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_DLQ_TOPIC=dlq, INGESTOR_METER_REFRESH_S="1")
        async with running_worker(env) as worker:

            async def all_dead_lettered() -> bool:
                return sum((await end_offsets(kafka_bootstrap, dlq)).values()) >= EVENTS

            await wait_for(all_dead_lettered, 60, f"{EVENTS} events dead-lettered as meter_unknown")
            letters = await read_topic(kafka_bootstrap, dlq)
            meter_id = await api.create_meter(LATE_METER, "sum")

            async def meter_known() -> bool:
                return knows(worker.catalog, LATE_METER)

            await wait_for(meter_known, 30, "the worker's catalog to learn the new meter")
            for argv in REPLAYS:
                status = await replay.run(
                    parse(
                        "--bootstrap-servers",
                        kafka_bootstrap,
                        "--from-topic",
                        dlq,
                        "--to-topic",
                        topic,
                        "--reason",
                        "meter_unknown",
                        *argv,
                    ),
                    environ={},
                )
                assert status == 0
            replayed = 120 + 200 + EVENTS + EVENTS
            ends = await end_offsets(kafka_bootstrap, topic)
            assert sum(ends.values()) == EVENTS + replayed

            async def committed_to_end() -> bool:
                return await committed_offsets(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic) == ends

            await wait_for(committed_to_end, 60, "every replayed record done")
        stats = await api.stats()
        start, end = int(time.time()) // 60 * 60 - 3600, int(time.time()) // 60 * 60 + 3600
        billed = {c: await api.total(meter_id, c, start, end) for c in CUSTOMERS}
        dead_after = await read_topic(kafka_bootstrap, dlq)

    expected: Counter[str] = Counter()
    for sent in records:
        assert sent.bills is not None
        expected[sent.bills[1]] += sent.bills[2]
    assert billed == dict(expected), f"billed {billed}, expected {dict(expected)}"
    assert stats["events_accepted"] == stats["unique_identifiers"] == EVENTS
    assert stats["duplicates_dropped"] == replayed - EVENTS
    assert len(dead_after) == EVENTS, "replayed events were dead-lettered again"
    # Each dead letter names the identifier its event is billed with: the producer's, the carried one,
    # else the one derived from the record's coordinates within the cluster's namespace.
    assert len(letters) == EVENTS
    by_offset = {(r.partition, r.offset): r for r in records}
    for letter in letters:
        own = dict(h for h in letter.headers if h[0].startswith(dlq_format.PREFIX))
        assert own[dlq_format.REASON] == b"meter_unknown"
        sent = by_offset[int(own[dlq_format.SOURCE_PARTITION]), int(own[dlq_format.SOURCE_OFFSET])]
        want = sent.identifier or f"kafka-{namespace}.{topic}-{sent.partition}-{sent.offset}"
        assert own.get(dlq_format.IDENTIFIER) == want.encode(), f"offset {sent.offset}"
