"""The soak: a long run at half the worker's capacity with faults cycling on and off (`make soak`).

    .venv/bin/python -m tests.chaos.soak --minutes 30          # the default
    .venv/bin/python -m tests.chaos.soak --minutes 3 --rate 2000

A local broker (or INGESTOR_TEST_KAFKA_BOOTSTRAP), the emulator in this process and one `ingestor run`
with a request budget of `--budget` requests/s (100 events each). Without `--rate`, the worker's capacity
under that budget is measured first on a backlog, and traffic runs at half of it. The budget bounds the
run's size: the emulator keeps every identifier of the last 24 hours in memory, as Stripe de-duplicates,
about 250 bytes each (30 minutes at 7,500 events/s: 13.5 million, about 3.5 GB).
Every `--phase-s` seconds the next fault is switched on for half the phase (5xx, 429s, latency spikes,
answers slower than the client's timeout, connections refused, sessions revoked, a SIGKILL of the
worker). A line per `--report-s` shows the worker's RSS; at the end the traffic stops, the run settles
and the whole identity of `tests.chaos.accounting` is checked. Exit status 0 only if it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from ingestor_dev.devkafka import LocalKafka, produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.chaos.accounting import assert_identity, wait_settled
from tests.chaos.profile import Profile
from tests.chaos.run import new_topics
from tests.chaos.workload import BILLED_METERS, CUSTOMERS, Ledger, bad_records, create_meters, produce_into
from tests.conftest import REUSE_ENV
from tests.integration.harness import StripeApi, WorkerFleet, worker_env

PARTITIONS = 6
#: One identifier in this many is checked individually at the end (all are counted).
SAMPLE_EVERY = 500
CALIBRATION_EVENTS = 150_000

FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("5xx 30%", {"error_retry_true": 0.15, "error_no_header": 0.15}),
    ("429 storm", {"rate_limit": 0.3, "lock_timeout": 0.1}),
    ("latency spikes", {"latency_s": 0.3, "latency_jitter_s": 1.5}),
    ("slower than the timeout", {"slow_response": 0.2, "slow_response_s": 3.0}),
    ("connections refused", {"refuse_connections": True}),
    ("sessions revoked", {"revoke": True}),
    ("worker SIGKILL", {"kill": True}),
]


class Soak:
    def __init__(self, args: argparse.Namespace, bootstrap: str, emu: Emulator, ledger: Ledger, fleet: WorkerFleet):
        self.args, self.bootstrap, self.emu, self.ledger, self.fleet = args, bootstrap, emu, ledger, fleet
        self.rng = random.Random(args.seed)
        self.run = uuid.uuid4().hex[:8]
        self.produced = 0
        self.phase = "calm"
        self.rss: list[tuple[float, float]] = []

    def batch(self, n: int) -> list[bytes]:
        """`n` valid events with explicit identifiers, booked in the ledger (a sample of them by identifier)."""
        values = []
        for _ in range(n):
            i, self.produced = self.produced, self.produced + 1
            meter, customer, amount = (
                self.rng.choice(BILLED_METERS),
                self.rng.choice(CUSTOMERS),
                self.rng.randint(1, 99),
            )
            identifier = f"soak-{self.run}-{i}"
            payload = {"stripe_customer_id": customer, "value": str(amount)}
            values.append(orjson.dumps({"event_name": meter, "payload": payload, "identifier": identifier}))
            total = 1 if self.ledger.formulas[meter] == "count" else amount
            self.ledger.unlisted_totals[meter, customer] += total
            if i % SAMPLE_EVERY == 0:
                from tests.integration.test_dead_letters import Sent  # noqa: PLC0415 - heavy, used rarely

                self.ledger.billed.append(Sent(0, None, None, identifier=identifier))
            else:
                self.ledger.unlisted += 1
        return values

    async def traffic(self, rate: int, seconds: float) -> None:
        """Produce `rate` events/s for `seconds`, and one bad record of the corpus every 10 s."""
        bad = bad_records(PARTITIONS)
        started = time.monotonic()
        tick = 0
        while time.monotonic() - started < seconds:
            await produce(self.bootstrap, self.ledger.topic, self.batch(rate))
            if tick % 10 == 0:
                record = bad[(tick // 10) % len(bad)]
                await produce_into(self.bootstrap, self.ledger, [dataclasses.replace(record)])
            tick += 1
            await asyncio.sleep(max(0.0, started + tick - time.monotonic()))

    async def faults(self, phase_s: float) -> None:
        """Each phase: a fault for half of it, then calm."""
        for n in range(10**6):
            name, fault = FAULTS[n % len(FAULTS)]
            self.phase = name
            await self.apply(fault, phase_s / 2)
            self.emu.set_faults()
            self.phase = "calm"
            await asyncio.sleep(phase_s / 2)

    async def apply(self, fault: dict[str, Any], seconds: float) -> None:
        if fault.get("kill"):
            await self.fleet.kill()
            self.fleet.start()
        elif fault.get("revoke"):
            self.emu.revoke_sessions()
        else:
            self.emu.set_faults(**fault)
        await asyncio.sleep(seconds)

    async def report(self, every: float) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(every)
            pid = self.fleet.running[0].pid if self.fleet.running else None
            rss = rss_mb(pid)
            elapsed = time.monotonic() - started
            self.rss.append((elapsed, rss))
            accepted = (await self.emu.stats())["unique_identifiers"]
            print(
                f"t={elapsed:7.0f}s rss={rss:7.1f}MB produced={self.produced} accepted={accepted} "
                f"behind={self.produced - accepted} phase={self.phase}",
                flush=True,
            )


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def calibrate(soak: Soak) -> int:
    """The worker's capacity in events/s, measured on a backlog (the backlog is part of the run)."""
    await produce(soak.bootstrap, soak.ledger.topic, soak.batch(CALIBRATION_EVENTS))
    soak.fleet.start()
    while (await soak.emu.stats())["unique_identifiers"] < CALIBRATION_EVENTS // 10:
        await asyncio.sleep(0.05)
    started, base = time.monotonic(), (await soak.emu.stats())["unique_identifiers"]
    while (done := (await soak.emu.stats())["unique_identifiers"]) < CALIBRATION_EVENTS * 9 // 10:
        await asyncio.sleep(0.05)
    capacity = int((done - base) / (time.monotonic() - started))
    print(f"capacity: {capacity} events/s; soak rate: {capacity // 2} events/s", flush=True)
    return capacity


async def soak(args: argparse.Namespace, bootstrap: str, log_dir: Path) -> int:
    topic, dlq = await new_topics(bootstrap, PARTITIONS, source_config=None, dlq_config=None)
    async with Emulator(EmulatorConfig(stream_rps_limit=0, seed=args.seed), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_ids, formulas = await create_meters(api)
        ledger = Ledger(topic, dlq, meter_ids, formulas, args.seed)
        env = worker_env(
            bootstrap,
            topic,
            emu.url,
            INGESTOR_DLQ_TOPIC=dlq,
            INGESTOR_REQUEST_TIMEOUT_S="2",
            INGESTOR_DRAIN_TIMEOUT_S="10",
            INGESTOR_RPS_BUDGET=str(args.budget),
        )
        async with WorkerFleet(env, log_dir) as fleet:
            run = Soak(args, bootstrap, emu, ledger, fleet)
            rate = args.rate or (await calibrate(run)) // 2
            if not fleet.running:
                fleet.start()
            tasks = [asyncio.create_task(run.faults(args.phase_s)), asyncio.create_task(run.report(args.report_s))]
            try:
                await run.traffic(rate, args.minutes * 60)
            finally:
                tasks[0].cancel()
                emu.set_faults()
                run.phase = "settling"
            settled = await wait_settled(api, bootstrap, ledger, fleet, Profile.from_env("1").settle_s)
            tasks[1].cancel()
            await fleet.stop_all()
            rss = [r for _, r in run.rss]
            print(f"settled: {settled}; events: {ledger.valid_count()} valid, {len(ledger.dead)} bad")
            if rss:
                print(f"worker RSS MB: first {rss[0]:.1f}, max {max(rss):.1f}, last {rss[-1]:.1f}")
            try:
                await assert_identity(api, bootstrap, ledger, fleet)
            except AssertionError as exc:
                print(f"ACCOUNTING FAILED: {exc}")
                return 1
            print(
                f"accounting: exact ({ledger.valid_count()} events billed once, {len(ledger.dead)} dead letters once)"
            )
            return 0


async def main(args: argparse.Namespace) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="ingestor-soak-"))
    print(f"seed {args.seed}; worker logs in {log_dir}", flush=True)
    reused = os.environ.get(REUSE_ENV)
    if reused:
        return await soak(args, reused, log_dir)
    async with LocalKafka() as kafka:
        return await soak(args, kafka.bootstrap, log_dir)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long traffic runs (30)")
    parser.add_argument("--rate", type=int, default=0, help="events/s (default: half the measured capacity)")
    parser.add_argument("--budget", type=int, default=150, help="the worker's request budget, requests/s (150)")
    parser.add_argument("--phase-s", type=float, default=60.0, help="one fault phase: on half, off half (60)")
    parser.add_argument("--report-s", type=float, default=10.0, help="seconds between RSS lines (10)")
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(2**31))
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
