"""Arrival as the wire saw it: the emulator's window and rate limiter are not fooled by its own pauses."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import aiohttp
import orjson
import pytest

from ingestor_dev.emulator import Emulator, EmulatorConfig
from ingestor_dev.emulator.arrival import ARRIVAL_HEADER, MAX_AGE_S, arrival_time, is_loopback
from ingestor_dev.emulator.faults import Faults
from ingestor_dev.emulator.windows import FixedWindowLimiter, SlidingWindowMax, max_in_window
from ingestor_dev.wiretap import WireTap
from tests.emulator.conftest import STREAM, Api, FakeClock, event

LIMIT = 20
#: just under the limit: a client that behaves
RATE = 18
REQUESTS = 54
STALL_AFTER_S = 1.0
STALL_S = 0.3


def test_the_arrival_header_is_believed_only_when_plausible():
    now = 1_764_500_000.0
    assert arrival_time(b"1764499999.75", now) == 1_764_499_999.75
    assert arrival_time("1764499999.5", now) == 1_764_499_999.5
    assert arrival_time(None, now) == now
    for bad in (b"", b"soon", b"nan", b"inf", str(now - MAX_AGE_S - 1).encode(), str(now + 5).encode()):
        assert arrival_time(bad, now) == now
    assert arrival_time(str(now + 0.01), now) == now  # a clock a little ahead never runs past now
    assert is_loopback(("127.0.0.1", 5))
    assert is_loopback(("::1", 5, 0, 0))
    assert not is_loopback(("10.0.0.1", 5))
    assert not is_loopback(None)
    assert not is_loopback(("not-an-ip", 1))


def test_the_window_counts_arrivals_that_come_a_little_out_of_order():
    rng = random.Random(7)
    times = sorted(100 + rng.random() * 5 for _ in range(400))
    shuffled = [t + rng.uniform(-0.2, 0.0) for t in times]  # stamped on several connections
    window = SlidingWindowMax()
    for t in shuffled:
        window.add(t)
    assert window.max_count == max_in_window(shuffled)
    assert sum(window.per_second.values()) == len(shuffled)


def test_the_limiter_counts_a_late_comer_in_its_own_second():
    limiter = FixedWindowLimiter()
    assert limiter.allow("k", 2, 10.9)
    assert limiter.allow("k", 2, 11.0)
    assert limiter.allow("k", 2, 10.95)  # of second 10, processed after one of second 11
    assert not limiter.allow("k", 2, 10.99)
    assert limiter.allow("k", 2, 11.5)
    assert not limiter.allow("k", 2, 11.6)


def steady_client(url: str, token: str, out: list[bytes], started: threading.Event) -> None:
    """Pipelined stream requests at `RATE`/s on one connection (answers read at the end), so that a stall
    of the server's loop does not slow the client down: requests queue in the kernel, as from many clients."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        started.set()
        begin = time.monotonic()
        for i in range(REQUESTS):
            time.sleep(max(0.0, begin + i / RATE - time.monotonic()))
            body = orjson.dumps({"events": [event(f"steady-{i}")]})
            head = f"POST {STREAM} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            sock.sendall(head.encode() + body)
        received = b""
        while received.count(b"HTTP/1.1 ") < REQUESTS:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    out.append(received)


def refused_by(times: list[float], limit: int) -> int:
    """How many requests a fixed-window limiter refuses when they arrive at `times`."""
    limiter = FixedWindowLimiter()
    return sum(not limiter.allow("k", limit, t) for t in sorted(times))


@pytest.mark.parametrize("faults", [Faults(), Faults(latency_s=0.001)], ids=["fast path", "aiohttp route"])
async def test_a_stall_of_the_emulators_loop_does_not_count_as_a_burst(faults: Faults):
    """A client at 18 requests/s against a limit of 20; the emulator's loop blocks for 300 ms. The requests
    that arrived meanwhile used to be stamped together when the loop came back: its window read more than
    the wire held (22 for 18), and its limiter refused requests of a client that behaved."""
    config = EmulatorConfig(stream_rps_limit=LIMIT, trust_arrival_header=True, faults=faults)
    async with Emulator(config, host="127.0.0.1", port=0) as emu, WireTap(emu.url, stamp=True) as tap:
        async with aiohttp.ClientSession() as http:
            token = await Api(http, emu).session()
        out: list[bytes] = []
        started = threading.Event()
        client = asyncio.create_task(asyncio.to_thread(steady_client, tap.url, token, out, started))
        await asyncio.to_thread(started.wait, 10)
        await asyncio.sleep(STALL_AFTER_S)
        stall_from = time.time()
        time.sleep(STALL_S)  # noqa: ASYNC251 - the point: the emulator's loop is blocked
        stall_to = time.time()
        await client
        stats = await emu.stats()
    answers = out[0]
    times = tap.arrivals().times()
    assert len(times) == REQUESTS == answers.count(b"HTTP/1.1 ")
    assert sum(stall_from <= t < stall_to for t in times) >= 2, "requests arrived during the stall"
    # The emulator saw what the wire held: the same window, and refusals only where the wire was over.
    assert stats["stream_max_requests_per_1s_window"] == tap.arrivals().max_in_window(), (stats, times)
    assert answers.count(b"HTTP/1.1 429") == refused_by(times, LIMIT) == stats["rate_limited"]


@pytest.mark.parametrize("faults", [Faults(), Faults(latency_s=0.001)], ids=["fast path", "aiohttp route"])
@pytest.mark.parametrize("trusted", [True, False])
async def test_the_header_counts_only_when_the_emulator_is_told_to_trust_it(clock: FakeClock, faults, trusted):
    config = EmulatorConfig(stream_rps_limit=1, trust_arrival_header=trusted, faults=faults)
    async with Emulator(config, clock=clock) as emu, aiohttp.ClientSession() as http:
        api = Api(http, emu)
        token = await api.session()
        earlier = clock.now - 2.5
        headers = {ARRIVAL_HEADER: f"{earlier:.9f}", "Authorization": f"Bearer {token}"}
        first = await api.call("POST", STREAM, key=None, json={"events": [event("h1")]}, headers=headers)
        second = await api.call("POST", STREAM, key=None, json={"events": [event("h2")]}, headers={**headers})
        third = await api.stream(token, [event("h3")])
        stats = await emu.stats()
    # Trusted: two requests stamped 2.5 s ago share their second (the second is refused), the third is alone.
    # Not trusted: all three arrive now, in one second: only the first is let through.
    assert [first[0], second[0], third[0]] == ([200, 429, 200] if trusted else [200, 429, 429])
    expected = {str(int(earlier)): 2, str(int(clock.now)): 1} if trusted else {str(int(clock.now)): 3}
    assert stats["stream_requests_per_second"] == expected
