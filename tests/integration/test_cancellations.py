"""Cancellations end to end: a real broker, the emulator, the worker in-process.

1. Events and their cancellations produced together (event, then its cancellation, same key) are billed with
   the cancelled ones removed, exactly, whatever the interleaving across partitions.
2. A cancellation whose first answer is lost (the connection reset after Stripe applied it) is retried with
   the same Idempotency-Key and is done, not dead-lettered.
3. A cancellation that arrives before its event (another partition) is dead-lettered as cancel_rejected with
   Stripe's code; the event is billed; replayed from the dead-letter topic, the cancellation applies.
4. A cancellation of an unknown identifier, and one of an event received more than 24 hours earlier, are
   dead-lettered as cancel_rejected; their partitions commit to the end.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from typing import Any

import orjson
import pytest

from ingestor import dlq_format
from ingestor.replay import ReplayOptions, replay
from ingestor.settings import KafkaConnection
from ingestor_dev.devkafka import produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.integration.harness import (
    StripeApi,
    ensure_topic,
    minute_window,
    read_topic,
    running_worker,
    wait_for,
    worker_env,
)
from tests.integration.test_dead_letters import header_map, wait_committed_to_end

pytestmark = pytest.mark.kafka

METER = "api_requests"


def event(identifier: str, customer: str, value: int) -> bytes:
    return orjson.dumps(
        {
            "event_name": METER,
            "payload": {"stripe_customer_id": customer, "value": str(value)},
            "identifier": identifier,
        }
    )


def cancel(identifier: str, name: str = METER) -> bytes:
    return orjson.dumps({"event_name": name, "type": "cancel", "cancel": {"identifier": identifier}})


def usage_with_cancellations(n: int, every: int, seed: int = 3) -> tuple[list[bytes], list[bytes], Counter[str], int]:
    """Values and keys (the customer), the expected totals without the cancelled events, and the cancels."""
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    values, keys, totals, cancels = [], [], Counter[str](), 0
    for i in range(n):
        customer, value, identifier = f"cus_c{rng.randrange(8)}", rng.randint(1, 100), f"evt-{run}-{i}"
        values.append(event(identifier, customer, value))
        keys.append(customer.encode())
        if i % every == 0:
            values.append(cancel(identifier))
            keys.append(customer.encode())
            cancels += 1
        else:
            totals[customer] += value
    return values, keys, totals, cancels


async def billed(api: StripeApi, meter_id: str, customers: list[str]) -> dict[str, int]:
    start, end = minute_window()
    return {c: await api.total(meter_id, c, start, end) for c in customers}


async def letters(bootstrap: str, dlq: str) -> list[Any]:
    return await read_topic(bootstrap, dlq)


def reasons(found: list[Any]) -> list[tuple[str, str]]:
    out = []
    for letter in found:
        headers = header_map(letter.headers)
        out.append((headers[dlq_format.REASON].decode(), headers.get(dlq_format.STRIPE_CODE, b"").decode()))
    return out


async def test_events_and_their_cancellations_are_billed_without_the_cancelled_ones(kafka_bootstrap, topic_factory):
    topic = await topic_factory(3, "cancel")
    values, keys, totals, cancels = usage_with_cancellations(3000, every=4)
    await produce(kafka_bootstrap, topic, values, keys=keys)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_id = await api.create_meter(METER, "sum")
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_API_RPS="1000")
        async with running_worker(env) as worker:
            await wait_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic, timeout=120)
            accepted = worker.metrics.adjustments.labels("accepted", "200")._value.get()
        assert await letters(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"]) == []
        assert accepted == cancels
        assert (await api.stats())["events_cancelled"] == cancels
        assert await billed(api, meter_id, sorted(totals)) == dict(totals)


async def test_a_cancellation_whose_answer_was_lost_is_retried_with_its_idempotency_key(kafka_bootstrap, topic_factory):
    topic = await topic_factory(1, "idem")
    run = uuid.uuid4().hex[:6]
    await produce(kafka_bootstrap, topic, [event(f"{run}-a", "cus_i", 5), event(f"{run}-b", "cus_i", 7)])
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_id = await api.create_meter(METER, "sum")
        env = worker_env(kafka_bootstrap, topic, emu.url)
        async with running_worker(env):
            await wait_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
            # the next request (the cancellation) is applied, then its connection is reset before the answer
            await api.set_faults(reset_after=1.0, max_faults=1, scope="all")
            await produce(kafka_bootstrap, topic, [cancel(f"{run}-a")])
            await wait_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
        stats = await api.stats()
        assert stats["faults_injected"] == 1
        assert stats["events_cancelled"] == 1
        assert await letters(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"]) == []
        assert await billed(api, meter_id, ["cus_i"]) == {"cus_i": 7}


async def test_a_cancellation_before_its_event_is_dead_lettered_and_can_be_replayed(kafka_bootstrap, topic_factory):
    topic = await topic_factory(2, "early")
    identifier = f"early-{uuid.uuid4().hex[:6]}"
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_id = await api.create_meter(METER, "sum")
        env = worker_env(kafka_bootstrap, topic, emu.url)
        dlq = env["INGESTOR_DLQ_TOPIC"]
        group = env["INGESTOR_GROUP_ID"]
        async with running_worker(env):
            await produce(kafka_bootstrap, topic, [event("other", "cus_e", 1)], partition=0)
            await produce(kafka_bootstrap, topic, [cancel(identifier)], partition=1)
            await wait_committed_to_end(kafka_bootstrap, group, topic)
            await produce(kafka_bootstrap, topic, [event(identifier, "cus_e", 9)], partition=0)
            await wait_committed_to_end(kafka_bootstrap, group, topic)
            assert reasons(await letters(kafka_bootstrap, dlq)) == [("cancel_rejected", "invalid_cancel_configuration")]
            assert await billed(api, meter_id, ["cus_e"]) == {"cus_e": 10}
            tally = await replay(
                ReplayOptions(from_topic=dlq, to_topic=topic, reasons=frozenset({"cancel_rejected"})),
                KafkaConnection(kafka_bootstrap),
            )
            assert tally.published == 1
            await wait_committed_to_end(kafka_bootstrap, group, topic)
        assert len(await letters(kafka_bootstrap, dlq)) == 1
        assert await billed(api, meter_id, ["cus_e"]) == {"cus_e": 1}


class ShiftedClock:
    """The emulator's wall clock, moved forward by hand."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_unknown_and_too_old_cancellations_are_dead_lettered_and_the_partition_moves_on(
    kafka_bootstrap, topic_factory
):
    topic = await topic_factory(1, "late")
    run = uuid.uuid4().hex[:6]
    clock = ShiftedClock()
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0, clock=clock) as emu:
        api = StripeApi(emu.url)
        meter_id = await api.create_meter(METER, "sum")
        env = worker_env(kafka_bootstrap, topic, emu.url)
        await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        group = env["INGESTOR_GROUP_ID"]
        async with running_worker(env):
            await produce(kafka_bootstrap, topic, [event(f"{run}-old", "cus_l", 4), cancel(f"{run}-nobody")])
            await wait_committed_to_end(kafka_bootstrap, group, topic)
            clock.offset = 24 * 3600 + 60  # Stripe received the event more than 24 hours ago
            await produce(kafka_bootstrap, topic, [cancel(f"{run}-old"), event(f"{run}-after", "cus_l", 3)])
            await wait_committed_to_end(kafka_bootstrap, group, topic)

            async def both_letters() -> bool:
                return len(await letters(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])) == 2

            await wait_for(both_letters, 20, "two dead letters")
        found = await letters(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        assert reasons(found) == [("cancel_rejected", "invalid_cancel_configuration")] * 2
        assert [header_map(f.headers)[dlq_format.IDENTIFIER].decode() for f in found] == [f"{run}-nobody", f"{run}-old"]
        start, end = minute_window(clock())
        assert await api.total(meter_id, "cus_l", start - 86400, end) == 7
