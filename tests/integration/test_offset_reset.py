"""INGESTOR_AUTO_OFFSET_RESET on the real broker: where a partition with no committed offset starts.

`safe` (the default) starts from the earliest offset when every record is recent, and refuses to start
(exit code 2, a message naming the setting, the partitions and the count) when older records would be
billed again; `earliest` bills the history; `latest` skips it; a group with committed offsets resumes from
them whatever their age.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from aiokafka.structs import TopicPartition

from ingestor import offset_reset
from ingestor import settings as settings_mod
from ingestor.worker import Worker
from ingestor_dev.devkafka import committed_offsets
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.integration.harness import (
    StripeApi,
    end_offsets,
    ensure_topic,
    minute_window,
    running_worker,
    start_worker_process,
    wait_for,
    worker_env,
)
from tests.integration.test_identifiers import CUSTOMER, METER, produce_events

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka

OLD_MS = int((time.time() - 30 * 3600) * 1000)  # older than 23 hours, within Stripe's 35 days
OLD = [3] * 30
FRESH = [5] * 10


@pytest.fixture
async def stripe() -> AsyncIterator[tuple[str, StripeApi, str]]:
    """The emulator's URL, its API and the meter every event here is billed to."""
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        yield emu.url, api, await api.create_meter(METER, "sum")


async def billed(api: StripeApi, meter_id: str) -> int:
    return await api.total(meter_id, CUSTOMER, *minute_window())


async def with_history(kafka_bootstrap: str, topic_factory: TopicFactory) -> str:
    """A topic whose partition 0 holds 30 records 30 hours old, then 10 fresh ones; partition 1 is fresh."""
    topic = await topic_factory(2, "reset")
    await produce_events(kafka_bootstrap, topic, OLD, timestamp_ms=OLD_MS)
    await produce_events(kafka_bootstrap, topic, FRESH)
    await produce_events(kafka_bootstrap, topic, FRESH, partition=1)
    return topic


async def run_to_end(env: dict[str, str]) -> None:
    bootstrap, topic = env["KAFKA_BOOTSTRAP_SERVERS"], env["INGESTOR_TOPICS"]
    async with running_worker(env):
        ends = await end_offsets(bootstrap, topic)

        async def done() -> bool:
            return await committed_offsets(bootstrap, env["INGESTOR_GROUP_ID"], topic) == ends

        await wait_for(done, 60, f"every record of {topic} done")


def env_for(kafka_bootstrap: str, topic: str, emu_url: str, **overrides: str) -> dict[str, str]:
    return worker_env(kafka_bootstrap, topic, emu_url, INGESTOR_METER_CATALOG="off", **overrides)


async def test_safe_refuses_to_bill_a_partitions_old_history_and_exits_2(
    kafka_bootstrap: str, topic_factory: TopicFactory, stripe: tuple[str, StripeApi, str], tmp_path: Path
) -> None:
    emu_url, api, meter_id = stripe
    topic = await with_history(kafka_bootstrap, topic_factory)
    env = env_for(kafka_bootstrap, topic, emu_url)  # INGESTOR_AUTO_OFFSET_RESET unset: the default
    assert "INGESTOR_AUTO_OFFSET_RESET" not in env
    await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
    log_path = tmp_path / "worker.log"
    proc = start_worker_process(env, str(log_path))
    try:
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    output = log_path.read_text(encoding="utf-8")
    assert status == 2, output[-2000:]
    assert "INGESTOR_AUTO_OFFSET_RESET=safe" in output
    assert f"{topic}/0 ({len(OLD)} records)" in output
    assert f"{topic}/1" not in output  # only recent records there
    assert "INGESTOR_AUTO_OFFSET_RESET=earliest to bill that history" in output
    assert "INGESTOR_AUTO_OFFSET_RESET=latest to skip it" in output
    assert await billed(api, meter_id) == 0
    assert await committed_offsets(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic) == {}


async def test_safe_refusal_in_process_is_a_settings_error_naming_the_setting(
    kafka_bootstrap: str, topic_factory: TopicFactory, stripe: tuple[str, StripeApi, str]
) -> None:
    emu_url, _, _ = stripe
    topic = await with_history(kafka_bootstrap, topic_factory)
    env = env_for(kafka_bootstrap, topic, emu_url, INGESTOR_AUTO_OFFSET_RESET="safe")
    await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
    worker = Worker(settings_mod.load(env))
    with pytest.raises(offset_reset.OffsetResetRefusedError, match=f"{topic}/0 \\(30 records\\)") as raised:
        async with worker:
            pytest.fail("the worker started")
    assert isinstance(raised.value, settings_mod.SettingsError)  # `ingestor run` exits 2 on it


async def test_safe_starts_from_the_earliest_offset_when_every_record_is_recent(
    kafka_bootstrap: str, topic_factory: TopicFactory, stripe: tuple[str, StripeApi, str]
) -> None:
    emu_url, api, meter_id = stripe
    topic = await topic_factory(2, "reset")
    await produce_events(kafka_bootstrap, topic, FRESH)
    await produce_events(kafka_bootstrap, topic, FRESH, partition=1)
    await run_to_end(env_for(kafka_bootstrap, topic, emu_url))
    assert await billed(api, meter_id) == 2 * sum(FRESH)


async def test_earliest_bills_the_history_and_safe_then_resumes_from_the_committed_offsets(
    kafka_bootstrap: str, topic_factory: TopicFactory, stripe: tuple[str, StripeApi, str]
) -> None:
    emu_url, api, meter_id = stripe
    topic = await with_history(kafka_bootstrap, topic_factory)
    env = env_for(kafka_bootstrap, topic, emu_url, INGESTOR_AUTO_OFFSET_RESET="earliest")
    await run_to_end(env)
    assert await billed(api, meter_id) == sum(OLD) + 2 * sum(FRESH)
    # The same group, now `safe`: its committed offsets decide, however old the records before them.
    await produce_events(kafka_bootstrap, topic, [7])
    await run_to_end({**env, "INGESTOR_AUTO_OFFSET_RESET": "safe"})
    assert await billed(api, meter_id) == sum(OLD) + 2 * sum(FRESH) + 7


async def test_latest_skips_the_history(
    kafka_bootstrap: str, topic_factory: TopicFactory, stripe: tuple[str, StripeApi, str]
) -> None:
    emu_url, api, meter_id = stripe
    topic = await with_history(kafka_bootstrap, topic_factory)
    env = env_for(kafka_bootstrap, topic, emu_url, INGESTOR_AUTO_OFFSET_RESET="latest")
    async with running_worker(env) as worker:
        await wait_for(_assigned(worker, 2), 30, "both partitions assigned")
        for partition in (0, 1):  # the reset to the end has happened
            assert await worker.consumer.position(TopicPartition(topic, partition)) > 0
        await produce_events(kafka_bootstrap, topic, [11, 13])
        ends = await end_offsets(kafka_bootstrap, topic)

        async def done() -> bool:
            return (await committed_offsets(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)).get(0) == ends[0]

        await wait_for(done, 60, "the new records done")
    assert await billed(api, meter_id) == 11 + 13


def _assigned(worker: Worker, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(worker.tracker.assigned()) == count

    return check
