"""One chaos run: the emulator in this process, fresh topics, meters, the workload produced, a fleet of
`ingestor run` processes; the scenario breaks things, then `finish()` settles, stops and checks.

    async with chaos_run(kafka_bootstrap, tmp_path, chaos_seed, profile) as run:
        run.fleet.start()
        await run.progress(0.3)          # a third of the valid events accepted
        ...                              # the fault
        await run.finish()               # settle (bounded), SIGTERM every worker, assert_identity
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ingestor_dev.devkafka import create_topic
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.chaos.accounting import assert_identity, wait_settled
from tests.chaos.workload import Ledger, bad_records, create_meters, mix, produce_into, valid_records
from tests.integration.harness import StripeApi, WorkerFleet, worker_env

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from tests.chaos.profile import Profile
    from tests.integration.test_dead_letters import Sent

#: Paced so that a short run lasts long enough for faults to land mid-run: 10 events per request,
#: 60 requests/s (about 600 events/s whatever the machine).
PACED = {"INGESTOR_BATCH_MAX_EVENTS": "10", "INGESTOR_RPS_BUDGET": "60"}


@dataclass
class ChaosRun:
    bootstrap: str
    emu: Emulator
    api: StripeApi
    ledger: Ledger
    fleet: WorkerFleet
    rng: random.Random
    profile: Profile
    notes: list[str] = field(default_factory=list)

    async def accepted(self) -> int:
        """Distinct identifiers accepted so far (read in-process: the port may be refusing connections)."""
        return int((await self.emu.stats())["unique_identifiers"])

    async def progress(self, fraction: float, timeout: float | None = None) -> None:
        """Wait until `fraction` of the valid events are accepted (bounded; fails if every worker died)."""
        target = int(fraction * self.ledger.valid_count())
        deadline = time.monotonic() + (timeout or max(90.0, self.profile.settle_s))
        while time.monotonic() < deadline:
            if await self.accepted() >= target:
                return
            if self.fleet.running and self.fleet.alive() == 0:
                break
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"{target} events not accepted (CHAOS_SEED={self.ledger.seed}); "
            f"crashed workers: {self.fleet.crashed()}\n{self.fleet.log_tail()}"
        )

    async def finish(self, settle_s: float | None = None) -> None:
        """Wait for the run to settle (bounded), SIGTERM every worker, then check the whole identity."""
        settle = self.profile.settle_s if settle_s is None else settle_s
        if not await wait_settled(self.api, self.bootstrap, self.ledger, self.fleet, settle):
            why = "no worker left alive" if self.fleet.alive() == 0 else f"not within {settle} s"
            self.notes.append(f"the run did not settle: {why}")
        await self.fleet.stop_all()
        await assert_identity(self.api, self.bootstrap, self.ledger, self.fleet, self.notes)


async def new_topics(
    bootstrap: str, partitions: int, *, source_config: dict[str, str] | None, dlq_config: dict[str, str] | None
) -> tuple[str, str]:
    topic = f"chaos-{uuid.uuid4().hex[:10]}"
    await create_topic(bootstrap, topic, partitions, config=source_config)
    await create_topic(bootstrap, f"{topic}.dlq", 1, config=dlq_config)
    return topic, f"{topic}.dlq"


@contextlib.asynccontextmanager
async def chaos_run(
    bootstrap: str,
    log_dir: Path,
    seed: int,
    profile: Profile,
    *,
    partitions: int = 4,
    emulator: EmulatorConfig | None = None,
    source_config: dict[str, str] | None = None,
    dlq_config: dict[str, str] | None = None,
    extra_records: list[Sent] | None = None,
    extra_meters: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> AsyncIterator[ChaosRun]:
    """Everything a scenario needs, produced and ready; the workers are the scenario's to start."""
    rng = random.Random(seed)
    topic, dlq = await new_topics(bootstrap, partitions, source_config=source_config, dlq_config=dlq_config)
    config = emulator or EmulatorConfig(stream_rps_limit=0)
    async with Emulator(config, host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_ids, formulas = await create_meters(api, extra_meters)
        ledger = Ledger(topic, dlq, meter_ids, formulas, seed)
        bad = [r for r in bad_records(partitions) if r.label not in exclude] + (extra_records or [])
        records = mix(rng, valid_records(rng, profile.events, partitions), bad)
        await produce_into(bootstrap, ledger, records)
        overrides: dict[str, Any] = {
            "INGESTOR_DLQ_TOPIC": dlq,
            "INGESTOR_DRAIN_TIMEOUT_S": "10",
            "INGESTOR_COMMIT_INTERVAL_MS": "300",
            **PACED,
            **(env or {}),
        }
        async with WorkerFleet(worker_env(bootstrap, topic, emu.url, **overrides), log_dir) as fleet:
            yield ChaosRun(bootstrap, emu, api, ledger, fleet, rng, profile)
