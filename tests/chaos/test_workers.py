"""Chaos on the workers: SIGKILL at random moments (scenario 1), replicas scaled 1 -> 3 -> 1 (scenario 7)."""

from __future__ import annotations

import pytest

from tests.chaos.profile import CURRENT
from tests.chaos.run import chaos_run

pytestmark = [pytest.mark.kafka, pytest.mark.chaos, pytest.mark.timeout(CURRENT.timeout(240))]


async def test_sigkill_three_times_at_random_moments(kafka_bootstrap, tmp_path, chaos_seed, profile):
    async with chaos_run(kafka_bootstrap, tmp_path, chaos_seed, profile) as run:
        moments = sorted(run.rng.uniform(0.05, 0.8) for _ in range(3))
        print(f"SIGKILL at {[round(m, 3) for m in moments]} of the valid events accepted")
        run.fleet.start()
        for moment in moments:
            await run.progress(moment)
            await run.fleet.kill()
            run.fleet.start()
        assert run.fleet.killed == 3
        await run.finish()


async def test_replicas_scaled_one_three_one(kafka_bootstrap, tmp_path, chaos_seed, profile):
    async with chaos_run(kafka_bootstrap, tmp_path, chaos_seed, profile, partitions=6) as run:
        first = run.fleet.start()
        await run.progress(0.15)
        run.fleet.start()
        run.fleet.start()
        await run.progress(0.5)
        # Scale in: the first replica and one of the new ones go (SIGTERM, as Kubernetes does).
        await run.fleet.stop(first)
        await run.fleet.stop()
        assert len(run.fleet.running) == 1
        await run.finish()
