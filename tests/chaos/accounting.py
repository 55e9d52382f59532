"""The identity every chaos scenario ends with, checked in one place.

After a run whose faults are over, whatever happened on the way:

1. every valid identifier was accepted by Stripe (the emulator), and nothing else was: accepted
   events = distinct identifiers = the valid events, and none failed Stripe's validation later;
2. every meter's total, read through `GET /v1/billing/meters/{id}/event_summaries` as a user would,
   equals what was produced, per customer;
3. every bad record is in the dead-letter topic exactly once for a `read_committed` reader, with its
   expected reason, its source coordinates and its original value; and nothing else is there;
4. the group's committed offsets are at the end of every source partition;
5. every worker asked to stop (SIGTERM) exited 0, and none exited by itself.

`assert_identity` checks all of it and fails with every violation found, not only the first.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ingestor import dlq_format
from ingestor_dev.devkafka import committed_offsets
from tests.integration.harness import StripeApi, end_offsets, read_topic

if TYPE_CHECKING:
    from tests.chaos.workload import Ledger
    from tests.integration.harness import WorkerFleet

#: Identifiers asked about per request to the emulator (the query string stays under 8 KiB).
LOOKUP_CHUNK = 80
SHOWN = 5


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)


def summary_window() -> tuple[int, int]:
    """Minute-aligned, from two days back to an hour ahead (event timestamps are within the last hour)."""
    now = int(time.time())
    return (now - 2 * 86400) // 60 * 60, (now + 3600) // 60 * 60 + 60


async def _accepted(api: StripeApi, ledger: Ledger, found: Findings) -> None:
    identifiers = ledger.identifiers()
    missing, twice = [], []
    for start in range(0, len(identifiers), LOOKUP_CHUNK):
        chunk = identifiers[start : start + LOOKUP_CHUNK]
        query = [("identifier", identifier) for identifier in chunk]
        page = await api._call("GET", "/_emulator/events", params=query)
        for info in page["data"]:
            if info["accepted"] != 1 or info["status"] != "valid":
                missing.append(f"{info['identifier']} ({info['status']})")
            if info["duplicates"]:
                twice.append(info["identifier"])
    found.check(not missing, f"{len(missing)} valid identifiers not accepted as valid, e.g. {missing[:SHOWN]}")
    stats = await api.stats()
    found.check(
        stats["events_accepted"] == stats["unique_identifiers"] == ledger.valid_count(),
        f"Stripe accepted {stats['events_accepted']} events with {stats['unique_identifiers']} identifiers; "
        f"{ledger.valid_count()} valid events were produced",
    )
    failures = (await api._call("GET", "/_emulator/errors"))["data"]
    found.check(not failures, f"{len(failures)} accepted events failed Stripe's validation: {failures[:SHOWN]}")


async def _totals(api: StripeApi, ledger: Ledger, found: Findings) -> None:
    start, end = summary_window()
    wrong = []
    for (meter, customer), expected in sorted(ledger.totals().items()):
        got = await api.total(ledger.meter_ids[meter], customer, start, end)
        if got != expected:
            wrong.append(f"{meter}/{customer}: billed {got}, produced {expected}")
    found.check(not wrong, f"{len(wrong)} meter totals wrong: {wrong[:SHOWN]}")


def _source(letter: Any) -> tuple[str, int, int, str]:
    own = {k: v for k, v in letter.headers if k.startswith(dlq_format.PREFIX)}
    return (
        own.get(dlq_format.SOURCE_TOPIC, b"?").decode(),
        int(own.get(dlq_format.SOURCE_PARTITION, b"-1")),
        int(own.get(dlq_format.SOURCE_OFFSET, b"-1")),
        own.get(dlq_format.REASON, b"?").decode(),
    )


def _message(letter: Any) -> str:
    return next((v.decode() for k, v in letter.headers if k == dlq_format.MESSAGE), "")


def _kept(record: Any) -> bytes | None:
    """The value a DLQ copy carries: the original, or empty for a keyless tombstone (Kafka refuses neither)."""
    return b"" if record.key is None and record.value is None else record.value


async def _dead_letters(bootstrap: str, ledger: Ledger, found: Findings) -> None:
    letters = await read_topic(bootstrap, ledger.dlq, timeout=30)  # read_committed
    copies: dict[tuple[int, int], list[Any]] = {}
    strangers = []
    for letter in letters:
        topic, partition, offset, reason = _source(letter)
        if topic != ledger.topic:
            strangers.append((topic, partition, offset, reason))
            continue
        copies.setdefault((partition, offset), []).append(letter)
    expected = {(r.partition, r.offset): r for r in ledger.dead}
    missing = [f"{r.label} p{r.partition}@{r.offset}" for key, r in expected.items() if key not in copies]
    repeated = {
        f"{expected[k].label} p{k[0]}@{k[1]}": len(v) for k, v in copies.items() if k in expected and len(v) > 1
    }
    unexpected = [
        (k, _source(v[0])[3], _message(v[0]), (v[0].value or b"")[:80]) for k, v in copies.items() if k not in expected
    ]
    wrong = []
    for key, record in expected.items():
        for letter in copies.get(key, ())[:1]:
            reason = _source(letter)[3]
            if reason != record.reason:
                wrong.append(f"{record.label}: reason {reason}, expected {record.reason}")
            elif key not in ledger.value_not_kept and (letter.key, letter.value) != (record.key, _kept(record)):
                wrong.append(f"{record.label}: key or value not kept byte for byte")
    found.check(not missing, f"{len(missing)} bad records not in the DLQ, e.g. {missing[:SHOWN]}")
    found.check(
        not repeated,
        f"{len(repeated)} bad records in the DLQ more than once (read_committed), "
        f"e.g. {list(repeated.items())[:SHOWN]}",
    )
    found.check(not unexpected, f"{len(unexpected)} records dead-lettered that were valid: {unexpected[:SHOWN]}")
    found.check(not wrong, f"{len(wrong)} DLQ records wrong: {wrong[:SHOWN]}")
    found.check(not strangers, f"{len(strangers)} DLQ records from elsewhere: {strangers[:SHOWN]}")


async def _offsets(bootstrap: str, ledger: Ledger, group: str, found: Findings) -> None:
    ends = await end_offsets(bootstrap, ledger.topic)
    committed = await committed_offsets(bootstrap, group, ledger.topic)
    behind = {p: (committed.get(p), end) for p, end in sorted(ends.items()) if committed.get(p) != end}
    found.check(not behind, f"committed offsets not at the end (partition: (committed, end)): {behind}")


def _exits(fleet: WorkerFleet, found: Findings) -> None:
    found.check(all(code == 0 for code in fleet.exit_codes), f"workers' exit codes on SIGTERM: {fleet.exit_codes}")
    crashed = fleet.crashed()
    found.check(not crashed, f"workers exited by themselves: {crashed}")


async def assert_identity(
    api: StripeApi, bootstrap: str, ledger: Ledger, fleet: WorkerFleet, notes: list[str] | None = None
) -> None:
    """The whole identity (see the module docstring); call it once every worker has been stopped."""
    found = Findings()
    group = fleet.env["INGESTOR_GROUP_ID"]
    await _accepted(api, ledger, found)
    await _totals(api, ledger, found)
    await _dead_letters(bootstrap, ledger, found)
    await _offsets(bootstrap, ledger, group, found)
    _exits(fleet, found)
    if found.problems:
        listed = "\n  - ".join([*found.problems, *(notes or [])])
        raise AssertionError(
            f"the identity does not hold (CHAOS_SEED={ledger.seed}):\n  - {listed}\n{fleet.log_tail()}"
        )


async def settled(api: StripeApi, bootstrap: str, ledger: Ledger, fleet: WorkerFleet) -> bool:
    """Every valid event accepted, at least as many DLQ records as bad records, commits at the end."""
    stats = await api.stats()
    if stats["unique_identifiers"] < ledger.valid_count():
        return False
    if sum((await end_offsets(bootstrap, ledger.dlq)).values()) < len(ledger.dead):
        return False
    ends = await end_offsets(bootstrap, ledger.topic)
    return await committed_offsets(bootstrap, fleet.env["INGESTOR_GROUP_ID"], ledger.topic) == ends


async def wait_settled(api: StripeApi, bootstrap: str, ledger: Ledger, fleet: WorkerFleet, timeout: float) -> bool:
    """Wait (bounded) until the run settles or no worker is left alive; the identity says what is wrong."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fleet.alive() == 0:
            return False
        try:
            if await settled(api, bootstrap, ledger, fleet):
                return True
        except (OSError, AssertionError):  # the broker or the emulator is briefly away
            pass
        await asyncio.sleep(0.5)
    return False


def counts(ledger: Ledger) -> Counter[str]:
    return Counter(r.reason for r in ledger.dead if r.reason)
