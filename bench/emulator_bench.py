"""Benchmark the Stripe emulator's stream endpoint: requests/s of 100-event requests on one core.

The emulator runs in a subprocess pinned to CPU 0; this process (pinned to CPU 1) drives it over
several keep-alive connections with a raw asyncio HTTP/1.1 client writing pre-serialized requests
(every event has a unique identifier), then reads the emulator's statistics and checks that every
event of every 200 response was counted and validated exactly once.

    .venv/bin/python bench/emulator_bench.py [--seconds 10] [--connections 8] [--pipeline 2]

The last line of output is JSON: requests_per_s, events_per_s, emulator_cpu_s, cpu_us_per_request,
seconds, requests, events, errors. On a busy machine requests_per_s also measures the neighbours;
cpu_us_per_request (the emulator's CPU time per answered request) much less so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk_live_emulatorbench0001"
EVENT_NAME = "bench_api_call"
EVENTS_PER_REQUEST = 100
COUNTER_WIDTH = 10
MARK = b"\x00COUNTER\x00"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration (default 10)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections (default 8)")
    parser.add_argument("--pipeline", type=int, default=2, help="requests in flight per connection (default 2)")
    parser.add_argument("--emulator-cpu", type=int, default=0, help="CPU to pin the emulator to (default 0)")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU to pin the load generator to (default 1)")
    parser.add_argument("--profile", action="store_true", help="run the emulator under pyinstrument")
    return parser.parse_args()


# -- the emulator subprocess ------------------------------------------------------------------------


def start_emulator(cpu: int, profile: bool) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable]
    if profile:
        command += ["-m", "pyinstrument", "-o", "/tmp/emulator-profile.txt", "-m"]
    else:
        command += ["-m"]
    command += ["ingestor", "emulator", "--port", "0", "--stream-rps-limit", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    os.sched_setaffinity(process.pid, {cpu})  # before it serves: it is still importing
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("emulator listening on "):
        process.kill()
        raise SystemExit(f"emulator did not start: {line!r}")
    return process, line.removeprefix("emulator listening on ")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[11] and fields[12] are utime and stime (fields 14 and 15 of proc(5), counted from 1)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def call(url: str, path: str, *, data: bytes | None = None, auth: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {auth}"} if auth else {}
    if data is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    request = urllib.request.Request(
        url + path, data=data, headers=headers, method="POST" if data is not None else "GET"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def setup(url: str) -> str:
    form = urllib.parse.urlencode(
        {"display_name": "bench", "event_name": EVENT_NAME, "default_aggregation[formula]": "sum"}
    ).encode()
    call(url, "/v1/billing/meters", data=form, auth=API_KEY)
    session = call(url, "/v2/billing/meter_event_session", data=b"", auth=API_KEY)
    return session["authentication_token"]


# -- the load generator -----------------------------------------------------------------------------


class RequestFactory:
    """Pre-serialized requests; only the 10-digit request counter changes (100 unique identifiers)."""

    def __init__(self, host: str, token: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        events = [
            {
                "event_name": EVENT_NAME,
                "identifier": f"bench-{'X' * COUNTER_WIDTH}-{index:03d}",
                "timestamp": stamp,
                "payload": {"stripe_customer_id": f"cus_bench{index % 10}", "value": str(index + 1)},
            }
            for index in range(EVENTS_PER_REQUEST)
        ]
        body = json.dumps({"events": events}, separators=(",", ":")).encode()
        self.parts = body.split(b"X" * COUNTER_WIDTH)
        self.value_per_request = sum(range(1, EVENTS_PER_REQUEST + 1))
        self.head = (
            f"POST /v2/billing/meter_event_stream HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Stripe-Version: 2026-06-24.dahlia\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.counter = 0

    def next(self) -> bytes:
        self.counter += 1
        return self.head + str(self.counter).zfill(COUNTER_WIDTH).encode().join(self.parts)


class Connection(asyncio.Protocol):
    def __init__(self, factory: RequestFactory, deadline: float, pipeline: int, done: asyncio.Future[None]) -> None:
        self.factory = factory
        self.deadline = deadline
        self.pipeline = pipeline
        self.done = done
        self.buffer = b""
        self.outstanding = 0
        self.ok = 0
        self.errors = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        for _ in range(self.pipeline):
            self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.outstanding += 1
        self.transport.write(self.factory.next())

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            start = head.lower().find(b"content-length:")
            length = int(head[start + 15 : head.find(b"\r\n", start) if head.find(b"\r\n", start) > 0 else None])
            if len(buffer) < end + 4 + length:
                break
            if head[9:12] == b"200":
                self.ok += 1
            else:
                self.errors += 1
            buffer = buffer[end + 4 + length :]
            self.outstanding -= 1
            if time.monotonic() < self.deadline:
                self.send()
            elif self.outstanding == 0 and not self.done.done():
                self.done.set_result(None)
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))


async def drive(url: str, token: str, seconds: float, connections: int, pipeline: int) -> tuple[int, int, float]:
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    factory = RequestFactory(f"{host}:{port}", token)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    deadline = started + seconds
    protocols = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        _, protocol = await loop.create_connection(
            lambda done=done: Connection(factory, deadline, pipeline, done), host, port
        )
        protocols.append(protocol)
    await asyncio.wait_for(asyncio.gather(*(protocol.done for protocol in protocols)), seconds + 60)
    elapsed = time.monotonic() - started
    for protocol in protocols:
        if protocol.transport is not None:
            protocol.transport.close()
    return sum(p.ok for p in protocols), sum(p.errors for p in protocols), elapsed


def run_load(url: str, token: str, args: argparse.Namespace) -> tuple[int, int, float]:
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop) if uvloop else asyncio.Runner()
    with runner:
        return runner.run(drive(url, token, args.seconds, args.connections, args.pipeline))


def main() -> int:
    args = parse_args()
    os.sched_setaffinity(0, {args.client_cpu})
    process, url = start_emulator(args.emulator_cpu, args.profile)
    try:
        token = setup(url)
        cpu_before = cpu_seconds(process.pid)
        client_before = time.process_time()
        ok, errors, elapsed = run_load(url, token, args)
        cpu_used = cpu_seconds(process.pid) - cpu_before
        client_cpu = time.process_time() - client_before
        stats = call(url, "/_emulator/stats")
    finally:
        process.terminate()
        process.wait(timeout=30)
    events = ok * EVENTS_PER_REQUEST
    checks = {
        "events_accepted": stats["events_accepted"] == events,
        "events_valid": stats["events_valid"] == events,
        "no duplicates": stats["duplicates_dropped"] == 0,
        "no invalid events": stats["events_invalid"] == 0,
        "stream 200s": stats["requests"].get("/v2/billing/meter_event_stream", {}).get("200", 0) == ok,
    }
    print(f"emulator:            {url} (pinned to CPU {args.emulator_cpu})")
    print(f"load:                {args.connections} connections x {args.pipeline} in flight, {elapsed:.2f} s")
    print(f"requests (200):      {ok:,}  errors: {errors:,}")
    print(f"events:              {events:,}")
    print(f"requests/s:          {ok / elapsed:,.0f}")
    print(f"events/s:            {events / elapsed:,.0f}")
    print(f"emulator CPU:        {cpu_used:.2f} s ({cpu_used / elapsed:.0%} of one core)")
    print(f"CPU per request:     {cpu_used / max(ok, 1) * 1e6:.1f} us")
    print(f"load generator CPU:  {client_cpu:.2f} s ({client_cpu / elapsed:.0%} of one core)")
    print(f"stream max req/1s:   {stats['stream_max_requests_per_1s_window']:,}")
    for name, passed in checks.items():
        print(f"check {name:<18} {'ok' if passed else 'FAILED'}")
    print(
        json.dumps(
            {
                "requests_per_s": round(ok / elapsed, 1),
                "events_per_s": round(events / elapsed, 1),
                "emulator_cpu_s": round(cpu_used, 3),
                "cpu_us_per_request": round(cpu_used / ok * 1e6, 1) if ok else None,
                "seconds": round(elapsed, 3),
                "requests": ok,
                "events": events,
                "errors": errors + sum(not passed for passed in checks.values()),
            }
        )
    )
    return 0 if all(checks.values()) and errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
