"""What exactly-once dead letters cost: INGESTOR_DLQ_TRANSACTIONAL=true against false.

    .venv/bin/python bench/dlq_cost.py                                   # 1 % invalid, each mode once
    .venv/bin/python bench/dlq_cost.py --invalid-fraction 0.01 --invalid-fraction 0.1 --repeat 2   # make bench-dlq
    .venv/bin/python bench/dlq_cost.py --rate 0                          # backlog: produce first, then run

What it does (helpers from `bench/pipeline_bench.py`: the emulator, the worker process, /proc CPU time):

1. Starts a local Kafka broker (`LocalKafka`) and the Stripe emulator once.
2. For each invalid fraction, each repetition and each mode (interleaved: true, false, true, ...), a fresh
   source topic (`--partitions`), a fresh consumer group and a fresh one-partition dead-letter topic, and
   one `ingestor run` worker with INGESTOR_DLQ_TRANSACTIONAL set. Once the worker owns every partition,
   `--valid` valid events (explicit `identifier` and unix-seconds `timestamp`) plus invalid records are
   produced round robin over the partitions, at `--rate` records/s (`--rate 0`: all of them before the
   worker starts). The invalid records are a fraction `f` of all records, spread evenly within every
   partition, of four kinds (not JSON, a bad value, no customer, an unknown field). The rate must stay
   below what the worker sustains, or the latencies measure the backlog rather than the dead-letter path
   (on 2 shared cores, 40,000 records/s already built one); with `--rate 0` they are all backlog.
3. Waits until the group's committed offsets are at the end of every partition, reads the worker's CPU
   time (utime + stime from /proc), SIGTERMs it.
4. A `read_committed` consumer of the dead-letter topic, started before the worker, counts the letters
   (and distinct source records) and measures, per letter, from the source record's timestamp (the
   `ingestor.source.timestamp` header, the producer's clock) to (a) the letter's own record timestamp
   (written) and (b) the moment the reader received it (visible).

CPU and wall time are counted from the moment the worker owns every partition (start-up, imports and the
group join excluded; `cpu_s_total` includes them) to the moment the committed offsets reach the end.
The last line of output is one JSON object with every run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline_bench import (  # noqa: E402
    EVENT_NAME,
    POLL_S,
    Emulator,
    WorkerProc,
    _end_offsets,
    cpu_seconds,
    machine,
    produce_paced,
    worker_env,
)

from ingestor import dlq_format  # noqa: E402
from ingestor_dev.devkafka import LocalKafka, committed_offsets, create_topic, free_port, produce  # noqa: E402

CUSTOMERS = 1000
#: The reader of the dead-letter topic stops once it has seen nothing new for this long after the run.
READER_IDLE_S = 2.0
MODES = ("true", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--valid", type=int, default=200_000, help="valid events per run (default 200,000)")
    parser.add_argument(
        "--invalid-fraction",
        type=float,
        action="append",
        help="fraction of all records that are invalid (repeatable; default 0.01)",
    )
    parser.add_argument("--partitions", type=int, default=6, help="source topic partitions (default 6)")
    parser.add_argument(
        "--rate", type=float, default=10_000, help="records/s produced while the worker runs (10,000); 0: backlog first"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode and fraction (default 1)")
    parser.add_argument("--commit-interval-ms", type=int, default=1000, help="INGESTOR_COMMIT_INTERVAL_MS (1000)")
    parser.add_argument("--budget", type=int, default=10_000, help="stream requests/s budget (default 10,000)")
    parser.add_argument("--batch-events", type=int, default=100, help="events per request (default 100)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a run after this many seconds")
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="NAME=VALUE", help="extra worker setting (repeatable)"
    )
    parser.set_defaults(outage_s=0.0)  # read by pipeline_bench.worker_env
    args = parser.parse_args(argv)
    args.invalid_fraction = args.invalid_fraction or [0.01]
    if any(not 0 <= f < 1 for f in args.invalid_fraction):
        parser.error("--invalid-fraction must be in [0, 1)")
    return args


# -- the records ------------------------------------------------------------------------------------


def invalid_count(valid: int, fraction: float) -> int:
    """Invalid records so that they are `fraction` of all records."""
    return round(valid * fraction / (1 - fraction))


def is_invalid(index: int, partitions: int, fraction: float) -> bool:
    """Record `index` goes to partition index % partitions; within it, a `fraction` evenly spaced are bad."""
    j = index // partitions
    return int((j + 1) * fraction) > int(j * fraction)


def bad_value(k: int, run: str, now: int) -> bytes:
    kind = k % 4
    if kind == 0:
        return b'{"event_name": "bench_api_call", "payload": {'  # not_json
    payload: dict[str, Any] = {"stripe_customer_id": f"cus_{k % CUSTOMERS:05d}", "value": "1"}
    event: dict[str, Any] = {"event_name": EVENT_NAME, "identifier": f"{run}-bad-{k}", "timestamp": now}
    if kind == 1:
        payload["value"] = "-3"  # value_invalid
    elif kind == 2:
        del payload["stripe_customer_id"]  # customer_missing
    else:
        event["source"] = "bench"  # unknown_field
    event["payload"] = payload
    return orjson.dumps(event)


def records(valid: int, fraction: float, partitions: int, run: str) -> tuple[list[bytes], int]:
    """The run's record values in production order, and how many are invalid."""
    now = int(time.time())
    total = valid + invalid_count(valid, fraction)
    out: list[bytes] = []
    good = bad = 0
    for index in range(total):
        # Keep to `total` records: the last ones fill whichever kind is still short.
        if (is_invalid(index, partitions, fraction) and bad < total - valid) or good == valid:
            out.append(bad_value(bad, run, now))
            bad += 1
        else:
            event = {
                "event_name": EVENT_NAME,
                "identifier": f"{run}-{good}",
                "timestamp": now,
                "payload": {"stripe_customer_id": f"cus_{good % CUSTOMERS:05d}", "value": str(good % 9 + 1)},
            }
            out.append(orjson.dumps(event))
            good += 1
    return out, bad


# -- the dead-letter reader -------------------------------------------------------------------------


class LetterReader:
    """A read_committed consumer of the dead-letter topic: counts letters and times them."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
        )
        self.count = 0
        self.sources: set[tuple[int, int]] = set()
        self.written_ms: list[float] = []
        self.visible_ms: list[float] = []
        self.last_seen = time.monotonic()

    async def run(self, done: asyncio.Event) -> None:
        await self.consumer.start()
        try:
            while not (done.is_set() and time.monotonic() - self.last_seen > READER_IDLE_S):
                batches = await self.consumer.getmany(timeout_ms=50, max_records=10_000)
                now_ms = time.time() * 1000
                for batch in batches.values():
                    for record in batch:
                        self._add(record, now_ms)
        finally:
            await self.consumer.stop()

    def _add(self, record: Any, now_ms: float) -> None:
        headers = dict(record.headers)
        source_ms = int(headers[dlq_format.SOURCE_TIMESTAMP])
        self.count += 1
        self.sources.add((int(headers[dlq_format.SOURCE_PARTITION]), int(headers[dlq_format.SOURCE_OFFSET])))
        self.written_ms.append(record.timestamp - source_ms)
        self.visible_ms.append(now_ms - source_ms)
        self.last_seen = time.monotonic()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


# -- one run ----------------------------------------------------------------------------------------


async def wait_assigned(worker: WorkerProc, partitions: int, within: float) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while await worker.metric(http, "ingestor_partitions_assigned ") < partitions:
            if worker.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker did not join the group")
            await asyncio.sleep(POLL_S)


async def wait_committed(bootstrap: str, group: str, topic: str, worker: WorkerProc, within: float) -> None:
    ends = await _end_offsets(bootstrap, topic)
    deadline = time.monotonic() + within
    while await committed_offsets(bootstrap, group, topic) != ends:
        if worker.process.poll() is not None:
            raise RuntimeError(f"the worker exited early ({worker.process.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError("timed out before the committed offsets reached the end")
        await asyncio.sleep(POLL_S)


async def one_run(
    args: argparse.Namespace, kafka: LocalKafka, emu: Emulator, tmp: Path, *, fraction: float, mode: str, rep: int
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    topic, group = f"dlqcost-{run}", f"dlqcost-{run}"
    await create_topic(kafka.bootstrap, topic, args.partitions)
    await create_topic(kafka.bootstrap, f"{topic}.dlq", 1)
    await emu.prepare()
    values, bad = records(args.valid, fraction, args.partitions, run)
    if not args.rate:
        await produce(kafka.bootstrap, topic, values)
    reader = LetterReader(kafka.bootstrap, f"{topic}.dlq")
    done = asyncio.Event()
    reading = asyncio.create_task(reader.run(done))
    env = worker_env(args, kafka.bootstrap, topic, emu.url, group)
    env |= {
        "INGESTOR_DLQ_TRANSACTIONAL": mode,
        "INGESTOR_COMMIT_INTERVAL_MS": str(args.commit_interval_ms),
        "INGESTOR_METRICS_PORT": str(free_port()),
    }
    worker = WorkerProc(0, env, tmp / f"worker-{run}-{mode}.log", None)
    try:
        await wait_assigned(worker, args.partitions, args.timeout)
        started, cpu_start = time.monotonic(), cpu_seconds(worker.pid)
        if args.rate:
            await produce_paced(kafka.bootstrap, topic, values, args.rate)
        await wait_committed(kafka.bootstrap, group, topic, worker, args.timeout)
        wall, cpu_end = time.monotonic() - started, cpu_seconds(worker.pid)
    finally:
        code = worker.stop()
        done.set()
        await reading
    stats = await emu.stats()
    cpu = cpu_end - cpu_start
    total = len(values)
    return {
        "invalid_fraction": fraction,
        "dlq_transactional": mode == "true",
        "repeat": rep,
        "records": total,
        "invalid": bad,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "cpu_s_total": round(cpu_end, 2),
        "cpu_s_per_million": round(cpu / total * 1e6, 2),
        "letters_read_committed": reader.count,
        "letters_distinct": len(reader.sources),
        "letters_ok": reader.count == bad == len(reader.sources),
        "written_p50_ms": percentile(reader.written_ms, 0.50),
        "written_p99_ms": percentile(reader.written_ms, 0.99),
        "visible_p50_ms": percentile(reader.visible_ms, 0.50),
        "visible_p99_ms": percentile(reader.visible_ms, 0.99),
        "visible_max_ms": percentile(reader.visible_ms, 1.0),
        "events_accepted": stats["events_accepted"],
        "worker_exit_code": code,
        "loadavg": round(os.getloadavg()[0], 2),
    }


# -- the table --------------------------------------------------------------------------------------

COLUMNS = (
    ("invalid", "invalid_fraction", "{:.0%}"),
    ("txn", "dlq_transactional", "{}"),
    ("rep", "repeat", "{}"),
    ("records", "records", "{:,}"),
    ("wall s", "wall_s", "{:.2f}"),
    ("CPU s", "cpu_s", "{:.2f}"),
    ("CPU s/M", "cpu_s_per_million", "{:.2f}"),
    ("letters", "letters_read_committed", "{:,}"),
    ("ok", "letters_ok", "{}"),
    ("written p50/p99 ms", ("written_p50_ms", "written_p99_ms"), "{:.0f} / {:.0f}"),
    ("visible p50/p99 ms", ("visible_p50_ms", "visible_p99_ms"), "{:.0f} / {:.0f}"),
    ("load", "loadavg", "{:.1f}"),
)


def cell(run: dict[str, Any], key: str | tuple[str, ...], fmt: str) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    values = [run[k] for k in keys]
    return "-" if None in values else fmt.format(*values)


def table(runs: list[dict[str, Any]]) -> str:
    rows = [[name for name, _, _ in COLUMNS]] + [[cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fraction and mode: the range of each measure over the repetitions."""
    out = []
    for fraction in dict.fromkeys(r["invalid_fraction"] for r in runs):
        for txn in (True, False):
            group = [r for r in runs if r["invalid_fraction"] == fraction and r["dlq_transactional"] == txn]
            entry: dict[str, Any] = {"invalid_fraction": fraction, "dlq_transactional": txn}
            for key in ("cpu_s_per_million", "wall_s", "visible_p50_ms", "visible_p99_ms"):
                seen = [r[key] for r in group if r[key] is not None]
                if seen:
                    entry[key] = {"min": min(seen), "max": max(seen), "median": statistics.median(seen)}
            out.append(entry)
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ingestor-dlqcost-"))
    result: dict[str, Any] = {"command": " ".join(["bench/dlq_cost.py", *sys.argv[1:]]), "machine": machine()}
    runs: list[dict[str, Any]] = []
    async with LocalKafka() as kafka:
        emu = Emulator(args.budget, tmp / "emulator.log")
        try:
            for fraction in args.invalid_fraction:
                for rep in range(1, args.repeat + 1):
                    for mode in MODES:
                        runs.append(await one_run(args, kafka, emu, tmp, fraction=fraction, mode=mode, rep=rep))
                        print(json.dumps(runs[-1]), flush=True)
        finally:
            await emu.close()
    result.update({"valid": args.valid, "rate": args.rate, "commit_interval_ms": args.commit_interval_ms})
    result.update({"runs": runs, "summary": summary(runs), "logs": str(tmp)})
    result["all_letters_ok"] = all(r["letters_ok"] and r["events_accepted"] == args.valid for r in runs)
    result["table"] = table(runs)
    return result


def main() -> int:
    args = parse_args()
    result = asyncio.run(main_async(args))
    print(result.pop("table"))
    print(json.dumps(result))
    return 0 if result["all_letters_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
