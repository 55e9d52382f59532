"""`ingestor audit` on a million events: how long it takes and how much memory it holds.

    .venv/bin/python bench/audit_bench.py                 # 1,000,000 events, realistic mix, 6 partitions
    .venv/bin/python bench/audit_bench.py --events 200000

1. Starts a local Kafka broker and the Stripe emulator (in this process), creates the meter.
2. Produces `--events` events in the pipeline benchmark's realistic mix (identifiers, four timestamp
   forms, `CUSTOMERS` customers) plus one cancellation per 1,000 events, to a `--partitions` topic.
3. Runs `python -m ingestor audit --json` as a child process over the events' time range and reads its
   wall time and peak RSS (VmHWM of /proc/<pid>/status, polled every 20 ms: the peak of the child after
   its exec, not of the forked copy of this process, which holds the produced events). Nothing was delivered, so every
   total differs (exit 1): the point is the reading, decoding and folding, and the summaries read per
   (meter, customer).

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).parent))

from pipeline_bench import CUSTOMERS, EVENT_NAME, realistic_events

from ingestor_dev import devkafka
from ingestor_dev.emulator import Emulator, EmulatorConfig

API_KEY = "sk_test_auditBench000000000000"


def _peak_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return 0
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1])


async def main(args: argparse.Namespace) -> dict[str, object]:
    with devkafka.LocalKafka() as broker:
        topic, dlq = f"audit-bench-{uuid.uuid4().hex[:6]}", "audit-bench.dlq"
        await devkafka.create_topic(broker.bootstrap, topic, args.partitions)
        await devkafka.create_topic(broker.bootstrap, dlq, 1)
        async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
            form = {"display_name": EVENT_NAME, "event_name": EVENT_NAME, "default_aggregation[formula]": "sum"}
            import aiohttp  # noqa: PLC0415

            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
                await (await http.post(f"{emu.url}/v1/billing/meters", data=form)).read()
            run = uuid.uuid4().hex[:6]
            started = time.time()
            values, _ = realistic_events(args.events, run)
            cancels = [
                orjson.dumps({"event_name": EVENT_NAME, "type": "cancel", "cancel": {"identifier": f"evt_{run}_{i}"}})
                for i in range(0, args.events, 1000)
            ]
            print(f"producing {len(values) + len(cancels):,} records ...", flush=True)
            await devkafka.produce(broker.bootstrap, topic, values + cancels)
            env = {
                **os.environ,
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                "INGESTOR_TOPICS": topic,
                "INGESTOR_DLQ_TOPIC": dlq,
                "STRIPE_API_KEY": API_KEY,
                "INGESTOR_STRIPE_API_BASE": emu.url,
                "INGESTOR_API_RPS": "1000",
            }
            window_from = str(int(started) - args.events // 1000 - 600)
            command = [sys.executable, "-m", "ingestor", "audit", "--from", window_from, "--json"]
            print("running", " ".join(command[2:]), flush=True)
            t0 = time.monotonic()
            with tempfile.TemporaryFile() as sink:
                proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
                peak_kib = 0
                while proc.poll() is None:
                    peak_kib = max(peak_kib, _peak_kib(proc.pid))
                    await asyncio.sleep(0.02)
                wall = time.monotonic() - t0
                sink.seek(0)
                out = sink.read()
    report = orjson.loads(out)
    code = proc.returncode
    return {
        "events": args.events,
        "records_read": report["records_read"],
        "events_counted": report["counted"],
        "cancelled": report["cancelled"],
        "totals": len(report["totals"]),
        "customers": CUSTOMERS,
        "exit_status": code,
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=6)
    result = asyncio.run(main(parser.parse_args()))
    print(orjson.dumps(result).decode())
