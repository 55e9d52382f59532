"""Metrics that move, health that tells the truth, and no secret anywhere a worker writes."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingestor_dev.devkafka import create_topic, produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.corpus import BAD_RECORDS
from tests.integration.harness import (
    API_KEY,
    StripeApi,
    read_topic,
    running_worker,
    wait_for,
    worker_env,
)
from tests.integration.test_pipeline import create_meters, usage

pytestmark = pytest.mark.kafka


async def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def total(metrics: dict, name: str, **labels: str) -> float:
    return sum(v for lbl, v in metrics.get(name, []) if all(lbl.get(k) == x for k, x in labels.items()))


async def status(port: int, path: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status


@pytest.mark.timeout(180)
async def test_every_metric_moves_during_a_run(kafka_bootstrap, topic_factory, caplog):
    caplog.set_level(logging.DEBUG)
    topic = await topic_factory(3, "obs")
    values, _ = usage(6_000, seed=21)
    bad = [b.value for b in BAD_RECORDS[:10]]
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        await create_meters(api)
        await api.set_faults(rate_limit=0.05, error_retry_true=0.05, lock_timeout=0.03, latency_s=0.005)
        await produce(kafka_bootstrap, topic, values[:3000] + bad + values[3000:])
        env = worker_env(
            kafka_bootstrap,
            topic,
            emu.url,
            INGESTOR_BATCH_MAX_EVENTS="20",
            INGESTOR_MAX_BUFFERED_EVENTS="100",
            INGESTOR_MAX_IN_FLIGHT="4",
            INGESTOR_METER_CATALOG="off",
        )
        await create_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"], 1)
        seen_paused = seen_share = seen_pace = 0.0
        async with running_worker(env) as worker:
            port = worker.metrics_port

            async def done() -> bool:
                nonlocal seen_paused, seen_share, seen_pace
                m = await scrape(port)
                seen_paused = max(seen_paused, total(m, "ingestor_partitions_paused"))
                # The budget is shared by demand: a lone replica gets all of it while it has a backlog, and
                # only what it uses once idle, so these are read during the run, not at its end.
                seen_share = max(seen_share, total(m, "ingestor_budget_share_ratio"))
                seen_pace = max(seen_pace, total(m, "ingestor_budget_requests_per_second"))
                moved = total(m, "ingestor_events_delivered_total") + total(m, "ingestor_events_dead_lettered_total")
                return moved >= len(values) + len(bad) and total(m, "ingestor_consumer_lag_records") == 0

            await wait_for(done, 120, "every record delivered or dead-lettered", step=0.05)
            await asyncio.sleep(0.5)  # one more commit tick
            m = await scrape(port)
            dlq = await read_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
            tokens = list(emu.state.sessions.by_token)
        stats = await api.stats()
    assert total(m, "ingestor_events_consumed_total", topic=topic) == len(values) + len(bad)
    assert total(m, "ingestor_events_delivered_total", topic=topic) == len(values)
    assert total(m, "ingestor_events_dead_lettered_total", topic=topic) == len(bad)
    for record in BAD_RECORDS[:10]:
        assert total(m, "ingestor_events_dead_lettered_total", reason=record.reason) >= 1
    assert total(m, "ingestor_requests_total", outcome="accepted", status="200") > 0
    assert total(m, "ingestor_requests_total", outcome="retry") > 0
    assert total(m, "ingestor_rate_limited_total", reason="global-rate") > 0
    assert total(m, "ingestor_rate_limited_total", reason="none") > 0  # lock_timeout
    assert total(m, "ingestor_retries_total") > 0
    assert total(m, "ingestor_request_duration_seconds_count") > 0
    assert total(m, "ingestor_batch_size_events_count") > 0
    assert total(m, "ingestor_batch_size_events_sum") == len(values)
    assert total(m, "ingestor_batch_size_bytes_count") > 0
    assert total(m, "ingestor_end_to_end_latency_seconds_count") > 0
    assert total(m, "ingestor_requests_in_flight") == 0
    assert total(m, "ingestor_session_rotations_total") >= 1
    assert total(m, "ingestor_session_expiry_seconds") > 0
    assert total(m, "ingestor_session_refresh_failures_total") == 0
    assert seen_share == 1.0, "a lone replica with a backlog never had the whole budget"
    assert 0.0 <= total(m, "ingestor_budget_share_ratio") <= 1.0
    assert seen_pace > 0
    assert total(m, "ingestor_budget_total_requests_per_second") == 100_000
    assert total(m, "ingestor_budget_factor_ratio") < 1.0  # backed off after rate-limit 429s
    assert total(m, "ingestor_budget_wait_seconds_total") >= 0
    assert len(m["ingestor_consumer_lag_records"]) == 3
    assert {lbl["partition"] for lbl, _ in m["ingestor_committed_offset"]} == {"0", "1", "2"}
    assert total(m, "ingestor_committed_offset") == len(values) + len(bad)
    assert total(m, "ingestor_partitions_assigned") == 3
    assert seen_paused > 0, "backpressure never paused a partition"
    assert total(m, "ingestor_commits_total", outcome="ok") > 0
    assert total(m, "ingestor_rebalances_total", kind="assigned") >= 1
    assert total(m, "ingestor_ready") == 1
    assert total(m, "ingestor_dlq_write_failures_total") == 0
    assert stats["events_accepted"] == len(values)
    # No secret anywhere: logs, metrics, dead-letter headers.
    assert tokens, "the emulator issued no token"
    captured = [caplog.text, orjson.dumps(m).decode()]
    captured += [repr(r.headers) for r in dlq]
    for secret in [API_KEY, *tokens]:
        for text in captured:
            assert secret not in text


@pytest.mark.timeout(120)
async def test_a_stuck_worker_fails_readiness_then_liveness_and_recovers(kafka_bootstrap, topic_factory):
    topic = await topic_factory(2, "stuck")
    values, _ = usage(2_000, seed=4)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        await create_meters(api)
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_STUCK_AFTER_S="2", INGESTOR_COMMIT_INTERVAL_MS="100")
        async with running_worker(env) as worker:
            port = worker.metrics_port

            async def ready() -> bool:
                return await status(port, "/readyz") == 200

            await wait_for(ready, 30, "the worker to become ready")
            assert await status(port, "/healthz") == 200
            # Refuse every connection (the control endpoint too) for 9 s, then answer again by itself.
            await api.set_faults(refuse_connections=True, refuse_for_s=9)
            await produce(kafka_bootstrap, topic, values)

            async def not_ready() -> bool:
                return await status(port, "/readyz") == 503

            await wait_for(not_ready, 10, "/readyz to fail while lag grows and nothing is delivered")
            assert await status(port, "/healthz") == 200  # not yet wedged for twice the time

            async def not_live() -> bool:
                return await status(port, "/healthz") == 503

            await wait_for(not_live, 10, "/healthz to fail after twice INGESTOR_STUCK_AFTER_S")
            m = await scrape(port)
            assert total(m, "ingestor_ready") == 0
            assert total(m, "ingestor_consumer_lag_records") > 0

            async def recovered() -> bool:
                return await status(port, "/readyz") == 200 and await status(port, "/healthz") == 200

            await wait_for(recovered, 30, "health to recover once Stripe answers again")
            await wait_for(lambda: _accepted(api, len(values)), 30, "the backlog to be delivered after recovery")


async def _accepted(api: StripeApi, n: int) -> bool:
    return (await api.stats())["events_accepted"] >= n


@pytest.mark.timeout(90)
async def test_session_refresh_failures_are_counted_and_rotation_recovers(kafka_bootstrap, topic_factory):
    topic = await topic_factory(1, "refresh")
    async with Emulator(EmulatorConfig(session_ttl=3.0, stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        await create_meters(api)
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_SESSION_REFRESH_MARGIN_S="1")
        async with running_worker(env) as worker:
            port = worker.metrics_port
            assert worker.sessions is not None
            await wait_for(lambda: _has_rotated(worker, 1), 20, "the first session")
            # Every API call fails for a while (the session endpoint included), then Stripe recovers.
            await api.set_faults(error_no_header=1.0, error_status=503, scope="all", max_faults=6)

            async def failed() -> bool:
                return total(await scrape(port), "ingestor_session_refresh_failures_total") > 0

            await wait_for(failed, 30, "a failed session refresh to be counted")
            rotations = worker.sessions.rotations_total
            await wait_for(lambda: _has_rotated(worker, rotations + 1), 30, "rotation to recover")
            m = await scrape(port)
    assert total(m, "ingestor_session_refresh_failures_total") > 0
    assert total(m, "ingestor_session_expiry_seconds") > 0


async def _has_rotated(worker, n: int) -> bool:
    return worker.sessions is not None and worker.sessions.rotations_total >= n
