"""What a chaos run produces: valid events over several meters and customers with the corpus of bad
records mixed in at random places, and the ledger of what must become of each record.

Valid events have an explicit `identifier` or none (then the worker derives `kafka-<cluster id>.<topic>-<p>-<o>`),
a `timestamp` field or none (then the record's own time counts). Every bad record of `tests/corpus.py`
plus an unknown and a deactivated meter's events are mixed in; each carries its expected reason.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from ingestor.events import identifier_prefix
from tests.corpus import BAD_RECORDS, event_bytes
from tests.integration.harness import cluster_id
from tests.integration.test_dead_letters import Sent, produce_records

if TYPE_CHECKING:
    import random

    from tests.integration.harness import StripeApi

#: event_name -> aggregation formula; `api_requests` and `x` are the corpus's event names.
METERS = {"api_requests": "sum", "x": "sum", "tokens": "sum", "calls": "count"}
BILLED_METERS = ("api_requests", "tokens", "calls")
INACTIVE_METER = "retired"
CUSTOMERS = tuple(f"cus_chaos_{i}" for i in range(8))


@dataclass
class Ledger:
    """What a run must end with: every valid event billed once, every bad record dead-lettered once."""

    topic: str
    dlq: str
    meter_ids: dict[str, str]
    formulas: dict[str, str]
    seed: int
    #: valid records (identifier, bills); the same event may be produced twice (a replay)
    billed: list[Sent] = field(default_factory=list)
    #: bad records with their expected reason, each to be found once in the DLQ
    dead: list[Sent] = field(default_factory=list)
    #: source offsets (partition, offset) whose DLQ copy is not expected to hold the value byte for byte
    value_not_kept: set[tuple[int, int]] = field(default_factory=set)
    #: valid events not listed in `billed` (a long run keeps a sample of identifiers), and their totals
    unlisted: int = 0
    unlisted_totals: Counter[tuple[str, str]] = field(default_factory=Counter)

    def identifiers(self) -> list[str]:
        """The identifiers checked one by one (all of them, unless the run keeps a sample)."""
        return sorted({r.identifier for r in self.billed})

    def valid_count(self) -> int:
        return len(self.identifiers()) + self.unlisted

    def totals(self) -> Counter[tuple[str, str]]:
        """Expected total per (meter, customer): each identifier counts once."""
        totals: Counter[tuple[str, str]] = Counter(self.unlisted_totals)
        seen: set[str] = set()
        for record in self.billed:
            if record.bills is None or record.identifier in seen:
                continue
            seen.add(record.identifier)
            meter, customer, amount = record.bills
            totals[meter, customer] += 1 if self.formulas[meter] == "count" else amount
        return totals


async def create_meters(api: StripeApi, extra: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The run's meters (ids and formulas by event_name), with one deactivated meter."""
    formulas = {**METERS, **(extra or {})}
    ids = {name: await api.create_meter(name, formula) for name, formula in formulas.items()}
    ids[INACTIVE_METER] = await api.create_meter(INACTIVE_METER, "sum")
    await api.deactivate_meter(ids[INACTIVE_METER])
    return ids, formulas


def valid_records(
    rng: random.Random, n: int, partitions: int, *, meters: tuple[str, ...] = BILLED_METERS
) -> list[Sent]:
    run = uuid.uuid4().hex[:8]
    now = int(time.time())
    out = []
    for i in range(n):
        meter, customer, amount = rng.choice(meters), rng.choice(CUSTOMERS), rng.randint(1, 1000)
        event: dict[str, object] = {
            "event_name": meter,
            "payload": {"stripe_customer_id": customer, "value": str(amount)},
        }
        identifier = ""
        if rng.random() < 0.5:
            identifier = event["identifier"] = f"chaos-{run}-{i}"
        if rng.random() < 0.3:
            event["timestamp"] = now - rng.randint(0, 3600)
        out.append(
            Sent(
                rng.randrange(partitions),
                customer.encode(),
                orjson.dumps(event),
                bills=(meter, customer, amount),
                label=f"valid {i}",
                identifier=identifier,
            )
        )
    return out


def bad_records(partitions: int) -> list[Sent]:
    """The corpus, plus an unknown and a deactivated meter's events."""
    out = [
        Sent(i % partitions, bad.key, bad.value, bad.headers, reason=bad.reason, label=f"corpus {bad.name}")
        for i, bad in enumerate(BAD_RECORDS)
    ]
    out.append(Sent(0, None, event_bytes(event_name="no_such_meter"), reason="meter_unknown", label="meter unknown"))
    out.append(
        Sent(1 % partitions, None, event_bytes(event_name=INACTIVE_METER), reason="meter_inactive", label="inactive")
    )
    return out


def mix(rng: random.Random, valid: list[Sent], bad: list[Sent]) -> list[Sent]:
    """`valid` in order with every record of `bad` inserted at a random place."""
    records = list(valid)
    for record in bad:
        records.insert(rng.randrange(len(records) + 1), record)
    return records


async def produce_into(bootstrap: str, ledger: Ledger, records: list[Sent]) -> None:
    """Produce `records` (in order per partition), fill their offsets and derived identifiers, book them."""
    await produce_records(bootstrap, ledger.topic, records)
    namespace = await cluster_id(bootstrap)  # the workers' default namespace of derived identifiers
    for record in records:
        if record.reason is not None:
            ledger.dead.append(record)
            continue
        if not record.identifier:
            record.identifier = identifier_prefix(ledger.topic, record.partition, namespace) + str(record.offset)
        ledger.billed.append(record)
