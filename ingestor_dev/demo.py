"""`ingestor demo`: the embedded default, end to end on this machine.

Starts a local Kafka broker and the Stripe emulator, creates meters, produces a realistic stream
(several customers and meters, a few bad events), runs the worker with a live progress display, and
ends with the accounting: produced = delivered + dead-lettered, and the meter totals read back through
the emulator's event summaries equal what was produced; then `ingestor audit` checks the same from the
topic itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

if TYPE_CHECKING:
    import argparse

    from ingestor.worker import Worker

API_KEY = "sk_test_demoNotARealKey00000000000000"
METERS = {"api_requests": "sum", "compute_seconds": "sum", "seats": "last"}
BAD_VALUES: tuple[bytes | None, ...] = (
    b"not json at all",
    b'{"event_name": "api_requests", "payload": {"stripe_customer_id": "cus_1", "value": "1.5"}}',
    b'{"event_name": "api_requests", "payload": {"value": "3"}}',
    b'{"payload": {"stripe_customer_id": "cus_1", "value": "3"}}',
    b'{"event_name": "no_such_meter", "payload": {"stripe_customer_id": "cus_1", "value": "3"}}',
    b"\xff\xfe\x00garbage",
    None,
    b'{"event_name": "api_requests", "payload": {"stripe_customer_id": "cus_1", "value": "-4"}}',
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=200_000, help="valid events to produce (default 200000)")
    parser.add_argument("--bad", type=int, default=40, help="bad events mixed in (default 40)")
    parser.add_argument("--customers", type=int, default=50, help="distinct customers (default 50)")
    parser.add_argument("--partitions", type=int, default=6, help="partitions of the topic (default 6)")
    parser.add_argument("--session-ttl", type=float, default=6.0, help="emulator session TTL, s (default 6)")
    parser.add_argument("--rps-budget", type=int, default=100, help="stream requests/s budget (default 100)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")


def main(args: argparse.Namespace) -> int:
    from ingestor.runtime import run_async  # noqa: PLC0415

    result: list[int] = []

    async def go() -> None:
        result.append(await run_demo(args))

    run_async(go())
    return result[0]


def generate(args: argparse.Namespace, now: float) -> tuple[list[bytes | None], Counter[tuple[str, str]], int]:
    """The stream to produce, the expected total per (meter, customer), and how many are bad."""
    rng = random.Random(42)  # noqa: S311 - reproducible sample data, not secrets
    customers = [f"cus_demo{i:04d}" for i in range(args.customers)]
    values: list[bytes | None] = []
    last: dict[tuple[str, str], tuple[float, int]] = {}
    sums: Counter[tuple[str, str]] = Counter()
    run = uuid.uuid4().hex[:8]
    for i in range(args.events):
        meter = rng.choice(list(METERS))
        customer = rng.choice(customers)
        value = rng.randint(1, 50) if meter != "seats" else rng.randint(1, 20)
        ts = round(now - rng.uniform(0, 3000), 3)
        event = {
            "event_name": meter,
            "payload": {"stripe_customer_id": customer, "value": str(value)},
            "identifier": f"demo-{run}-{i}",
            "timestamp": ts,
        }
        values.append(orjson.dumps(event))
        if METERS[meter] == "sum":
            sums[meter, customer] += value
        elif (meter, customer) not in last or last[meter, customer][0] <= ts:
            last[meter, customer] = (ts, value)
    for (meter, customer), (_, value) in last.items():
        sums[meter, customer] = value
    bad = [BAD_VALUES[i % len(BAD_VALUES)] for i in range(args.bad)]
    for item in bad:
        values.insert(rng.randrange(len(values) + 1), item)
    return values, sums, len(bad)


async def run_demo(args: argparse.Namespace) -> int:
    from ingestor import settings  # noqa: PLC0415
    from ingestor.observability import setup_logging  # noqa: PLC0415
    from ingestor.worker import Worker  # noqa: PLC0415
    from ingestor_dev import devkafka  # noqa: PLC0415
    from ingestor_dev.emulator import Emulator, EmulatorConfig  # noqa: PLC0415

    setup_logging("WARNING", "text")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # start-up chatter while the group forms
    say("starting a local Kafka broker ...")
    with devkafka.LocalKafka() as broker:
        topic, dlq = "usage-events", "usage-events.dlq"
        await devkafka.create_topic(broker.bootstrap, topic, args.partitions)
        await devkafka.create_topic(broker.bootstrap, dlq, 1)
        config = EmulatorConfig(session_ttl=args.session_ttl, stream_rps_limit=args.rps_budget)
        async with Emulator(config, host="127.0.0.1", port=0) as emu:
            say(f"Kafka at {broker.bootstrap}, Stripe emulator at {emu.url}")
            meter_ids = await create_meters(emu.url)
            now = time.time()
            values, expected, bad = generate(args, now)
            say(f"producing {len(values):,} records ({bad} bad) to {topic} ({args.partitions} partitions) ...")
            await devkafka.produce(broker.bootstrap, topic, values)
            env = {
                **os.environ,
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                "INGESTOR_TOPICS": topic,
                "INGESTOR_DLQ_TOPIC": dlq,
                "INGESTOR_GROUP_ID": f"demo-{uuid.uuid4().hex[:6]}",
                "STRIPE_API_KEY": API_KEY,
                "INGESTOR_STRIPE_API_BASE": emu.url,
                "INGESTOR_STRIPE_METER_EVENTS_BASE": emu.url,
                "INGESTOR_RPS_BUDGET": str(args.rps_budget),
                "INGESTOR_METRICS_PORT": "0",
                "INGESTOR_METRICS_HOST": "127.0.0.1",
                "INGESTOR_SESSION_REFRESH_MARGIN_S": "2",
            }
            worker = Worker(settings.load(env))
            async with worker:
                say(f"worker running; metrics at http://127.0.0.1:{worker.metrics_port}/metrics")
                task = asyncio.create_task(worker.run())
                finished = await progress(worker, len(values), args.timeout)
                worker.request_stop()
                await task
            accounted = await account(
                base=emu.url,
                worker=worker,
                produced=len(values),
                bad=bad,
                expected=expected,
                meter_ids=meter_ids,
                finished=finished,
            )
            return max(accounted, await audit_step(env, now))


async def create_meters(base: str) -> dict[str, str]:
    ids = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for name, formula in METERS.items():
            form = {"display_name": name, "event_name": name, "default_aggregation[formula]": formula}
            async with http.post(f"{base}/v1/billing/meters", data=form) as resp:
                ids[name] = (await resp.json())["id"]
    return ids


def sample(worker: Worker, name: str, labels: dict[str, str] | None = None) -> float:
    total = 0.0
    for metric in worker.metrics.registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                total += s.value
    return total


async def progress(worker: Worker, produced: int, limit: float) -> bool:
    started = time.monotonic()
    last_requests, last_t = 0.0, started
    tty = sys.stdout.isatty()
    while time.monotonic() - started < limit:
        await asyncio.sleep(0.5 if tty else 2.0)
        consumed = sample(worker, "ingestor_events_consumed_total")
        delivered = sample(worker, "ingestor_events_delivered_total")
        dead = sample(worker, "ingestor_events_dead_lettered_total")
        requests = sample(worker, "ingestor_requests_total", {"outcome": "accepted"})
        rotations = sample(worker, "ingestor_session_rotations_total")
        now = time.monotonic()
        rps = (requests - last_requests) / (now - last_t)
        last_requests, last_t = requests, now
        line = (
            f"consumed {consumed:>9,.0f}  delivered {delivered:>9,.0f}  dead-lettered {dead:>4,.0f}  "
            f"requests/s {rps:>7,.0f}  token rotations {rotations:>3,.0f}  lag {worker.total_lag():>8,}"
        )
        print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
        if delivered + dead >= produced and worker.tracker.pending == 0 and worker.total_lag() == 0:
            print()
            return True
    print()
    return False


async def account(  # noqa: PLR0913
    *,
    base: str,
    worker: Worker,
    produced: int,
    bad: int,
    expected: Counter[tuple[str, str]],
    meter_ids: dict[str, str],
    finished: bool,
) -> int:
    delivered = int(sample(worker, "ingestor_events_delivered_total"))
    dead = int(sample(worker, "ingestor_events_dead_lettered_total"))
    say("accounting")
    print(f"  produced {produced:,} = delivered {delivered:,} + dead-lettered {dead:,}: {produced == delivered + dead}")
    print(f"  dead-lettered {dead} of {bad} bad records")
    end = (int(time.time()) // 60 + 2) * 60
    start = end - 86400
    mismatches = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for meter, meter_id in meter_ids.items():
            billed = want = 0
            for (m, customer), value in expected.items():
                if m != meter:
                    continue
                params = {"customer": customer, "start_time": str(start), "end_time": str(end)}
                async with http.get(f"{base}/v1/billing/meters/{meter_id}/event_summaries", params=params) as r:
                    body: Any = await r.json()
                got = sum(int(s["aggregated_value"]) for s in body["data"])
                mismatches += got != value
                billed += got
                want += value
            print(
                f"  meter {meter:<16} billed {billed:>12,}  produced {want:>12,}  "
                + ("ok" if billed == want else "MISMATCH")
            )
    ok = finished and produced == delivered + dead and dead == bad and mismatches == 0
    say("all events accounted for, every meter total exact" if ok else "ACCOUNTING FAILED")
    return 0 if ok else 1


async def audit_step(env: dict[str, str], now: float) -> int:
    """`ingestor audit` over the demo's hour of events: the usage on the topic against Stripe's summaries."""
    from ingestor import audit, cli  # noqa: PLC0415

    argv = ["audit", "--from", str(int(now) - 3600), "--settle", "10"]
    say("ingestor " + " ".join(argv))
    code = await audit.run(cli.build_parser(argv).parse_args(argv), env)
    say("audit: every total matches" if code == 0 else f"audit: exit status {code}")
    return code


def say(text: str) -> None:
    print(f"==> {text}", flush=True)
