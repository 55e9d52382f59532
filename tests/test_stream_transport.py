"""The stream request's own HTTP/1.1 client (`Http1Transport`) over real sockets on 127.0.0.1.

The answers come from a raw server that writes scripted bytes, so framing (length, chunks, read until
close), interim answers, compression, broken and missing answers can all be written exactly. The
main property is differential: for every answer, `StreamClient` classifies it the same through
`Http1Transport` as through aiohttp's client (`AiohttpTransport`), the reference; then keep-alive
reuse, reconnects, the pool's limit, the deadline and TLS verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ssl
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestor.stream_client import STREAM_PATH, Answer, Outcome, StreamClient
from ingestor.stream_transport import BadHttpAnswerError, Http1Transport, ServerDisconnectedError
from ingestor.stripe_http import AiohttpTransport, StripeHttp, Transport
from ingestor_dev.devkafka import TlsMaterial

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

BODY = b'{"events": [{"event_name": "e", "payload": {"stripe_customer_id": "cus_1", "value": "1"}}]}'
VERSION = "2026-06-24.dahlia"
TOKEN = "ek_test_transport"
HEAD_END = b"\r\n\r\n"


@dataclass
class RawServer:
    """Answers each request on a connection with the next of `script(request number)`'s bytes.

    `None` from the script means: say nothing (the client's deadline decides); `b""`: close at once.
    After writing an answer the server closes the connection when `close_after` says so.
    """

    script: Callable[[int], bytes | None]
    close_after: Callable[[int], bool] = lambda _: False
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    delay: float = 0.0
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(HEAD_END)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                number = len(self.requests)
                if self.delay:
                    await asyncio.sleep(self.delay)
                answer = self.script(number)
                if answer is None:
                    await reader.read()  # until the client gives up and closes
                    return
                writer.write(answer)
                await writer.drain()
                if answer == b"" or self.close_after(number):
                    return
        finally:
            self.open_now -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.closed.set()


@contextlib.asynccontextmanager
async def raw_server(server: RawServer, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        listener.close()
        await listener.wait_closed()


def response(status: int, headers: list[tuple[str, str]], body: bytes, framing: str = "length") -> bytes:
    """An HTTP/1.1 answer, framed by Content-Length, by chunks (one per 7 bytes), or by closing."""
    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers)]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    else:  # "close": the body ends with the connection
        lines.append("Connection: close")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, "type": "invalid_request_error"}})


def stream(transport: Transport, base: str, *, timeout: float = 2.0) -> StreamClient:
    """The stream client as the worker builds it, over `transport`."""
    return StreamClient(StripeHttp(transport, base, stripe_version=VERSION, timeout=timeout))


async def send_with(make: Callable[[], object], base: str) -> Answer:
    transport = make()
    client = stream(transport, base)  # type: ignore[arg-type]
    try:
        return await client.send(BODY, TOKEN)
    finally:
        if isinstance(transport, Http1Transport):
            await transport.close()


async def both(server: RawServer) -> tuple[Answer, Answer]:
    """The answer through aiohttp's client and through `Http1Transport`, each on a fresh connection."""
    async with raw_server(server) as base, aiohttp.ClientSession() as http:
        reference = await send_with(lambda: AiohttpTransport(http), base)
        lean = await send_with(lambda: Http1Transport(4), base)
    return reference, lean


def same(reference: Answer, lean: Answer) -> None:
    if reference.code == "connection_error":  # the message names the exception class, which differs
        assert (lean.outcome, lean.status, lean.code) == (reference.outcome, reference.status, reference.code)
    else:
        assert lean == reference


OK = b"{}"
REJECTED = error_body("invalid_request", "events[17].payload.value: not a number")
CASES = {
    "200 {} by length": response(200, [("Content-Type", "application/json")], OK),
    "200 {} chunked": response(200, [], OK, "chunked"),
    "200 {} until close": response(200, [], OK, "close"),
    "200 { } spaced": response(200, [], b" { } "),
    "200 {} gzip": response(200, [("Content-Encoding", "gzip")], gzip.compress(OK)),
    "200 {} deflate": response(200, [("Content-Encoding", "deflate")], zlib.compress(OK)),
    "100 then 200 {}": b"HTTP/1.1 100 Continue\r\n\r\n" + response(200, [], OK),
    "200 html": response(200, [("Content-Type", "text/html")], b"<html>proxy</html>"),
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "302": response(302, [("Location", "/landing")], b""),
    "400 rejected": response(400, [], REJECTED),
    "400 rejected, chunked": response(400, [], REJECTED, "chunked"),
    "400 should retry": response(400, [("stripe-should-retry", "TRUE")], REJECTED),
    "400 should retry, spaces around the value": response(400, [("Stripe-Should-Retry", " true ")], REJECTED),
    "429 reason, a tab after the value": response(429, [("Stripe-Rate-Limited-Reason", "global-rate\t")], OK),
    "401": response(401, [], error_body("billing_meter_event_session_expired", "expired")),
    "413": response(413, [], b"too large"),
    "429": response(429, [("Stripe-Rate-Limited-Reason", "global-rate")], error_body("rate_limit", "slow")),
    "503 until close": response(503, [("Stripe-Should-Retry", "true")], b"not json", "close"),
    "HTTP/1.0 200 {}": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    "closed before answering": b"",
    "not HTTP": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "truncated body": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",
}


@pytest.mark.parametrize("name", list(CASES))
async def test_every_answer_is_classified_as_through_aiohttp(name: str) -> None:
    reference, lean = await both(RawServer(lambda _: CASES[name], close_after=lambda _: True))
    same(reference, lean)


@pytest.mark.parametrize(
    ("name", "outcome"),
    [("200 {} chunked", Outcome.ACCEPTED), ("302", Outcome.UNEXPECTED), ("truncated body", Outcome.RETRY)],
)
async def test_the_reference_cases_mean_what_they_say(name: str, outcome: Outcome) -> None:
    _, lean = await both(RawServer(lambda _: CASES[name], close_after=lambda _: True))
    assert lean.outcome is outcome


STATUSES = st.sampled_from([200, 201, 202, 204, 301, 307, 400, 401, 403, 404, 409, 413, 429, 500, 502, 503])
HEADER_VALUES = st.sampled_from(["true", "false", "TRUE", " true ", ""])
BODIES = st.one_of(
    st.sampled_from([OK, b"{ }", b"[]", b"", REJECTED, b"null", b'{"a":1}']),
    st.builds(error_body, st.text(max_size=20), st.text(max_size=60)),
    st.binary(max_size=80),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    status=STATUSES,
    retry=st.none() | HEADER_VALUES,
    reason=st.none() | st.sampled_from(["global-rate", "meter-event-stream-rate"]),
    body=BODIES,
    framing=st.sampled_from(["length", "chunked", "close"]),
)
async def test_any_answer_is_classified_as_through_aiohttp(
    status: int, retry: str | None, reason: str | None, body: bytes, framing: str
) -> None:
    headers = [("Content-Type", "application/json")]
    headers += [("Stripe-Should-Retry", retry)] if retry is not None else []
    headers += [("Stripe-Rate-Limited-Reason", reason)] if reason is not None else []
    no_body = status in (204, 304)
    raw = f"HTTP/1.1 {status} X\r\n\r\n".encode() if no_body else response(status, headers, body, framing)
    reference, lean = await both(RawServer(lambda _: raw, close_after=lambda _: True))
    same(reference, lean)


async def test_the_request_carries_the_headers_and_the_body_unchanged() -> None:
    server = RawServer(lambda _: response(200, [], OK))
    async with raw_server(server) as base:
        transport = Http1Transport(4)
        answer = await stream(transport, base).send(BODY, TOKEN)
        await transport.close()
    assert answer.outcome is Outcome.ACCEPTED
    head, body = server.requests[0].split(HEAD_END, 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == f"POST {STREAM_PATH} HTTP/1.1"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["Host"] == base.removeprefix("http://")
    assert fields["Authorization"] == f"Bearer {TOKEN}"
    assert fields["Content-Type"] == "application/json"
    assert fields["Stripe-Version"] == VERSION
    assert fields["Content-Length"] == str(len(BODY))
    assert body == BODY


@pytest.mark.parametrize("value", ["a\r\nHost: evil", "a\nb", "a\x00b", "a\x7fb"])
async def test_a_control_character_in_a_header_is_refused_as_aiohttp_refuses_it(value: str) -> None:
    server = RawServer(lambda _: response(200, [], OK))
    async with raw_server(server) as base, aiohttp.ClientSession() as http:
        lean = Http1Transport(4)
        for transport in (AiohttpTransport(http), lean):
            with pytest.raises(ValueError, match="Forbidden control character"):
                await transport.request("POST", base + STREAM_PATH, {"X-Injected": value}, BODY, 2.0)
        await lean.close()
    assert server.requests == []


async def test_keep_alive_reuses_one_connection() -> None:
    server = RawServer(lambda _: response(200, [], OK))
    async with raw_server(server) as base:
        transport = Http1Transport(4)
        client = stream(transport, base)
        answers = [await client.send(BODY, TOKEN) for _ in range(5)]
        await transport.close()
    assert {a.outcome for a in answers} == {Outcome.ACCEPTED}
    assert server.connections == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_connection_close_is_honoured_and_the_next_request_reconnects(framing: str) -> None:
    answer = response(200, [("Connection", "close")], OK, framing)
    server = RawServer(lambda _: answer)  # the server waits for the client to close
    async with raw_server(server) as base:
        transport = Http1Transport(4)
        client = stream(transport, base)
        answers = [await client.send(BODY, TOKEN) for _ in range(3)]
        await transport.close()
    assert {a.outcome for a in answers} == {Outcome.ACCEPTED}
    assert server.connections == 3


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    server = RawServer(lambda _: response(200, [], OK), close_after=lambda n: n == 1)
    async with raw_server(server) as base:
        transport = Http1Transport(4)
        client = stream(transport, base)
        first = await client.send(BODY, TOKEN)
        await asyncio.wait_for(server.closed.wait(), 10)
        for _ in range(100):  # until the client has seen the close (bounded)
            if not any(not c.closed for pool in transport._idle.values() for c in pool):
                break
            await asyncio.sleep(0.01)
        second = await client.send(BODY, TOKEN)
        await transport.close()
    assert (first.outcome, second.outcome) == (Outcome.ACCEPTED, Outcome.ACCEPTED)
    assert server.connections == 2


async def test_at_most_limit_connections_are_open_and_every_request_is_answered() -> None:
    server = RawServer(lambda _: response(200, [], OK), delay=0.02)
    async with raw_server(server) as base:
        transport = Http1Transport(2)
        client = stream(transport, base)
        answers = await asyncio.gather(*(client.send(BODY, TOKEN) for _ in range(8)))
        await transport.close()
    assert {a.outcome for a in answers} == {Outcome.ACCEPTED}
    assert server.most_open == 2
    assert server.connections == 2
    assert len(server.requests) == 8


async def test_no_answer_is_a_timeout_and_the_connection_is_not_reused() -> None:
    server = RawServer(lambda n: None if n == 1 else response(200, [], OK))
    async with raw_server(server) as base:
        transport = Http1Transport(4)
        client = stream(transport, base, timeout=0.3)
        first = await client.send(BODY, TOKEN)
        second = await client.send(BODY, TOKEN)
        await transport.close()
    assert (first.outcome, first.code) == (Outcome.RETRY, "timeout")
    assert second.outcome is Outcome.ACCEPTED
    assert server.connections == 2


async def test_a_refused_connection_is_an_os_error() -> None:
    async with raw_server(RawServer(lambda _: b"")) as base:
        pass  # closed: nothing listens on the port any more
    transport = Http1Transport(4)
    with pytest.raises(OSError):
        await transport.request("POST", base + STREAM_PATH, {}, BODY, 2.0)
    answer = await stream(transport, base).send(BODY, TOKEN)
    assert (answer.outcome, answer.code) == (Outcome.RETRY, "connection_error")


async def test_a_missing_and_a_broken_answer_raise_connection_errors() -> None:
    for raw, error in ((b"", ServerDisconnectedError), (b"garbage\r\n\r\n", BadHttpAnswerError)):
        async with raw_server(RawServer(lambda _, raw=raw: raw, close_after=lambda _: True)) as base:
            transport = Http1Transport(4)
            with pytest.raises(error):
                await transport.request("POST", base + STREAM_PATH, {}, BODY, 2.0)
            await transport.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return TlsMaterial.generate(tmp_path_factory.mktemp("tls"))


def server_context(keystore: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(keystore)
    return context


async def test_tls_is_verified_against_the_trusted_cas(tls: TlsMaterial) -> None:
    trusted = ssl.create_default_context(cafile=str(tls.ca_file))
    server = RawServer(lambda _: response(200, [], OK))
    async with raw_server(server, server_context(tls.broker_keystore)) as base:
        transport = Http1Transport(4, ssl_context=trusted)
        client = stream(transport, base)
        answers = [await client.send(BODY, TOKEN) for _ in range(3)]
        await transport.close()
    assert {a.outcome for a in answers} == {Outcome.ACCEPTED}
    assert server.connections == 1
    assert server.requests[0].endswith(BODY)


@pytest.mark.parametrize("case", ["unknown CA (default context)", "wrong host name"])
async def test_a_certificate_that_does_not_verify_is_a_connection_error_as_through_aiohttp(
    tls: TlsMaterial, case: str
) -> None:
    if case == "wrong host name":
        keystore, client_context = tls.wrong_host_keystore, ssl.create_default_context(cafile=str(tls.ca_file))
    else:
        keystore, client_context = tls.broker_keystore, None
    server = RawServer(lambda _: response(200, [], OK))
    async with raw_server(server, server_context(keystore)) as base, aiohttp.ClientSession() as http:
        transport = Http1Transport(4, ssl_context=client_context)
        with pytest.raises(ssl.SSLCertVerificationError):
            await transport.request("POST", base + STREAM_PATH, {}, BODY, 2.0)
        lean = await stream(transport, base).send(BODY, TOKEN)
        await transport.close()
        if client_context is None:  # aiohttp verifies against the same default store
            reference = await stream(AiohttpTransport(http), base).send(BODY, TOKEN)
            same(reference, lean)
    assert (lean.outcome, lean.code) == (Outcome.RETRY, "connection_error")
    assert server.requests == []


@pytest.mark.parametrize("first", [200, 400, 401])
async def test_a_reused_connection_closed_without_an_answer_is_a_disconnect_not_the_last_answer_again(
    first: int,
) -> None:
    # The kept-alive connection's server closes it right after our second request (an idle-timeout race):
    # nothing was answered, so it is a connection error (retried), never the first answer's status again
    # (a 400 would have split the batch and dead-lettered events Stripe never saw).
    answer = response(first, [], OK if first == 200 else error_body("x", "first answer"))
    server = RawServer(lambda n: answer if n == 1 else b"")
    async with raw_server(server) as base:
        transport = Http1Transport(4)
        client = stream(transport, base)
        got_first = await client.send(BODY, TOKEN)
        with pytest.raises(ServerDisconnectedError):
            await transport.request("POST", base + STREAM_PATH, {}, BODY, 2.0)
        await transport.close()
    assert got_first.status == first
    assert server.connections == 1  # the second request went out on the reused connection


async def test_waiting_for_a_free_connection_counts_against_the_deadline_and_nothing_is_sent_late() -> None:
    # One connection, held 0.6 s by the first request: a second request with a 0.3 s deadline times out
    # while it waits, and is never written to the wire after its deadline.
    server = RawServer(lambda _: response(200, [], OK), delay=0.6)
    async with raw_server(server) as base:
        transport = Http1Transport(1)
        first = asyncio.create_task(transport.request("POST", base + STREAM_PATH, {}, BODY, 5.0))
        await asyncio.sleep(0.05)  # the first holds the only connection
        with pytest.raises(TimeoutError):
            await transport.request("POST", base + STREAM_PATH, {}, BODY, 0.3)
        status, _, _ = await first
        await asyncio.sleep(0.7)  # a late send would reach the server by now
        await transport.close()
    assert status == 200
    assert len(server.requests) == 1
