"""The budget as Stripe sees it: requests counted on the wire, by the kernel's arrival times (the wire tap),
while faults cycle: 5xx, answers slower than the client's timeout, 429s, a revoked session."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from ingestor_dev.devkafka import produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from ingestor_dev.wiretap import WireTap
from tests.integration.harness import (
    StripeApi,
    ensure_topic,
    start_worker_process,
    stop_process,
    wait_for,
    worker_env,
)
from tests.integration.test_pipeline import assert_totals, create_meters, usage

pytestmark = pytest.mark.kafka

BUDGET = 100
EVENTS = 7_000
#: (faults, seconds on); each phase is followed by 2 s without faults
PHASES: list[tuple[dict[str, Any], float]] = [
    ({"revoke": True, "latency_s": 0.6, "latency_jitter_s": 0.4, "scope": "session"}, 4),  # a slow new session
    ({"error_retry_true": 0.15, "error_no_header": 0.15}, 4),
    ({"slow_response": 0.2, "slow_response_s": 2.5}, 4),  # the worker gives up after 1 s
    ({"revoke": True, "error_no_header": 0.5, "scope": "session"}, 4),  # no new session for a while
    ({"rate_limit": 0.3, "lock_timeout": 0.1}, 4),  # the worker's rate halves, then recovers slowly
]


async def cycle_faults(emu: Emulator, rounds: int) -> None:
    for _ in range(rounds):
        for faults, seconds in PHASES:
            changes = {name: value for name, value in faults.items() if name != "revoke"}
            emu.set_faults(**changes)
            if faults.get("revoke"):
                emu.revoke_sessions()
            await asyncio.sleep(seconds)
            emu.set_faults()
            await asyncio.sleep(2)


@pytest.mark.timeout(400)
async def test_no_second_on_the_wire_exceeds_the_budget_while_faults_cycle(kafka_bootstrap, topic_factory, tmp_path):
    topic = await topic_factory(6, "wire")
    values, totals = usage(EVENTS, seed=41)
    await produce(kafka_bootstrap, topic, values)
    config = EmulatorConfig(stream_rps_limit=0, trust_arrival_header=True)
    async with Emulator(config, host="127.0.0.1", port=0) as emu, WireTap(emu.url, stamp=True) as tap:
        api = StripeApi(emu.url)
        meter_ids = await create_meters(api)
        env = worker_env(
            kafka_bootstrap,
            topic,
            tap.url,
            INGESTOR_RPS_BUDGET=str(BUDGET),
            INGESTOR_BATCH_MAX_EVENTS="2",
            INGESTOR_REQUEST_TIMEOUT_S="1",
            INGESTOR_BUDGET_TOPIC="off",
        )
        await ensure_topic(kafka_bootstrap, env["INGESTOR_DLQ_TOPIC"])
        proc = start_worker_process(env, str(tmp_path / "worker.log"))
        try:

            async def delivering() -> bool:
                return (await api.stats())["events_accepted"] > 0

            await wait_for(delivering, 60, "the worker to deliver")
            await cycle_faults(emu, rounds=2)

            async def all_accepted() -> bool:
                return (await api.stats())["events_accepted"] >= EVENTS

            await wait_for(all_accepted, 200, "every event accepted")
        finally:
            if proc.poll() is None:
                await asyncio.to_thread(stop_process, proc, signal.SIGTERM, 40)
        stats = await api.stats()
        await assert_totals(api, meter_ids, totals)
    wire = tap.arrivals()
    assert proc.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert stats["faults_injected"] > 0
    # Every stream request the emulator saw went through the tap, and the emulator's window is the wire's.
    assert wire.count() == stats["stream_requests"]
    assert stats["stream_max_requests_per_1s_window"] == wire.max_in_window()
    assert wire.max_in_window() <= BUDGET, (wire.max_in_window(), wire.per_second(), wire.max_lag)
