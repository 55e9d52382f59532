"""The stream fast path (`fastpath.StreamProtocol`): the same answers and statistics as the aiohttp
route, byte for byte; pipelining, split reads and the hand-over of a connection to aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import orjson
import pytest

from ingestor_dev.emulator import Emulator, EmulatorConfig, fastpath
from tests.emulator.conftest import LIVE_KEY, STREAM, TEST_KEY, Api, FakeClock, event

pytestmark = pytest.mark.asyncio(loop_scope="function")

#: a query string sends a stream request down the aiohttp route (the fast path takes the bare path only)
VIA_AIOHTTP = "?via=aiohttp"


def stream_request(
    token: str | None,
    body: bytes | None = None,
    *,
    events: list[dict[str, Any]] | None = None,
    query: str = "",
    content_type: str = "application/json",
    extra: str = "",
) -> bytes:
    if body is None:
        body = orjson.dumps({"events": events or [event("i1")]})
    head = f"POST {STREAM}{query} HTTP/1.1\r\nHost: emulator\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    head += f"Content-Type: {content_type}\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class Connection:
    """A raw keep-alive connection that reads whole responses (Content-Length bodies)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, emu: Emulator) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
        return cls(reader, writer)

    async def send(self, data: bytes, chunk: int = 0) -> None:
        if not chunk:
            self.writer.write(data)
            await self.writer.drain()
            return
        for start in range(0, len(data), chunk):
            self.writer.write(data[start : start + chunk])
            await self.writer.drain()
            await asyncio.sleep(0)

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if line)
        body = await asyncio.wait_for(self.reader.readexactly(int(headers["Content-Length"])), 5)
        return int(lines[0].split()[1]), headers, head + body

    async def exchange(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        await self.send(data)
        return await self.response()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def without_date(raw: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"", raw)


async def _answers(emu: Emulator, requests: list[bytes]) -> tuple[list[bytes], int]:
    """The answers (without `Date`), and how many connections the fast path still serves."""
    connection = await Connection.open(emu)
    try:
        answers = [without_date((await connection.exchange(request))[2]) for request in requests]
        return answers, len(emu.fast_path.connections)
    finally:
        await connection.close()


def _scenarios(token: str) -> dict[str, list[bytes]]:
    return {
        "ok": [stream_request(token, events=[event("a"), event("b", value="0"), event("a")])],
        "no token": [stream_request(None)],
        "unknown token": [stream_request("ek_test_nope")],
        "basic auth": [stream_request(None, extra=f"Authorization: Basic {token}\r\n")],
        "bad json": [stream_request(token, b"{not json")],
        "not an object": [stream_request(token, b"[1]")],
        "empty body": [stream_request(token, b"")],
        "offending event": [stream_request(token, events=[event("x"), {"event_name": "api_call", "payload": 5}])],
        "missing events": [stream_request(token, b'{"evts": []}')],
        "wrong content type": [stream_request(token, content_type="text/plain")],
        "json with charset": [stream_request(token, content_type="application/json; charset=utf-8")],
        "rate limited": [stream_request(token, events=[event("r1")]), stream_request(token, events=[event("r2")])],
    }


@pytest.mark.parametrize("key", [TEST_KEY, LIVE_KEY])
@pytest.mark.parametrize("scenario", list(_scenarios("")))
async def test_fast_path_answers_and_counts_like_the_aiohttp_route(scenario: str, key: str):
    results = []
    for query in ("", VIA_AIOHTTP):
        clock = FakeClock(1_800_000_000.0)
        async with Emulator(EmulatorConfig(stream_rps_limit=1), clock=clock) as emu:
            await _meter(emu, key)
            token = await _session(emu, key)
            requests = [
                request.replace(STREAM.encode(), (STREAM + query).encode(), 1)
                for request in _scenarios(token)[scenario]
            ]
            answers, on_fast_path = await _answers(emu, requests)
            results.append((answers, await emu.stats(), on_fast_path))
    (fast, fast_stats, fast_connections), (slow, slow_stats, slow_connections) = results
    assert (fast_connections, slow_connections) == (1, 0)
    assert fast == slow
    assert fast_stats == slow_stats


async def test_pipelined_requests_keep_their_order_across_the_hand_over(api: Api):
    await api.meter()
    token = await api.session()
    stats = b"GET /_emulator/stats HTTP/1.1\r\nHost: emulator\r\n\r\n"
    pipelined = [
        stream_request(token, events=[event("p1")]),
        stream_request(token, events=[event("p2")]),
        stats,
        stream_request(token, events=[event("p3")]),
        stream_request(token, events=[event("p4")]),
    ]
    connection = await Connection.open(api.emu)
    await connection.send(b"".join(pipelined))
    answers = [await connection.response() for _ in pipelined]
    await connection.close()
    assert [status for status, _, _ in answers] == [200] * 5
    assert answers[0][2].endswith(b"\r\n\r\n{}")
    counted = orjson.loads(answers[2][2].partition(b"\r\n\r\n")[2])
    assert counted["requests"][STREAM] == {"200": 2}
    final = await api.emu.stats()
    assert final["requests"][STREAM] == {"200": 4}
    assert final["events_accepted"] == 4


@pytest.mark.parametrize("chunk", [1, 7, 100, 1000])
async def test_a_request_split_across_reads(api: Api, chunk: int):
    await api.meter()
    token = await api.session()
    connection = await Connection.open(api.emu)
    for round_ in range(2):
        request = stream_request(token, events=[event(f"s{round_}-{i}") for i in range(20)])
        await connection.send(request, chunk=chunk)
        status, _, raw = await connection.response()
        assert (status, raw.endswith(b"{}")) == (200, True)
    await connection.close()
    assert (await api.emu.stats())["events_accepted"] == 40


async def test_a_body_over_the_cap_gets_413():
    async with Emulator(EmulatorConfig(stream_rps_limit=0, max_body_bytes=1000)) as emu:
        token = await _session(emu, TEST_KEY)
        connection = await Connection.open(emu)
        request = stream_request(token, events=[event(f"big{i}") for i in range(40)])
        status, _, raw = await connection.exchange(request)
        await connection.close()
    assert status == 413
    assert b'"code":"request_too_large"' in raw


async def test_faults_hand_the_connection_to_aiohttp(api: Api):
    await api.meter()
    token = await api.session()
    connection = await Connection.open(api.emu)
    assert (await connection.exchange(stream_request(token, events=[event("f1")])))[0] == 200
    api.emu.set_faults(error_retry_true=1.0)
    status, headers, _ = await connection.exchange(stream_request(token, events=[event("f2")]))
    assert (status, headers["Stripe-Should-Retry"]) == (500, "true")
    api.emu.set_faults()
    assert (await connection.exchange(stream_request(token, events=[event("f3")])))[0] == 200
    await connection.close()
    stats = await api.emu.stats()
    assert stats["requests"][STREAM] == {"200": 2, "500": 1}
    assert stats["faults_injected"] == 1


async def test_reset_fault_on_a_fast_connection(api: Api):
    token = await api.session()
    connection = await Connection.open(api.emu)
    assert (await connection.exchange(stream_request(token, events=[event("r0")])))[0] == 200
    api.emu.set_faults(reset_before=1.0)
    await connection.send(stream_request(token, events=[event("r1")]))
    assert await asyncio.wait_for(connection.reader.read(), 5) == b""
    await connection.close()
    assert (await api.emu.stats())["requests"][STREAM] == {"200": 1, "reset": 1}


@pytest.mark.parametrize(
    "extra",
    [
        "Connection: close\r\n",
        "Connection: keep-alive\r\n",
        "Expect: 100-continue\r\n",
        "X-Odd :spaced\r\n",
        "X-Utf8: caf\u00e9\r\n",
        "Content-Length: 3\r\n",
        f"X-Long: {'x' * 9000}\r\n",
    ],
)
async def test_unusual_heads_get_the_aiohttp_answer(extra: str):
    answers = []
    for query in ("", VIA_AIOHTTP):
        async with Emulator(EmulatorConfig(stream_rps_limit=0), clock=FakeClock(1_800_000_000.0)) as emu:
            token = await _session(emu, TEST_KEY)
            connection = await Connection.open(emu)
            request = stream_request(token, events=[event("u1")], query=query, extra=extra)
            await connection.send(request.replace(extra.encode(), extra.encode("utf-8")))
            answers.append(without_date(await _read_all(connection.reader)))
            on_fast_path = len(emu.fast_path.connections)
            await connection.close()
            answers.append(orjson.dumps(await emu.stats()))
            assert on_fast_path == (not query and extra == "Connection: keep-alive\r\n")
    assert answers[0] == answers[2]
    assert answers[1] == answers[3]


async def test_chunked_bodies_are_served_by_aiohttp(api: Api):
    token = await api.session()
    body = orjson.dumps({"events": [event("c1")]})
    head = (
        f"POST {STREAM} HTTP/1.1\r\nHost: emulator\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    connection = await Connection.open(api.emu)
    status, _, raw = await connection.exchange(head + chunked)
    await connection.close()
    assert (status, raw.endswith(b"{}")) == (200, True)
    assert api.emu.state.identifier_info("c1")["accepted"] == 1


async def test_idle_fast_connections_are_closed_like_aiohttp_does(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fastpath, "KEEPALIVE_TIMEOUT_S", 0.2)
    async with Emulator(EmulatorConfig(stream_rps_limit=0)) as emu:
        token = await _session(emu, TEST_KEY)
        connection = await Connection.open(emu)
        for _ in range(3):
            assert (await connection.exchange(stream_request(token)))[0] == 200
            await asyncio.sleep(0.1)
        assert len(emu.fast_path.connections) == 1
        assert await asyncio.wait_for(connection.reader.read(), 5) == b""
        await connection.close()


async def test_stop_closes_idle_fast_connections():
    async with Emulator(EmulatorConfig(stream_rps_limit=0)) as emu:
        token = await _session(emu, TEST_KEY)
        connection = await Connection.open(emu)
        assert (await connection.exchange(stream_request(token)))[0] == 200
    assert await asyncio.wait_for(connection.reader.read(), 5) == b""
    await connection.close()


async def test_the_fast_path_and_the_hand_over_on_uvloop():
    """The command-line emulator runs on uvloop, whose transports must switch protocols too."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[int]:
        async with Emulator(EmulatorConfig(stream_rps_limit=0)) as emu:
            await _meter(emu, TEST_KEY)
            token = await _session(emu, TEST_KEY)
            connection = await Connection.open(emu)
            requests = [
                stream_request(token, events=[event("v1")]),
                b"GET /_emulator/stats HTTP/1.1\r\nHost: emulator\r\n\r\n",
                stream_request(token, events=[event("v2")]),
            ]
            await connection.send(requests[0], chunk=500)
            statuses = [(await connection.response())[0]]
            await connection.send(b"".join(requests[1:]))
            statuses += [(await connection.response())[0] for _ in requests[1:]]
            await connection.close()
            statuses.append((await emu.stats())["events_valid"])
            return statuses

    def run() -> list[int]:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(scenario())

    assert await asyncio.to_thread(run) == [200, 200, 200, 2]


# -- helpers ----------------------------------------------------------------------------------------


async def _read_all(reader: asyncio.StreamReader, idle: float = 0.3) -> bytes:
    """Everything the server writes until it closes or stays quiet for `idle` seconds."""
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), idle):
            data += chunk
    return data


async def _call(emu: Emulator, request: bytes) -> dict[str, Any]:
    connection = await Connection.open(emu)
    try:
        status, _, raw = await connection.exchange(request)
    finally:
        await connection.close()
    assert status == 200, raw
    result: dict[str, Any] = orjson.loads(raw.partition(b"\r\n\r\n")[2])
    return result


async def _session(emu: Emulator, key: str) -> str:
    request = (
        f"POST /v2/billing/meter_event_session HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer {key}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    return str((await _call(emu, request))["authentication_token"])


async def _meter(emu: Emulator, key: str, name: str = "api_call") -> None:
    form = f"display_name={name}&event_name={name}&default_aggregation%5Bformula%5D=sum".encode()
    request = (
        f"POST /v1/billing/meters HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(form)}\r\n\r\n"
    ).encode()
    await _call(emu, request + form)
