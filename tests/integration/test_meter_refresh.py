"""A meter created while the worker runs takes effect at once: an unknown event_name waits for one catalog
refresh before it is dead-lettered (real broker, the emulator, the worker in-process)."""

from __future__ import annotations

import orjson
import pytest

from ingestor import dlq_format
from ingestor_dev.devkafka import committed_offsets, produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.integration.harness import (
    StripeApi,
    end_offsets,
    minute_window,
    read_topic,
    running_worker,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.kafka

EVENTS = 40


def usage(event_name: str, customer: str, n: int) -> list[bytes]:
    return [
        orjson.dumps({"event_name": event_name, "payload": {"stripe_customer_id": customer, "value": "3"}})
        for _ in range(n)
    ]


async def test_a_meter_created_after_start_bills_its_events_instead_of_dead_lettering_them(
    kafka_bootstrap, topic_factory
):
    topic = await topic_factory(2, "mr")
    dlq = await topic_factory(1, "mr-dlq")
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        await api.create_meter("api_requests", "sum")  # the catalog is known; the new meter is not in it yet
        # INGESTOR_METER_REFRESH_S at its default (300 s): only the refresh an unknown name triggers can help.
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_DLQ_TOPIC=dlq)
        async with running_worker(env):
            meter_id = await api.create_meter("late_meter", "sum")
            await produce(kafka_bootstrap, topic, usage("late_meter", "cus_late", EVENTS))
            await produce(kafka_bootstrap, topic, usage("never_created", "cus_late", 2))
            ends = await end_offsets(kafka_bootstrap, topic)

            async def all_done() -> bool:
                return await committed_offsets(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic) == ends

            await wait_for(all_done, 60, "every record billed or dead-lettered and committed")
        start, end = minute_window()
        assert await api.total(meter_id, "cus_late", start, end) == 3 * EVENTS
        letters = await read_topic(kafka_bootstrap, dlq)
        reasons = [dict(letter.headers)[dlq_format.REASON] for letter in letters]
        assert reasons == [b"meter_unknown", b"meter_unknown"]  # a name no refresh finds is still dead-lettered
