"""Chaos on Stripe's side (the emulator's faults): 5xx and latency spikes (3), a 429 storm (4), sessions
revoked while session creation fails (5), connections refused (6), answers slower than the timeout (9)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from ingestor_dev.emulator import EmulatorConfig
from tests.chaos.profile import CURRENT
from tests.chaos.run import ChaosRun, chaos_run

pytestmark = [pytest.mark.kafka, pytest.mark.chaos, pytest.mark.timeout(CURRENT.timeout(240))]


async def cycle(run: ChaosRun, phases: list[dict], period: float) -> None:
    """Switch the emulator's faults through `phases`, `period` seconds each, until cancelled."""
    n = 0
    while True:
        run.emu.set_faults(**phases[n % len(phases)])
        n += 1
        await asyncio.sleep(period)


@contextlib.asynccontextmanager
async def cycling(run: ChaosRun, phases: list[dict], period: float):
    task = asyncio.create_task(cycle(run, phases, period))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        run.emu.set_faults()


async def test_thirty_percent_5xx_and_latency_spikes(kafka_bootstrap, tmp_path, chaos_seed, profile):
    async with chaos_run(kafka_bootstrap, tmp_path, chaos_seed, profile) as run:
        errors = {"error_retry_true": 0.15, "error_no_header": 0.15, "scope": "stream"}
        phases = [
            {**errors, "error_status": 500},
            {**errors, "error_status": 503, "latency_s": 0.5, "latency_jitter_s": 1.5},  # a latency spike
            {**errors, "error_status": 502},
            {**errors, "error_status": 500, "latency_s": 1.0, "latency_jitter_s": 2.0},
        ]
        run.fleet.start()
        await run.progress(0.05)
        async with cycling(run, phases, profile.fault_s / 2):
            await run.progress(0.95, timeout=profile.settle_s)
        stats = await run.api.stats()
        assert stats["faults_injected"] > 0
        await run.finish()


async def test_429_storm_with_the_rate_limiter_and_lock_timeouts(kafka_bootstrap, tmp_path, chaos_seed, profile):
    # The emulator's limiter allows 25 requests/s; the worker believes it has 250 (a stale share, another
    # deployment on the account...) and must back off; 429 lock_timeout answers come on top.
    limiter = EmulatorConfig(stream_rps_limit=25)
    env = {"INGESTOR_RPS_BUDGET": "250", "INGESTOR_BATCH_MAX_EVENTS": "25"}
    async with chaos_run(kafka_bootstrap, tmp_path, chaos_seed, profile, emulator=limiter, env=env) as run:
        run.emu.set_faults(rate_limit=0.1, rate_limit_reason="global-rate", lock_timeout=0.15)
        run.fleet.start()
        await run.progress(0.95, timeout=profile.settle_s)
        run.emu.set_faults()
        stats = await run.api.stats()
        assert stats["rate_limited"] > 0
        assert stats["faults_injected"] > 0
        await run.finish()


async def test_sessions_revoked_while_session_creation_fails(kafka_bootstrap, tmp_path, chaos_seed, profile):
    # Short tokens, so that rotations fail too while creation is down.
    emulator = EmulatorConfig(stream_rps_limit=0, session_ttl=5.0)
    env = {"INGESTOR_SESSION_REFRESH_MARGIN_S": "1"}
    async with chaos_run(kafka_bootstrap, tmp_path, chaos_seed, profile, emulator=emulator, env=env) as run:
        run.fleet.start()
        await run.progress(0.2)
        run.emu.set_faults(error_no_header=1.0, error_status=503, scope="session")
        run.emu.revoke_sessions()
        await asyncio.sleep(profile.fault_s)
        run.emu.set_faults()
        await run.finish()


async def test_stripe_refuses_connections_for_twenty_seconds(kafka_bootstrap, tmp_path, chaos_seed, profile):
    async with chaos_run(kafka_bootstrap, tmp_path, chaos_seed, profile) as run:
        run.fleet.start()
        await run.progress(run.rng.uniform(0.1, 0.4))
        run.emu.set_faults(refuse_connections=True, refuse_for_s=profile.refuse_s)
        await asyncio.sleep(profile.refuse_s / 2)
        refused_at = await run.accepted()
        await asyncio.sleep(profile.refuse_s / 2 + 1)
        assert not run.emu.faults.refuse_connections
        assert refused_at < len(run.ledger.identifiers()), "the run ended before Stripe went away"
        await run.finish()


async def test_responses_slower_than_the_client_timeout(kafka_bootstrap, tmp_path, chaos_seed, profile):
    env = {"INGESTOR_REQUEST_TIMEOUT_S": "1"}
    async with chaos_run(kafka_bootstrap, tmp_path, chaos_seed, profile, env=env) as run:
        # A third of the requests are applied by Stripe, then answered after the client gave up.
        run.emu.set_faults(slow_response=0.3, slow_response_s=1.5)
        run.fleet.start()
        await run.progress(0.95, timeout=profile.settle_s)
        run.emu.set_faults()
        stats = await run.api.stats()
        assert stats["duplicates_dropped"] > 0, "no timed-out request was sent again"
        await run.finish()
