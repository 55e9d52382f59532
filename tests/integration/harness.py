"""Helpers for end-to-end tests: a worker in-process or as subprocesses, the emulator's HTTP API, a
broker that can be stopped and started again on its data directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, Self

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from ingestor import settings as settings_mod
from ingestor.worker import Worker
from ingestor_dev import devkafka
from ingestor_dev.devkafka import LocalKafka, create_topic

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

API_KEY = "sk_test_ingestorIntegration0000000000"


def worker_env(bootstrap: str, topic: str, emu_url: str, **overrides: str) -> dict[str, str]:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "INGESTOR_TOPICS": topic,
        "INGESTOR_GROUP_ID": f"g-{uuid.uuid4().hex[:10]}",
        "INGESTOR_DLQ_TOPIC": f"{topic}.dlq",
        "STRIPE_API_KEY": API_KEY,
        "INGESTOR_STRIPE_API_BASE": emu_url,
        "INGESTOR_STRIPE_METER_EVENTS_BASE": emu_url,
        "INGESTOR_RPS_BUDGET": "100000",
        "INGESTOR_METRICS_PORT": "0",
        "INGESTOR_METRICS_HOST": "127.0.0.1",
        "INGESTOR_LINGER_MS": "20",
        "INGESTOR_COMMIT_INTERVAL_MS": "200",
        "INGESTOR_METER_CATALOG": "stripe",
        "INGESTOR_RETRY_BASE_S": "0.05",
        "INGESTOR_RETRY_MAX_S": "1",
        "INGESTOR_DRAIN_TIMEOUT_S": "20",
    }
    env.update(overrides)
    return env


async def ensure_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    """Create `topic` unless it exists (the worker refuses to start without its dead-letter topic)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        existing = await consumer.topics()
    finally:
        await consumer.stop()
    if topic not in existing:
        await create_topic(bootstrap, topic, partitions)


@contextlib.asynccontextmanager
async def running_worker(env: dict[str, str]) -> AsyncIterator[Worker]:
    """A worker in this process and loop; stopped (drained) on exit."""
    await ensure_topic(env["KAFKA_BOOTSTRAP_SERVERS"], env["INGESTOR_DLQ_TOPIC"])
    worker = Worker(settings_mod.load(env))
    async with worker:
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 60)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str, step: float = 0.2) -> None:
    """Poll `check` until true; fail after `timeout` seconds (bounded loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def cluster_id(bootstrap: str) -> str:
    """The cluster's id, as the broker reports it (the default namespace of derived identifiers)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return str((await admin.describe_cluster())["cluster_id"])
    finally:
        await admin.close()


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The last stable offsets (read_committed): transactional writes in progress are not counted in."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


async def read_topic(bootstrap: str, topic: str, timeout: float = 10.0) -> list[Any]:
    """Every committed record currently in `topic`, as a `read_committed` reader sees them (reads up to the
    end offsets taken at the start; aborted transactional writes and transaction markers are not records)."""
    ends = await end_offsets(bootstrap, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    out: list[Any] = []
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            positions = {tp.partition: await consumer.position(tp) for tp in tps}
            if all(positions[p] >= ends[p] for p in ends):
                break
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out.extend(r for r in records if r.offset < ends[r.partition])
    finally:
        await consumer.stop()
    return out


class StripeApi:
    """The emulator through its HTTP API (the same calls a user would make to Stripe)."""

    def __init__(self, base: str, key: str = API_KEY) -> None:
        self.base = base
        self.key = key

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.base + path, headers=self._headers(), **kwargs) as resp,
        ):
            body = await resp.read()
            if resp.status >= 400:
                raise AssertionError(f"{method} {path}: {resp.status} {body[:300]!r}")
            return orjson.loads(body) if body else None

    async def create_meter(self, event_name: str, formula: str = "sum", **extra: str) -> str:
        form = {
            "display_name": event_name,
            "event_name": event_name,
            "default_aggregation[formula]": formula,
            **extra,
        }
        meter = await self._call("POST", "/v1/billing/meters", data=form)
        return str(meter["id"])

    async def deactivate_meter(self, meter_id: str) -> None:
        await self._call("POST", f"/v1/billing/meters/{meter_id}/deactivate")

    async def total(self, meter_id: str, customer: str, start: int, end: int) -> int:
        params = {"customer": customer, "start_time": str(start), "end_time": str(end)}
        page = await self._call("GET", f"/v1/billing/meters/{meter_id}/event_summaries", params=params)
        return int(sum(s["aggregated_value"] for s in page["data"]))

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/_emulator/stats")
        return result

    async def set_faults(self, **faults: Any) -> None:
        await self._call("POST", "/_emulator/faults", json=faults)

    async def revoke_sessions(self) -> None:
        await self._call("POST", "/_emulator/sessions/revoke", json={"all": True})


def minute_window(now: float | None = None) -> tuple[int, int]:
    """A summary window (aligned to minutes) that covers the last 2 days and the next hour."""
    now = time.time() if now is None else now
    end = (int(now) // 60 + 61) * 60
    return end - 2 * 86400 - 3600, end


def start_worker_process(env: dict[str, str], log_path: str) -> subprocess.Popen[bytes]:
    """`ingestor run` as a child process with `env` on top of ours."""
    full = {**os.environ, **env, "INGESTOR_LOG_FORMAT": "json"}
    with open(log_path, "ab") as log:  # noqa: PTH123 - the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "ingestor", "run"],
            env=full,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def stop_process(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise


class WorkerFleet:
    """`ingestor run` processes of one consumer group, started, killed and stopped by a test.

    Every process stopped with SIGTERM has its exit code kept in `exit_codes`; one that exited by
    itself (a crash) is reported by `crashed()`. On leaving, whatever still runs is killed.
    """

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.running: list[subprocess.Popen[bytes]] = []
        self.exit_codes: list[int] = []
        self.killed = 0
        self._started = 0
        self._crashes: list[tuple[str, int]] = []

    def start(self, **overrides: str) -> subprocess.Popen[bytes]:
        self._started += 1
        proc = start_worker_process({**self.env, **overrides}, str(self.log_path(self._started)))
        self.running.append(proc)
        return proc

    def log_path(self, n: int) -> Path:
        return self.log_dir / f"worker-{n}.log"

    async def kill(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        """SIGKILL one worker (the oldest by default) and reap it."""
        proc = proc or self.running[0]
        self.running.remove(proc)
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)
        self.killed += 1

    async def stop(self, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> int:
        """SIGTERM one worker (the oldest by default); its exit code is kept (a hang is killed, code -9)."""
        proc = proc or self.running[0]
        self.running.remove(proc)
        if proc.poll() is not None:
            self._crashes.append((f"pid {proc.pid}", proc.returncode))
            return proc.returncode
        try:
            code = await asyncio.to_thread(stop_process, proc, signal.SIGTERM, timeout)
        except subprocess.TimeoutExpired:
            code = -signal.SIGKILL
        self.exit_codes.append(code)
        return code

    async def stop_all(self, timeout: float = 60) -> list[int]:
        return list(await asyncio.gather(*(self.stop(proc, timeout) for proc in list(self.running))))

    def alive(self) -> int:
        return sum(1 for proc in self.running if proc.poll() is None)

    def crashed(self) -> list[tuple[str, int]]:
        """Workers that exited without being asked to (pid, exit code), including those already stopped."""
        gone = [(f"pid {proc.pid}", proc.returncode) for proc in self.running if proc.poll() is not None]
        return self._crashes + gone

    def log_tail(self, lines: int = 8) -> str:
        """The last lines of every worker's log, for a failure message."""
        out = []
        for n in range(1, self._started + 1):
            path = self.log_path(n)
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- worker-{n}.log\n" + "\n".join(tail))
        return "\n".join(out)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()
            await asyncio.to_thread(proc.wait, 10)
        self.running.clear()


class RestartableKafka(LocalKafka):
    """A broker of its own that a test stops and starts again on the same ports and data directory."""

    async def halt(self) -> None:
        """Stop the broker process (SIGTERM, a clean shutdown); its data directory stays."""
        process, self._process = self._process, None
        if self._watchdog is not None:
            self._watchdog.release()
            self._watchdog = None
        if process is not None:
            await asyncio.to_thread(devkafka._terminate, process, devkafka.STOP_TIMEOUT_S)

    async def resume(self, ready_within: float = devkafka.START_TIMEOUT_S) -> None:
        """Start the same broker again (same `server.properties`, so the same ports and log directory)."""
        await asyncio.to_thread(self._relaunch)
        await self._wait_ready(time.monotonic() + ready_within)

    def _relaunch(self) -> None:
        libs = devkafka.fetch(self.version)
        properties = self.data_dir / "server.properties"
        command = [*self._java_command(libs, devkafka.BROKER_JVM_OPTS), "kafka.Kafka", str(properties)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._watchdog = devkafka._Watchdog(self._process.pid, self._data_dir)
