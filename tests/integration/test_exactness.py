"""Exactness where one record cannot finish, and dead letters exactly once across a crash.

1. A record too large for the dead-letter topic (the source topic allows it) is dead-lettered without its
   original, keeping its coordinates; its partition commits to the end (it used to stay unset forever).
2. A record whose dead-letter write keeps failing pauses its partition alone once the partition runs
   INGESTOR_MAX_PARTITION_AHEAD records ahead (it used to deliver everything after it while its commit stood
   still), fails readiness naming the partition, and everything completes once the topic takes writes.
3. Dead-letter records written, then the worker SIGKILLed before its offsets were committed: after the
   restart a read_committed reader sees each bad record once (it used to see it twice).
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import pytest

from ingestor import dlq_format
from ingestor_dev.devkafka import committed_offsets, free_port
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.integration.harness import (
    StripeApi,
    ensure_topic,
    read_topic,
    running_worker,
    start_worker_process,
    stop_process,
    wait_for,
    worker_env,
)
from tests.integration.test_dead_letters import (
    Sent,
    assert_billed,
    expected_totals,
    good_records,
    header_map,
    produce_records,
    set_topic_config,
    wait_committed_to_end,
)

pytestmark = pytest.mark.kafka

BAD_JSON = b'{"event_name":"api_requests","payload":{"stripe_customer_id":"cus_dl_0","value":"1.5"}}'


def interleaved(n_bad: int, n_good: int, partitions: int, *, tag: str) -> tuple[list[Sent], list[Sent], list[Sent]]:
    """(bad, good, all): bad records spread over the partitions, each after a good one, then the rest."""
    bad = [Sent(i % partitions, b"bad", BAD_JSON, reason="value_invalid", label=f"bad {i}") for i in range(n_bad)]
    good = good_records(n_good, partitions, tag=tag)
    return bad, good, [r for pair in zip(good[:n_bad], bad, strict=True) for r in pair] + good[n_bad:]


def assert_each_dead_lettered_once(letters: list[Any], bad: list[Sent]) -> None:
    """The DLQ (read_committed) holds each bad record exactly once, by its source coordinates."""
    headers = [header_map(letter.headers) for letter in letters]
    coordinates = sorted((int(h[dlq_format.SOURCE_PARTITION]), int(h[dlq_format.SOURCE_OFFSET])) for h in headers)
    assert coordinates == sorted((r.partition, r.offset) for r in bad), f"{len(letters)} letters for {len(bad)} bad"


def on(partition: int, records: list[Sent]) -> list[Sent]:
    for record in records:
        record.partition = partition
    return records


async def test_a_record_too_large_for_the_dlq_is_dead_lettered_without_its_original_and_commits(
    kafka_bootstrap, topic_factory
):
    topic = await topic_factory(1, "huge", config={"max.message.bytes": str(2 * 1024 * 1024)})
    dlq = await topic_factory(1, "huge-dlq")  # Kafka's default max.message.bytes (1 MiB)
    huge = Sent(0, b"big-key", b'{"event_name":"api_requests","pad":"' + b"x" * 1_500_000 + b'"}', label="huge")
    huge.reason = "record_too_large"
    after = on(0, good_records(2000, 1, tag="after-huge"))
    records = [huge, *after]
    await produce_records(kafka_bootstrap, topic, records)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_id = await api.create_meter("api_requests", "sum")
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_DLQ_TOPIC=dlq)
        async with running_worker(env):
            await wait_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic, timeout=60)
        letters = await read_topic(kafka_bootstrap, dlq)
        await assert_billed(api, {"api_requests": meter_id}, expected_totals(records, {"api_requests": "sum"}))
        stats = await api.stats()
    assert stats["events_accepted"] == stats["unique_identifiers"] == len(after)
    assert len(letters) == 1
    headers = header_map(letters[0].headers)
    assert headers[dlq_format.REASON] == b"record_too_large"
    assert headers[dlq_format.ORIGINAL_OMITTED] == b"true"
    assert int(headers[dlq_format.ORIGINAL_BYTES]) > 1_500_000
    assert headers[dlq_format.SOURCE_TOPIC] == topic.encode()
    assert headers[dlq_format.SOURCE_OFFSET] == str(huge.offset).encode()
    assert letters[0].key == b"big-key"
    assert letters[0].value == b""


async def readiness(port: int) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status, (await response.json())["reason"]


async def test_a_record_that_cannot_finish_pauses_its_partition_alone_and_fails_readiness(
    kafka_bootstrap, topic_factory
):
    limit, per_poll = 500, 100
    topic = await topic_factory(2, "ahead")
    dlq = await topic_factory(1, "ahead-dlq", config={"max.message.bytes": "100"})  # refuses every write
    bad = Sent(0, b"bad-key", BAD_JSON, reason="value_invalid", label="bad")
    stuck_side = on(0, good_records(3000, 1, tag="p0"))
    other_side = on(1, good_records(500, 1, tag="p1"))
    records = [bad, *stuck_side, *other_side]
    await produce_records(kafka_bootstrap, topic, records)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_id = await api.create_meter("api_requests", "sum")
        env = worker_env(
            kafka_bootstrap,
            topic,
            emu.url,
            INGESTOR_DLQ_TOPIC=dlq,
            INGESTOR_MAX_PARTITION_AHEAD=str(limit),
            INGESTOR_FETCH_MAX_RECORDS=str(per_poll),
            INGESTOR_STUCK_AFTER_S="2",
        )
        group = env["INGESTOR_GROUP_ID"]
        async with running_worker(env) as worker:

            async def other_partition_done() -> bool:
                return (await committed_offsets(kafka_bootstrap, group, topic)).get(1) == len(other_side)

            await wait_for(other_partition_done, 60, "partition 1 committed to its end")

            async def named_unready() -> bool:
                status, reason = await readiness(worker.metrics_port)
                return status == 503 and f"{topic}/0" in reason

            await wait_for(named_unready, 30, "readiness failing and naming the stuck partition")
            accepted_while_stuck = (await api.stats())["events_accepted"]
            committed = await committed_offsets(kafka_bootstrap, group, topic)
            stalled = worker.metrics.registry.get_sample_value(
                "ingestor_partition_stalled_seconds", {"topic": topic, "partition": "0"}
            )
            await set_topic_config(kafka_bootstrap, dlq, {"max.message.bytes": "1048576"})
            await wait_committed_to_end(kafka_bootstrap, group, topic, timeout=60)
            ready_after = await readiness(worker.metrics_port)
        letters = await read_topic(kafka_bootstrap, dlq)
        await assert_billed(api, {"api_requests": meter_id}, expected_totals(records, {"api_requests": "sum"}))
        stats = await api.stats()
    # Partition 0 ran at most the limit plus one poll (and one more poll in flight) past its bad record.
    assert accepted_while_stuck <= len(other_side) + limit + 2 * per_poll, accepted_while_stuck
    assert committed.get(0, 0) <= bad.offset
    assert stalled is not None
    assert stalled >= 2
    assert ready_after == (200, "ok")
    assert stats["events_accepted"] == stats["unique_identifiers"] == len(stuck_side) + len(other_side)
    assert [header_map(letter.headers)[dlq_format.SOURCE_OFFSET] for letter in letters] == [str(bad.offset).encode()]


async def test_dead_letters_are_not_written_twice_when_the_worker_dies_before_committing(
    kafka_bootstrap, topic_factory, tmp_path
):
    topic = await topic_factory(3, "dl-kill")
    bad, good, records = interleaved(30, 600, 3, tag="kill")
    await produce_records(kafka_bootstrap, topic, records)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_id = await api.create_meter("api_requests", "sum")
        port = free_port()
        env = worker_env(
            kafka_bootstrap,
            topic,
            emu.url,
            INGESTOR_METRICS_PORT=str(port),
            INGESTOR_COMMIT_INTERVAL_MS="600000",  # the first worker never commits on its own
        )
        await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        log = str(tmp_path / "worker.log")
        first = start_worker_process(env, log)
        try:

            async def everything_handled() -> bool:
                return (await api.stats())["events_accepted"] >= len(good)

            await wait_for(everything_handled, 60, "the first worker to deliver every valid event")
            await asyncio.sleep(1.0)  # dead-letter writes that happen as records come are acked by now
        finally:
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
        assert await committed_offsets(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic) == {}
        second = start_worker_process({**env, "INGESTOR_COMMIT_INTERVAL_MS": "200"}, log)
        try:
            await wait_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic, timeout=60)
        finally:
            assert await asyncio.to_thread(stop_process, second, signal.SIGTERM, 30) == 0
        letters = await read_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        await assert_billed(api, {"api_requests": meter_id}, expected_totals(records, {"api_requests": "sum"}))
    assert_each_dead_lettered_once(letters, bad)


async def test_dead_letters_wait_for_earlier_records_so_a_crash_cannot_write_them_twice(
    kafka_bootstrap, topic_factory, tmp_path
):
    """Bad records among events Stripe does not take yet: their dead-letter records must wait until the
    committed offset can pass them (it used to write them at once, in a transaction whose offset stayed
    behind them, and write them again after a SIGKILL)."""
    topic = await topic_factory(2, "dl-wait")
    bad, _, records = interleaved(20, 400, 2, tag="wait")
    await produce_records(kafka_bootstrap, topic, records)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_id = await api.create_meter("api_requests", "sum")
        await api.set_faults(error_no_header=1.0, error_status=503)  # the stream refuses everything
        env = worker_env(kafka_bootstrap, topic, emu.url)
        await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        log = str(tmp_path / "worker.log")
        first = start_worker_process(env, log)
        try:
            await asyncio.sleep(6.0)  # many commit intervals with every bad record consumed
        finally:
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
        written_before_the_crash = len(await read_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"]))
        await api.set_faults(replace=True)
        second = start_worker_process(env, log)
        try:
            await wait_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic, timeout=60)
        finally:
            assert await asyncio.to_thread(stop_process, second, signal.SIGTERM, 30) == 0
        letters = await read_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        await assert_billed(api, {"api_requests": meter_id}, expected_totals(records, {"api_requests": "sum"}))
    assert written_before_the_crash == 0
    assert_each_dead_lettered_once(letters, bad)
