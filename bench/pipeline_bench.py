"""End-to-end benchmark of the worker: local Kafka -> `ingestor run` -> the Stripe emulator.

    .venv/bin/python bench/pipeline_bench.py                      # make bench: 1,000,000-event backlog, both mixes
    .venv/bin/python bench/pipeline_bench.py --replicas 3 --budget 300 --hot-partitions 1 --mix realistic \
        --no-baseline                                             # skewed: how much budget a busy replica gets
    .venv/bin/python bench/pipeline_bench.py --produce-rate 30000 --no-baseline    # paced: latency
    .venv/bin/python bench/pipeline_bench.py --outage-s 60 --no-baseline           # 503s: peak RSS
    .venv/bin/python bench/pipeline_bench.py --profile --no-baseline               # where the time goes

What it does:

1. Starts a local Kafka broker (`LocalKafka`) in this process and the emulator as a subprocess
   (`--stream-rps-limit` = the budget, `--record-latency`, a live-mode key).
2. Backlog mode (default): produces `--events` events to a `--partitions` topic up front (to the
   first `--hot-partitions` only, for skewed load). Paced mode (`--produce-rate R`): produces them at
   R events/s *while* the workers run. `--mix` (default `realistic,cheap`) runs steps 2-3 once per
   event mix, each on a fresh topic and group: `realistic` is what producers send (80 % an identifier
   and a distinct-millisecond `...Z` timestamp, 8 % unix seconds, 7 % `+hh:mm` offsets with extra
   payload dimensions, 5 % neither; see `REALISTIC_MIX`); `cheap` carries neither identifier nor
   timestamp (the worker derives the identifier and sends the Kafka record timestamp, so the
   emulator's latency is record timestamp -> acceptance). The mix is printed before each run.
3. Runs `--replicas` worker processes (`python -m ingestor run`), polls their `/metrics` until the
   events delivered add up to `--events` (cheap; the emulator's statistics sort every latency and are
   read once at the end), reads each worker's CPU time (utime + stime from /proc/<pid>/stat) and peak
   RSS (VmHWM from /proc/<pid>/status), then SIGTERMs them and checks exactly-once delivery: the
   emulator accepted `--events` distinct identifiers with no duplicate, no dead letter, and the
   group's committed offsets are at the end of every partition.
4. `--outage-s S`: the emulator answers every stream request 503 (`error_retry_true=1`,
   `error_status=503`) from the workers' start for S seconds, then the fault is switched off.
5. Baseline (on unless `--no-baseline`): `bench/baseline_sdk.py` (official stripe SDK, one request
   at a time, commit after each) on `--baseline-events` events, measured the same way.

CPU time is counted from the first delivered event (the workers' start-up and group join are
excluded; `worker_cpu_s_total` includes them). The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingestor_dev.devkafka import LocalKafka, committed_offsets, create_topic, free_port, produce  # noqa: E402
from ingestor_dev.wiretap import WireTap, max_in_window  # noqa: E402

API_KEY = "sk_live_benchNotReal000000000000"
EVENT_NAME = "bench_api_call"
CUSTOMERS = 1000
POLL_S = 0.1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_MB = 1 / 1024  # VmHWM is in kB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events to deliver (default 1,000,000)")
    parser.add_argument("--partitions", type=int, default=6, help="topic partitions (default 6)")
    parser.add_argument("--replicas", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--budget", type=int, default=10_000, help="stream requests/s budget (default 10,000)")
    parser.add_argument("--batch-events", type=int, default=100, help="events per request (default 100)")
    parser.add_argument(
        "--produce-rate", type=float, default=0.0, help="paced mode: produce at this many events/s while running"
    )
    parser.add_argument("--outage-s", type=float, default=0.0, help="answer 503 to every stream request for S s")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True, help="run the SDK baseline")
    parser.add_argument("--baseline-events", type=int, default=200_000, help="events for the baseline (200,000)")
    parser.add_argument(
        "--profile", action="store_true", help="run the (single) worker under py-spy (or pyinstrument) and summarize"
    )
    parser.add_argument("--profile-out", default="/tmp/ingestor-worker-profile", help="profile files' prefix")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the workers to the last CPU and Kafka, the emulator and this process to the others",
    )
    parser.add_argument(
        "--mix",
        default="realistic,cheap",
        help="event shapes, comma-separated runs: realistic (default first), cheap (no identifier, no timestamp)",
    )
    parser.add_argument(
        "--hot-partitions", type=int, default=0, help="skewed load: produce every event to the first H partitions"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds of delivery")
    parser.add_argument(
        "--wire-tap",
        action="store_true",
        help="count requests on the wire (ingestor_dev.wiretap in front of the emulator): max_requests_in_1s_wire",
    )
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="NAME=VALUE", help="extra worker setting (repeatable)"
    )
    return parser.parse_args(argv)


# -- small helpers ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_before": os.getloadavg()[0],
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of proc(5))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * PAGE_MB
    return 0.0


def child_pid(pid: int, timeout: float = 10.0) -> int:
    """The first child of `pid` (py-spy's profiled python)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.05)
    raise RuntimeError(f"process {pid} has no child")


def pin(pid: int, cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of `pid`."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


def cpu_sets(args: argparse.Namespace) -> tuple[set[int], set[int]] | None:
    """(others, workers) CPU sets for --pin."""
    cpus = sorted(os.sched_getaffinity(0))
    if not args.pin or len(cpus) < 2:
        return None
    return set(cpus[:-1]), {cpus[-1]}


def event_pool() -> list[bytes]:
    """The cheap shape: no identifier, no timestamp (the worker derives both); 1,000 distinct values."""
    return [
        orjson.dumps(
            {"event_name": EVENT_NAME, "payload": {"stripe_customer_id": f"cus_{i:05d}", "value": str(i % 9 + 1)}}
        )
        for i in range(CUSTOMERS)
    ]


#: The realistic mix, in per mille of the events (see BENCHMARKS.md): (shape, share).
REALISTIC_MIX: tuple[tuple[str, int], ...] = (
    ("identifier + canonical UTC millisecond timestamp (...T..:..:...mmmZ)", 800),
    ("identifier + unix seconds (half integers, half with milliseconds)", 80),
    ("identifier + +hh:mm offset timestamp + 3 extra payload dimensions", 70),
    ("neither identifier nor timestamp (derived by the worker)", 50),
)
_OFFSETS = ("+05:30", "-04:00", "+01:00", "-07:00", "+09:00")
_REGIONS = ("eu-west-1", "us-east-1", "ap-south-1", "us-west-2")


def realistic_events(n: int, run: str, now_ms: int | None = None) -> tuple[list[bytes], dict[str, int]]:
    """`n` events in the realistic mix: every timestamp a distinct millisecond, in the past, in order.

    Identifiers are unique per run (`evt_<run>_<i>`), so the exactly-once check holds. Shares are
    interleaved (position i mod 1000), not blocked, so every poll sees the mix.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    base = now_ms - n - 60_000  # one millisecond per event, the newest a minute ago
    (_, canonical), (_, unix), (_, offset), _ = REALISTIC_MIX
    counts = dict.fromkeys((shape for shape, _ in REALISTIC_MIX), 0)
    names = [shape for shape, _ in REALISTIC_MIX]
    out: list[bytes] = []
    dumps = orjson.dumps
    for i in range(n):
        slot = i % 1000
        ms = base + i
        payload = {"stripe_customer_id": f"cus_{i % CUSTOMERS:05d}", "value": str(i % 9 + 1)}
        if slot < canonical:
            shape = 0
            seconds, millis = divmod(ms, 1000)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
            event: dict[str, Any] = {"event_name": EVENT_NAME, "payload": payload, "identifier": f"evt_{run}_{i}"}
            event["timestamp"] = stamp
        elif slot < canonical + unix:
            shape = 1
            stamp_n: float = ms // 1000 if i % 2 else ms / 1000
            event = {"event_name": EVENT_NAME, "payload": payload, "identifier": f"evt_{run}_{i}", "timestamp": stamp_n}
        elif slot < canonical + unix + offset:
            shape = 2
            zone = _OFFSETS[i % len(_OFFSETS)]
            hours, minutes = int(zone[1:3]), int(zone[4:6])
            shift = (hours * 60 + minutes) * 60_000 * (1 if zone[0] == "+" else -1)
            seconds, millis = divmod(ms + shift, 1000)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}{zone}"
            payload |= {"region": _REGIONS[i % 4], "plan": f"plan_{i % 7}", "endpoint": f"/v1/items/{i % 50}"}
            event = {"event_name": EVENT_NAME, "payload": payload, "identifier": f"evt_{run}_{i}", "timestamp": stamp}
        else:
            shape = 3
            event = {"event_name": EVENT_NAME, "payload": payload}
        counts[names[shape]] += 1
        out.append(dumps(event))
    return out, counts


def make_events(mix: str, n: int, run: str) -> tuple[list[bytes], dict[str, int]]:
    if mix == "cheap":
        pool = event_pool()
        return [pool[i % CUSTOMERS] for i in range(n)], {"neither identifier nor timestamp (cheap shape)": n}
    return realistic_events(n, run)


class Emulator:
    """`python -m ingestor emulator` as a subprocess, and its HTTP API."""

    def __init__(self, budget: int, log_path: Path, *, trust_arrival_header: bool = False) -> None:
        command = [sys.executable, "-m", "ingestor", "emulator", "--host", "127.0.0.1", "--port", "0"]
        command += ["--stream-rps-limit", str(budget), "--record-latency"]
        command += ["--trust-arrival-header"] if trust_arrival_header else []
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if not line.startswith("emulator listening on "):
            self.process.kill()
            raise SystemExit(f"the emulator did not start: {line!r} (see {log_path})")
        self.url = line.removeprefix("emulator listening on ")
        self.http: aiohttp.ClientSession | None = None

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        if self.http is None:
            self.http = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with self.http.request(method, self.url + path, headers=headers, **kwargs) as resp:
            body = await resp.read()
            if resp.status >= 400:
                raise RuntimeError(f"emulator {method} {path}: {resp.status} {body[:300]!r}")
            return orjson.loads(body) if body else None

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("GET", "/_emulator/stats")
        return result

    async def prepare(self) -> None:
        await self.call("POST", "/_emulator/reset")
        form = {"display_name": EVENT_NAME, "event_name": EVENT_NAME, "default_aggregation[formula]": "sum"}
        await self.call("POST", "/v1/billing/meters", data=form)

    async def set_faults(self, faults: dict[str, Any]) -> None:
        await self.call("POST", "/_emulator/faults", json=faults)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


# -- producing --------------------------------------------------------------------------------------


async def produce_backlog(bootstrap: str, topic: str, values: list[bytes], hot: int = 0) -> float:
    """Produce `values` up front: round robin over the partitions, or only to the first `hot` of them."""
    started = time.monotonic()
    if hot:
        for p in range(hot):
            await produce(bootstrap, topic, values[p::hot], partition=p)
    else:
        await produce(bootstrap, topic, values)
    return time.monotonic() - started


async def produce_paced(bootstrap: str, topic: str, pool: list[bytes], rate: float) -> dict[str, float]:
    """Produce `pool` at `rate` events/s (every 10 ms, what is due, round robin over the partitions)."""
    n = len(pool)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, max_batch_size=512 * 1024)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        started = time.monotonic()
        produced = 0
        pending: list[asyncio.Future[Any]] = []
        behind = 0.0
        while produced < n:
            due = min(n, int((time.monotonic() - started) * rate)) - produced
            if due > 0:
                behind = max(behind, due / rate)
                batches = {p: producer.create_batch() for p in partitions}
                for k in range(due):
                    index = produced + k
                    batch = batches[partitions[index % len(partitions)]]
                    if batch.append(key=None, value=pool[index], timestamp=None) is None:
                        raise RuntimeError("paced batch overflow; lower --produce-rate")
                for partition, batch in batches.items():
                    pending.append(await producer.send_batch(batch, topic, partition=partition))
                produced += due
                if len(pending) > 256:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.sleep(0.01)
        await asyncio.gather(*pending)
        return {"produce_s": time.monotonic() - started, "max_produce_lag_s": behind}
    finally:
        await producer.stop()


# -- workers ----------------------------------------------------------------------------------------


class WorkerProc:
    def __init__(self, index: int, env: dict[str, str], log_path: Path, profile: str | None) -> None:
        self.index = index
        self.metrics_port = int(env["INGESTOR_METRICS_PORT"])
        command = [sys.executable, "-m", "ingestor", "run"]
        self.profile = profile
        if profile == "py-spy":
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            command = [spy, "record", "--nonblocking", "-r", "250", "-f", "raw", "-o", f"{env['BENCH_PROFILE']}.txt"]
            command += ["--", sys.executable, "-m", "ingestor", "run"]
        elif profile == "pyinstrument":
            command = [
                sys.executable,
                "-m",
                "pyinstrument",
                "-r",
                "session",
                "-o",
                f"{env['BENCH_PROFILE']}.pyisession",
            ]
            command += ["-m", "ingestor", "run"]
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = child_pid(self.process.pid) if profile == "py-spy" else self.process.pid
        self.cpu_start = 0.0

    async def metric(self, http: aiohttp.ClientSession, prefix: str) -> int:
        """The sum of the samples whose line starts with `prefix` (0 when /metrics does not answer)."""
        try:
            async with http.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as resp:
                text = await resp.text()
        except (aiohttp.ClientError, OSError):
            return 0
        total = 0.0
        for line in text.splitlines():
            if line.startswith(prefix):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    async def delivered(self, http: aiohttp.ClientSession) -> int:
        return await self.metric(http, "ingestor_events_delivered_total{")

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            if self.pid != self.process.pid:
                os.kill(self.pid, signal.SIGTERM)
            else:
                self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code


def worker_env(args: argparse.Namespace, bootstrap: str, topic: str, url: str, group: str) -> dict[str, str]:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "INGESTOR_TOPICS": topic,
        "INGESTOR_GROUP_ID": group,
        "INGESTOR_DLQ_TOPIC": f"{topic}.dlq",
        "STRIPE_API_KEY": API_KEY,
        "INGESTOR_STRIPE_API_BASE": url,
        "INGESTOR_STRIPE_METER_EVENTS_BASE": url,
        "INGESTOR_RPS_BUDGET": str(args.budget),
        "INGESTOR_METER_CATALOG": "off",
        "INGESTOR_METRICS_HOST": "127.0.0.1",
        "INGESTOR_LOG_LEVEL": "WARNING",
        "INGESTOR_BATCH_MAX_EVENTS": str(args.batch_events),
    }
    if args.outage_s:
        env["INGESTOR_RETRY_MAX_S"] = "5"  # come back within seconds of the outage's end
    for item in args.worker_env:
        name, _, value = item.partition("=")
        env[name] = value
    return env


async def run_workers(
    args: argparse.Namespace, kafka: LocalKafka, emu: Emulator, tmp: Path, mix: str, *, tap: WireTap | None = None
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    run_from = time.time()
    topic = f"bench-{run}"
    group = f"bench-{uuid.uuid4().hex[:8]}"
    await create_topic(kafka.bootstrap, topic, args.partitions)
    await create_topic(kafka.bootstrap, f"{topic}.dlq", 1)
    await emu.prepare()
    n = args.events
    values, shapes = make_events(mix, n, run)
    result: dict[str, Any] = {"mix": mix, "shapes": shapes, "mode": "paced" if args.produce_rate else "backlog"}
    if args.hot_partitions:
        result["hot_partitions"] = args.hot_partitions
    print(f"[{mix}] {n:,} events: " + "; ".join(f"{c:,} {shape}" for shape, c in shapes.items()), file=sys.stderr)
    if not args.produce_rate:
        result["produce_s"] = round(await produce_backlog(kafka.bootstrap, topic, values, args.hot_partitions), 2)
    if args.outage_s:
        await emu.set_faults({"error_retry_true": 1.0, "error_status": 503})
    base_env = worker_env(args, kafka.bootstrap, topic, tap.url if tap else emu.url, group)
    profile = None
    if args.profile:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        profile = "py-spy" if os.access(spy, os.X_OK) else "pyinstrument"
    workers = [
        WorkerProc(
            i,
            {**base_env, "INGESTOR_METRICS_PORT": str(free_port()), "BENCH_PROFILE": f"{args.profile_out}-{mix}"},
            tmp / f"worker-{i}.log",
            profile if i == 0 else None,
        )
        for i in range(args.replicas)
    ]
    started = time.monotonic()
    if args.produce_rate:
        # Paced mode measures latency in the steady state: produce once every partition is owned.
        async with aiohttp.ClientSession() as http:
            while sum(await asyncio.gather(*(w.metric(http, "ingestor_partitions_assigned ") for w in workers))) < (
                args.partitions
            ):
                if time.monotonic() - started > args.timeout:
                    raise RuntimeError("the workers did not join the group")
                await asyncio.sleep(POLL_S)
        result["joined_after_s"] = round(time.monotonic() - started, 2)
    producer = (
        asyncio.create_task(produce_paced(kafka.bootstrap, topic, values, args.produce_rate))
        if args.produce_rate
        else None
    )
    outage_over = not args.outage_s
    t0 = t_end = None
    first = 0
    rss_seen = [0.0] * len(workers)
    async with aiohttp.ClientSession() as http:
        try:
            while True:
                now = time.monotonic()
                if not outage_over and now - started >= args.outage_s:
                    await emu.set_faults({"replace": True})
                    outage_over = True
                    result["outage_ended_after_s"] = round(now - started, 1)
                counts = await asyncio.gather(*(w.delivered(http) for w in workers))
                delivered = sum(counts)
                for i, w in enumerate(workers):
                    rss_seen[i] = max(rss_seen[i], peak_rss_mb(w.pid))
                    if w.process.poll() is not None:
                        raise RuntimeError(f"worker {i} exited early ({w.process.returncode}); see {tmp}")
                if t0 is None and delivered > 0:
                    t0, first = now, delivered
                    for w in workers:
                        w.cpu_start = cpu_seconds(w.pid)
                if delivered >= n:
                    t_end = now
                    break
                if now - started > args.timeout:
                    raise RuntimeError(f"timed out with {delivered}/{n} delivered")
                await asyncio.sleep(POLL_S)
            cpu_end = [cpu_seconds(w.pid) for w in workers]
            rss = [max(rss_seen[i], peak_rss_mb(w.pid)) for i, w in enumerate(workers)]
        finally:
            codes = [w.stop() for w in workers]
            if producer is not None and not producer.done():
                producer.cancel()
    if producer is not None:
        result.update({k: round(v, 3) for k, v in (await producer).items()})
    stats = await emu.stats()
    ends = await _end_offsets(kafka.bootstrap, topic)
    committed = await committed_offsets(kafka.bootstrap, group, topic)
    # An empty partition (skewed load) has nothing to commit: its end is 0.
    at_end = all(committed.get(p, 0) == end for p, end in ends.items())
    window_events = n - first
    elapsed = t_end - t0 if t0 is not None and t_end is not None else float("nan")
    cpu_window = sum(cpu_end) - sum(w.cpu_start for w in workers)
    cpu_total = sum(cpu_end)
    requests = stats["stream_requests"]
    latency = stats.get("latency_ms") or {}
    result.update(
        {
            "events": n,
            "partitions": args.partitions,
            "replicas": args.replicas,
            "batch_events": args.batch_events,
            "seconds": round(elapsed, 3),
            "seconds_from_start": round(t_end - started, 3) if t_end else None,
            "events_per_s": round(window_events / elapsed),
            "worker_cpu_s": round(cpu_window, 2),
            "worker_cpu_s_total": round(cpu_total, 2),
            "worker_cpu_s_per_million": round(cpu_window / window_events * 1e6, 3),
            "events_per_cpu_s": round(window_events / cpu_window) if cpu_window else None,
            "requests": requests,
            "requests_per_s": round(requests / elapsed),
            "events_per_request": round(stats["events_received"] / max(1, requests), 1),
            "max_requests_in_1s": stats["stream_max_requests_per_1s_window"],
            "max_requests_in_1s_wire": wire_max(tap, run_from),
            "budget": args.budget,
            "budget_utilization": round(requests / elapsed / args.budget, 3),
            "p50_latency_ms": latency.get("p50"),
            "p90_latency_ms": latency.get("p90"),
            "p99_latency_ms": latency.get("p99"),
            "max_latency_ms": latency.get("max"),
            "peak_rss_mb": round(max(rss), 1),
            "peak_rss_mb_per_worker": [round(r, 1) for r in rss],
            "events_accepted": stats["events_accepted"],
            "unique_identifiers": stats["unique_identifiers"],
            "duplicates_dropped": stats["duplicates_dropped"],
            "faults_injected": stats["faults_injected"],
            "rate_limited": stats["rate_limited"],
            "committed_at_end": at_end,
            "worker_exit_codes": codes,
        }
    )
    result["exactly_once"] = (
        stats["events_accepted"] == n
        and stats["unique_identifiers"] == n
        and stats["duplicates_dropped"] == 0
        and at_end
    )
    if profile is not None:
        result["profile"] = summarize_profile(profile, f"{args.profile_out}-{mix}")
    return result


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer  # noqa: PLC0415
    from aiokafka.structs import TopicPartition  # noqa: PLC0415

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001
        partitions = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


# -- the baseline -----------------------------------------------------------------------------------


async def run_baseline(args: argparse.Namespace, kafka: LocalKafka, emu: Emulator, tmp: Path) -> dict[str, Any]:
    n = args.baseline_events
    topic = f"bench-sdk-{uuid.uuid4().hex[:8]}"
    await create_topic(kafka.bootstrap, topic, args.partitions)
    await emu.prepare()
    await produce_backlog(kafka.bootstrap, topic, make_events("cheap", n, "sdk")[0])
    command = [sys.executable, str(ROOT / "bench" / "baseline_sdk.py"), "--bootstrap", kafka.bootstrap]
    command += ["--topic", topic, "--group", f"sdk-{uuid.uuid4().hex[:8]}", "--url", emu.url, "--key", API_KEY]
    command += ["--events", str(n), "--batch-events", str(args.batch_events)]
    log = (tmp / "baseline.log").open("wb")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log)  # noqa: ASYNC220 - start-up only
    pinned = cpu_sets(args)
    if pinned is not None:
        pin(process.pid, pinned[1])
    started = time.monotonic()
    try:
        t0 = None
        first = 0
        while t0 is None:
            accepted = (await emu.stats())["events_accepted"]
            if accepted:
                t0, first, cpu_start = time.monotonic(), accepted, cpu_seconds(process.pid)
                break
            if process.poll() is not None or time.monotonic() - started > args.timeout:
                raise RuntimeError(f"the baseline did not deliver; see {tmp / 'baseline.log'}")
            await asyncio.sleep(POLL_S)
        assert process.stdout is not None
        line = await asyncio.to_thread(process.stdout.readline)
        t_end = time.monotonic()
        if not line.startswith(b"baseline sent"):
            raise RuntimeError(f"the baseline failed: {line!r}; see {tmp / 'baseline.log'}")
        cpu_end = cpu_seconds(process.pid)
        rss = peak_rss_mb(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    stats = await emu.stats()
    cpu = cpu_end - cpu_start
    return {
        "events": n,
        "seconds": round(t_end - t0, 3),
        "events_per_s": round((n - first) / (t_end - t0)),
        "cpu_s": round(cpu, 2),
        "cpu_s_per_million": round(cpu / (n - first) * 1e6, 3),
        "requests": stats["stream_requests"],
        "events_accepted": stats["events_accepted"],
        "p99_latency_ms": (stats.get("latency_ms") or {}).get("p99"),
        "peak_rss_mb": round(rss, 1),
    }


# -- the profile ------------------------------------------------------------------------------------

AREAS = (
    ("aiokafka", "aiokafka"),
    ("kafka", "kafka/"),
    ("aiohttp", "aiohttp"),
    ("yarl/multidict", "yarl"),
    ("yarl/multidict", "multidict"),
    ("prometheus_client", "prometheus_client"),
    ("ingestor", "ingestor/"),
    ("asyncio", "asyncio"),
    ("uvloop", "uvloop"),
)


def _area(frame: str) -> str:
    for name, needle in AREAS:
        if needle in frame:
            return name
    return "other"


def summarize_profile(kind: str, prefix: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares of the samples per function, and self share per library."""
    stacks: Counter[tuple[str, ...]] = Counter()
    if kind == "py-spy":
        path = Path(f"{prefix}.txt")
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack:
                frames = tuple(_short(f) for f in stack.split(";"))
                stacks[frames] += int(count)
    else:
        from pyinstrument.session import Session  # noqa: PLC0415

        path = Path(f"{prefix}.pyisession")
        session = Session.load(str(path))
        for frames, seconds in _pyinstrument_stacks(session):
            stacks[frames] += round(seconds * 1000)
    total = sum(stacks.values()) or 1
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    for frames, count in stacks.items():
        self_time[frames[-1]] += count
        areas[_area(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count

    def pct(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * c / total, 1)] for name, c in counter.most_common(top)]

    summary = {
        "tool": kind,
        "samples": total,
        "file": str(path),
        "self_pct": pct(self_time),
        "inclusive_pct": pct(inclusive),
        "self_pct_by_area": [[name, round(100 * c / total, 1)] for name, c in areas.most_common()],
    }
    Path(f"{prefix}-summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _short(frame: str) -> str:
    """`func (path/to/site-packages/pkg/mod.py:123)` -> `func (pkg/mod.py)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    where = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


def _pyinstrument_stacks(session: Any) -> list[tuple[tuple[str, ...], float]]:
    out: list[tuple[tuple[str, ...], float]] = []
    for stack, seconds in session.frame_records:
        frames = tuple(_short(f"{f.split(chr(0))[0]} ({f.split(chr(0))[1]})") for f in stack if chr(0) in f)
        if frames:
            out.append((frames, seconds))
    return out


def wire_max(tap: WireTap | None, since: float) -> int | None:
    """The most stream requests in any 1-second window on the wire since ``since`` (None: no tap)."""
    if tap is None:
        return None
    return max_in_window([t for t in tap.arrivals().times() if t >= since])


# -- main -------------------------------------------------------------------------------------------


SUMMARY_KEYS = (
    "events_per_s",
    "worker_cpu_s_per_million",
    "requests_per_s",
    "max_requests_in_1s",
    "max_requests_in_1s_wire",
    "budget_utilization",
    "p99_latency_ms",
    "peak_rss_mb",
    "exactly_once",
)


def parse_mixes(text: str) -> list[str]:
    mixes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(mixes) - {"realistic", "cheap"})
    if unknown or not mixes:
        raise SystemExit(f"--mix takes realistic and/or cheap, not {text!r}")
    return mixes


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ingestor-bench-"))
    result: dict[str, Any] = {"command": " ".join(["bench/pipeline_bench.py", *sys.argv[1:]]), "machine": machine()}
    runs: dict[str, dict[str, Any]] = {}
    async with LocalKafka() as kafka:
        emu = Emulator(args.budget, tmp / "emulator.log", trust_arrival_header=args.wire_tap)
        tap = WireTap(emu.url, stamp=True) if args.wire_tap else None
        if tap is not None:
            await tap.start()
        pinned = cpu_sets(args)
        if pinned is not None:
            for pid in (kafka.pid, emu.process.pid, os.getpid()):
                if pid is not None:
                    pin(pid, pinned[0])
            result["pinned"] = {"workers": sorted(pinned[1]), "others": sorted(pinned[0])}
        try:
            for mix in parse_mixes(args.mix):
                runs[mix] = await run_workers(args, kafka, emu, tmp, mix, tap=tap)
            result["runs"] = runs
            if args.baseline:
                base = await run_baseline(args, kafka, emu, tmp)
                result["baseline"] = base
                for mix, run in runs.items():
                    result[f"speedup_cpu_baseline_over_worker_{mix}"] = round(
                        base["cpu_s_per_million"] / run["worker_cpu_s_per_million"], 1
                    )
        finally:
            if tap is not None:
                await tap.stop()
            await emu.close()
    result["exactly_once"] = all(run["exactly_once"] for run in runs.values())
    result["logs"] = str(tmp)
    return result


def print_profile(profile: dict[str, Any]) -> None:
    print(f"profile ({profile['tool']}, {profile['samples']} samples, {profile['file']}):")
    for name, share in profile["self_pct_by_area"]:
        print(f"  {share:5.1f}%  {name}")
    print("top functions by self time:")
    for name, share in profile["self_pct"]:
        print(f"  {share:5.1f}%  {name}")
    print("top functions by inclusive time:")
    for name, share in profile["inclusive_pct"]:
        print(f"  {share:5.1f}%  {name}")


def main() -> int:
    args = parse_args()
    if args.profile and args.replicas != 1:
        raise SystemExit("--profile runs a single worker (--replicas 1)")
    result = asyncio.run(main_async(args))
    for mix, run in result.get("runs", {}).items():
        profile = run.pop("profile", None)
        if profile is not None:
            print(f"[{mix}]", end=" ")
            print_profile(profile)
            run["profile_summary"] = profile["file"].rsplit(".", 1)[0] + "-summary.json"
    for mix, run in result.get("runs", {}).items():
        print(f"[{mix}] " + ", ".join(f"{k}={run.get(k)}" for k in SUMMARY_KEYS))
    print(json.dumps(result))
    return 0 if result.get("exactly_once") else 1


if __name__ == "__main__":
    sys.exit(main())
