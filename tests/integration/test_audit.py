"""`ingestor audit` on the real broker and the emulator, after a real run of the worker.

- A clean run (events over three meters — sum, count, last with an hour window — duplicates, cancellations,
  bad records): exit 0, every total matches.
- One extra event billed directly through Stripe's API (outside the pipeline): exit 1, naming the customer.
- One event lost (produced, never delivered): exit 1, naming the customer.
- Kafka unreachable: exit 2, naming the setting.
"""

from __future__ import annotations

import io
import random
import time
import uuid
from typing import Any

import orjson
import pytest

from ingestor import audit, cli
from ingestor_dev.devkafka import committed_offsets, produce
from ingestor_dev.emulator import Emulator, EmulatorConfig
from tests.integration.harness import StripeApi, end_offsets, running_worker, wait_for, worker_env

pytestmark = pytest.mark.kafka

METERS = {"calls": ("sum", {}), "logins": ("count", {}), "seats": ("last", {"event_time_window": "hour"})}


def traffic(n: int, run: str, now: float) -> tuple[list[bytes | None], list[bytes | None]]:
    """Events over the meters, keyed by customer; every 10th cancelled, every 50th sent twice; a few bad."""
    rng = random.Random(11)
    values: list[bytes | None] = []
    keys: list[bytes | None] = []
    for i in range(n):
        meter = rng.choice(list(METERS))
        customer = f"cus_a{rng.randrange(6)}"
        payload = {"stripe_customer_id": customer, "value": str(rng.randint(1, 40))}
        identifier = f"aud-{run}-{i}"
        body = {
            "event_name": meter,
            "payload": payload,
            "identifier": identifier,
            "timestamp": now - rng.randint(0, 3000),
        }
        copies = 2 if i % 50 == 0 else 1
        for _ in range(copies):
            values.append(orjson.dumps(body))
            keys.append(customer.encode())
        if i % 10 == 0:
            values.append(orjson.dumps({"event_name": meter, "type": "cancel", "cancel": {"identifier": identifier}}))
            keys.append(customer.encode())
    for bad in (b"not json", b'{"event_name": "calls", "payload": {"value": "3"}}', None):
        values.append(bad)
        keys.append(b"bad")
    return values, keys


def audit_args(start: float, *extra: str) -> Any:
    return cli.build_parser(["audit"]).parse_args(["audit", "--from", str(int(start)), *extra])


async def run_audit(env: dict[str, str], start: float, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await audit.run(audit_args(start, *extra), env, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def pipeline(kafka_bootstrap: str, topic_factory: Any, emu: Emulator) -> tuple[dict[str, str], StripeApi]:
    topic = await topic_factory(3, "audit")
    api = StripeApi(emu.url)
    for name, (formula, extra) in METERS.items():
        await api.create_meter(name, formula, **extra)
    values, keys = traffic(1500, uuid.uuid4().hex[:6], time.time())
    await produce(kafka_bootstrap, topic, values, keys=keys)
    env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_API_RPS="1000")
    async with running_worker(env):
        await wait_committed(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
    return env, api


async def wait_committed(bootstrap: str, group: str, topic: str) -> None:
    """Committed offsets at the end of every partition that has records (keys may leave one empty)."""
    ends = {p: end for p, end in (await end_offsets(bootstrap, topic)).items() if end}

    async def at_end() -> bool:
        committed = await committed_offsets(bootstrap, group, topic)
        return all(committed.get(p) == end for p, end in ends.items())

    await wait_for(at_end, 90, "committed offsets at the end of every partition")


async def test_a_clean_run_matches_and_an_event_billed_outside_the_pipeline_is_named(kafka_bootstrap, topic_factory):
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        env, api = await pipeline(kafka_bootstrap, topic_factory, emu)
        start = time.time() - 7200
        code, out, err = await run_audit(env, start, "--json")
        assert code == 0, (out, err)
        report = orjson.loads(out)
        assert report["ok"] is True
        assert report["differences"] == 0
        assert len(report["totals"]) == 18  # 3 meters x 6 customers
        assert report["cancelled"] > 0
        assert report["duplicates"] > 0
        assert "reading" in err  # the progress line
        event = {"event_name": "calls", "payload": {"stripe_customer_id": "cus_a3", "value": "5"}}
        await api._call("POST", "/v2/billing/meter_events", json=event)
        code, out, _ = await run_audit(env, start, "--settle", "1")
        assert code == 1, out
        [line] = [line for line in out.splitlines() if "DIFFERS" in line]
        assert line.split()[:2] == ["calls", "cus_a3"]
        assert line.split()[4] == "+5"


async def test_an_event_never_delivered_is_named(kafka_bootstrap, topic_factory):
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        env, _ = await pipeline(kafka_bootstrap, topic_factory, emu)
        lost = {
            "event_name": "calls",
            "payload": {"stripe_customer_id": "cus_a1", "value": "7"},
            "identifier": "lost-1",
        }
        await produce(kafka_bootstrap, env["INGESTOR_TOPICS"], [orjson.dumps(lost)], partition=0)
        code, out, _ = await run_audit(env, time.time() - 7200, "--json")
        assert code == 1, out
        report = orjson.loads(out)
        differing = [row for row in report["totals"] if not row["match"]]
        assert [(r["meter"], r["customer"], r["expected"] - r["billed"]) for r in differing] == [("calls", "cus_a1", 7)]


async def test_kafka_or_stripe_unreachable_is_an_error_naming_the_setting():
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        env = worker_env("127.0.0.1:1", "nowhere", emu.url)
        code, out, err = await run_audit(env, time.time() - 60)
    assert (code, out) == (2, "")
    assert "KAFKA_BOOTSTRAP_SERVERS" in err
    code, out, err = await run_audit(worker_env("127.0.0.1:1", "nowhere", "http://127.0.0.1:1"), time.time() - 60)
    assert (code, out) == (2, "")
    assert "INGESTOR_STRIPE_API_BASE" in err
