"""The wire tap: framing by Content-Length across reads, pipelining, kernel receive times, the process."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import orjson
import pytest
from aiohttp import web

from ingestor_dev.wiretap import (
    ARRIVAL_HEADER,
    SO_TIMESTAMPNS,
    STREAM_PATH,
    Arrival,
    Arrivals,
    FramingError,
    RequestFramer,
    WireTap,
    kernel_time_ns,
    max_in_window,
)


def post(body: bytes, path: str = STREAM_PATH, *, extra: bytes = b"") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return head.encode() + extra + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


GET = b"GET /v1/billing/meters?limit=3 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def body(n: int) -> bytes:
    return orjson.dumps({"events": [{"identifier": f"id-{n}-{i}", "pad": "x" * 50} for i in range(5)]})


def test_a_request_split_at_every_byte_is_framed_once_and_whole():
    wire = post(body(1)) + GET + post(body(2), "/v2/billing/meter_event_session")
    for cut in range(1, len(wire)):
        framer = RequestFramer()
        done = framer.feed(wire[:cut]) + framer.feed(wire[cut:])
        assert [(r.method, r.path) for r in done] == [
            ("POST", STREAM_PATH),
            ("GET", "/v1/billing/meters"),
            ("POST", "/v2/billing/meter_event_session"),
        ]
        assert b"".join(r.head + r.body for r in done) == wire
        assert framer.pending == 0


def test_a_body_that_holds_the_blank_line_and_the_request_line_is_not_a_request():
    """A naive search for `POST /v2/...` or a blank line would count the body's text as requests."""
    sneaky = post(b'{"x": "\r\n\r\nPOST /v2/billing/meter_event_stream HTTP/1.1\r\n\r\n"}')
    framer = RequestFramer()
    done = [r for i in range(0, len(sneaky), 7) for r in framer.feed(sneaky[i : i + 7])]
    assert len(done) == 1
    assert done[0].head + done[0].body == sneaky


def test_pipelined_requests_are_read_one_at_a_time():
    """`take` ends each read where a request ends, so no read carries the kernel time of two."""
    first, second, third = post(body(1)), post(body(2)), GET
    waiting = first + second + third
    framer = RequestFramer()
    sizes = []
    while waiting:
        n = framer.take(waiting)
        sizes.append(n)
        assert len(framer.feed(waiting[:n])) == 1
        waiting = waiting[n:]
    assert sizes == [len(first), len(second), len(third)]


def test_take_reads_an_incomplete_head_whole_and_then_the_rest_of_its_request():
    request = post(body(3))
    framer = RequestFramer()
    assert framer.take(request[:10]) == 10
    assert framer.feed(request[:10]) == []
    rest = request[10:] + GET
    assert framer.take(rest) == len(request) - 10
    assert len(framer.feed(rest[: len(request) - 10])) == 1


def test_unframable_requests_raise_with_the_bytes_to_copy_as_they_are():
    chunked = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    framer = RequestFramer()
    with pytest.raises(FramingError) as caught:
        framer.feed(GET + chunked)
    assert [r.path for r in caught.value.done] == ["/v1/billing/meters"]
    assert caught.value.rest == chunked
    for bad in (post(b"{}", extra=b"Content-Length: 7\r\n"), b"POST /x HTTP/1.1\r\nContent-Length: x\r\n\r\n"):
        with pytest.raises(FramingError):
            RequestFramer().feed(bad)


def test_a_stamped_request_carries_the_arrival_as_its_last_header():
    request = RequestFramer().feed(post(b"{}"))[0]
    stamped = request.stamped(1_764_500_000_123_456_789)
    assert stamped.endswith(f"{ARRIVAL_HEADER}: 1764500000.123456789\r\n\r\n{{}}".encode())
    assert RequestFramer().feed(stamped)[0].body == b"{}"


def test_the_window_figures():
    arrivals = Arrivals(
        [Arrival(t, 0.0, "POST", STREAM_PATH) for t in (10.0, 10.5, 10.99, 11.0, 11.2)]
        + [Arrival(10.1, 0.0, "GET", "/v1/billing/meters")]
    )
    assert arrivals.count() == 5
    assert arrivals.max_in_window() == 4  # [10.5, 11.5); [10.0, 11.0) holds three
    assert arrivals.per_second() == {10: 3, 11: 2}
    assert max_in_window([1.0, 1.5, 2.0, 2.0]) == 3


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def test_the_kernel_stamps_a_segment_when_it_arrives_not_when_it_is_read():
    client, server = tcp_pair()
    with client, server:
        server.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        before = time.time_ns()
        client.sendall(post(b"{}"))
        time.sleep(0.2)  # the reader is late
        read_at = time.time_ns()
        _, ancillary, _, _ = server.recvmsg(4096, socket.CMSG_SPACE(16))
    stamp = kernel_time_ns(ancillary)
    assert stamp is not None
    assert before <= stamp < read_at
    assert read_at - stamp >= 200_000_000


class Upstream:
    """An aiohttp server that records what reached it and can block its own loop."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, request.headers.get(ARRIVAL_HEADER), await request.read()))
        return web.json_response({"n": len(self.seen)})


@contextlib.asynccontextmanager
async def upstream_server(upstream: Upstream):  # type: ignore[no-untyped-def]
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def exchange(url: str, wire: bytes, answers: int) -> bytes:
    """Send raw bytes on one connection; read until `answers` HTTP answers came back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(wire)
        received = b""
        while received.count(b"HTTP/1.1 ") < answers or not received.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


async def test_the_tap_process_counts_pipelined_and_keep_alive_requests_and_stamps_them():
    upstream = Upstream()
    async with upstream_server(upstream) as url, WireTap(url, stamp=True) as tap:
        sent_at = time.time()
        wire = post(body(1)) + GET + post(body(2))  # pipelined on one connection
        answers = await asyncio.to_thread(exchange, tap.url, wire, 3)
        assert answers.count(b"HTTP/1.1 200 OK") == 3
        answers = await asyncio.to_thread(exchange, tap.url, post(body(3)), 1)
        assert b'{"n": 4}' in answers
        for _ in range(100):  # the record is written before the request is passed on: at most a moment
            if tap.arrivals().count() == 3:
                break
            await asyncio.sleep(0.05)
    arrivals = tap.arrivals()
    assert arrivals.count() == 3
    assert len(arrivals.all) == 4
    assert arrivals.unframed == 0
    assert all(sent_at <= a.at <= a.at + a.lag for a in arrivals.all)
    # Each request reached the upstream whole, with its kernel arrival time.
    assert [path for path, _, _ in upstream.seen] == [STREAM_PATH, "/v1/billing/meters", STREAM_PATH, STREAM_PATH]
    assert [payload for _, _, payload in upstream.seen if payload] == [body(1), body(2), body(3)]
    stamps = sorted(float(stamp or 0) for _, stamp, _ in upstream.seen)
    assert stamps == pytest.approx(sorted(a.at for a in arrivals.all), abs=1e-6)


async def test_an_unframable_request_is_still_passed_on_and_counted_as_such():
    upstream = Upstream()
    chunked = b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    async with upstream_server(upstream) as url, WireTap(url) as tap:
        answers = await asyncio.to_thread(exchange, tap.url, GET + chunked, 2)
    assert answers.count(b"HTTP/1.1 200 OK") == 2
    assert [(path, payload) for path, _, payload in upstream.seen] == [("/v1/billing/meters", b""), ("/chunked", b"{}")]
    assert tap.arrivals().unframed == 1
    assert tap.arrivals().count() == 0
