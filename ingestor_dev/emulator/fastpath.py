"""The hot endpoint straight from the socket: plain `POST /v2/billing/meter_event_stream` requests.

Every connection starts on `StreamProtocol`, a small HTTP/1.1 reader. A complete request that is a
plain keep-alive stream request while no fault is set is served right here, synchronously, by the
same checks as the aiohttp route (`api_stream.admit` and `api_stream.ingest`), without aiohttp's
request, response, task and stream objects; the answers to the requests of one read (pipelining)
go out in one write. Anything else -- another route, any fault set, HTTP/1.0, a query string,
`Transfer-Encoding`, `Expect`, `Upgrade`, `Connection` other than `keep-alive`, a missing or
repeated `Content-Length`, a body over the cap (413), a long or unusual head -- hands the connection,
with every byte not yet answered, to aiohttp's protocol for good, which then serves it exactly as
before (faults, resets and refusals included).

Answers are byte for byte what aiohttp writes for the same responses (status line, any error
headers, `Content-Type`, `Content-Length`, `Date`, `Server`), and statistics are counted the same way
(sliding window, per-second counts, requests by route and status).
"""

from __future__ import annotations

import asyncio
import logging
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE

from ingestor_dev.emulator.api_stream import admit, ingest
from ingestor_dev.emulator.arrival import ARRIVAL_FIELD, arrival_time, is_loopback
from ingestor_dev.emulator.bodies import JSON, check_type
from ingestor_dev.emulator.errors import ApiError
from ingestor_dev.emulator.routes import STREAM_PATH
from ingestor_dev.emulator.stats import RESET

if TYPE_CHECKING:
    from collections.abc import Callable

    from ingestor_dev.emulator.context import Context

logger = logging.getLogger(__name__)

_REQUEST_LINE = b"POST " + STREAM_PATH.encode() + b" HTTP/1.1\r\n"
#: the header lines after the request line: tokens, a colon, visible ASCII, spaces and tabs only
_HEADERS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e]*\r\n)*")
_END = b"\r\n\r\n"
#: an idle connection is closed after this long, as aiohttp's server does (its default keep-alive timeout)
KEEPALIVE_TIMEOUT_S = 75.0
#: a longer head goes to aiohttp, whose own limits (8190 bytes a line) then apply
MAX_HEAD = 8190
#: headers that change how the request is framed or answered: aiohttp's business
_HAND_OVER = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer", b"keep-alive"))
_WHITESPACE = b" \t"
#: the headers the fast path reads (the first of each counts, as in aiohttp's `headers.get`) ...
_WANTED = frozenset((b"content-length", b"authorization", b"content-type", b"connection", ARRIVAL_FIELD))
#: ... and those that must not be repeated
_UNIQUE = frozenset((b"content-length", b"connection"))
_UNKNOWN_ERROR = ApiError(500, None, "An unknown error occurred.", type="api_error")


class StreamProtocol(asyncio.Protocol):
    """One connection: serves plain stream requests, hands the connection to aiohttp on anything else."""

    __slots__ = (
        "_buffer",
        "_fast",
        "_idle_timer",
        "_last_read",
        "_loop",
        "_need",
        "_read_paused",
        "_transport",
        "_trusted",
        "_write_paused",
    )

    def __init__(self, fast: FastPath) -> None:
        self._fast = fast
        self._transport: asyncio.Transport | None = None
        #: bytes received and not yet answered, from the start of a request
        self._buffer = b""
        #: the size of the request being received (head and body), once its head is complete
        self._need = 0
        self._write_paused = False
        self._read_paused = False
        self._loop = asyncio.get_running_loop()
        self._last_read = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        #: whether this connection's `Wiretap-Arrival` headers are believed (see `arrival`)
        self._trusted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        if self._fast.ctx.config.trust_arrival_header:
            self._trusted = is_loopback(transport.get_extra_info("peername"))
        self._fast.connections.add(self)
        self._idle_timer = self._loop.call_later(KEEPALIVE_TIMEOUT_S, self._close_if_idle)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - the protocol's signature
        self._fast.connections.discard(self)
        self._transport = None
        self._stop_idle_timer()

    def _close_if_idle(self) -> None:
        """Close a connection idle for `KEEPALIVE_TIMEOUT_S` between requests (checked lazily)."""
        self._idle_timer = None
        if self._transport is None:
            return
        idle = self._loop.time() - self._last_read
        if idle >= KEEPALIVE_TIMEOUT_S and not self._buffer:
            self._transport.close()
            return
        delay = KEEPALIVE_TIMEOUT_S - idle if idle < KEEPALIVE_TIMEOUT_S else KEEPALIVE_TIMEOUT_S
        self._idle_timer = self._loop.call_later(delay, self._close_if_idle)

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._transport is not None and not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        if self._buffer:
            data = self._buffer + data
            if len(data) < self._need:  # the rest of a request's body is still on its way
                self._buffer = data
                return
        answers: list[bytes] = []
        start = 0
        size = len(data)
        while start < size:
            end = data.find(_END, start, start + MAX_HEAD + 4)
            if end < 0:
                if size - start > MAX_HEAD:
                    break  # a head this long is aiohttp's to judge
                self._buffer = data[start:] if start else data
                self._need = 0
                self._flush(answers)
                return
            head = self._head(data, start, end)
            if head is None:
                break
            length, authorization, content_type, arrival = head
            body_start = end + 4
            body_end = body_start + length
            if body_end > size:
                self._buffer = data[start:] if start else data
                self._need = body_end - start
                self._flush(answers)
                return
            if self._fast.ctx.planner.active:
                break  # faults are applied by the aiohttp route
            stamp = arrival if self._trusted else None
            answers.append(
                self._fast.serve(authorization, content_type, data[body_start:body_end], self._transport, stamp)
            )
            start = body_end
        else:
            self._buffer = b""
            self._need = 0
            self._flush(answers)
            return
        self._flush(answers)
        self._hand_over(data[start:] if start else data)

    def _head(self, data: bytes, start: int, end: int) -> tuple[int, str | None, str, bytes | None] | None:
        """(Content-Length, Authorization, Content-Type, Wiretap-Arrival) of a plain stream request's head,
        else None."""
        if not data.startswith(_REQUEST_LINE, start):
            return None
        first = start + len(_REQUEST_LINE)
        if _HEADERS.fullmatch(data, first, end + 2) is None:
            return None
        fields = _fields(data[first:end])
        if fields is None:
            return None
        length = fields.get(b"content-length", b"")
        connection = fields.get(b"connection", b"keep-alive")
        if not length.isdigit() or int(length) > self._fast.ctx.config.max_body_bytes:
            return None  # none (or not a number), or a body over the cap (aiohttp answers 413)
        if connection.lower() != b"keep-alive":
            return None
        authorization = fields.get(b"authorization")
        content_type = fields.get(b"content-type", b"")
        return (
            int(length),
            None if authorization is None else authorization.decode(),
            content_type.decode(),
            fields.get(ARRIVAL_FIELD),
        )

    def _flush(self, answers: list[bytes]) -> None:
        if answers and self._transport is not None:
            self._transport.write(answers[0] if len(answers) == 1 else b"".join(answers))

    def _hand_over(self, unanswered: bytes) -> None:
        """Give the connection, and the bytes not yet answered, to aiohttp's protocol for good."""
        transport = self._transport
        self._fast.connections.discard(self)
        self._stop_idle_timer()
        self._buffer = b""
        self._transport = None
        if transport is None or transport.is_closing():
            return
        protocol = self._fast.aiohttp_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._write_paused:
            protocol.pause_writing()
        if self._read_paused:
            transport.resume_reading()
        protocol.data_received(unanswered)


class FastPath:
    """What the connections share: the handler context, aiohttp's protocol factory, the answers."""

    def __init__(self, ctx: Context, aiohttp_protocol: Callable[[], Any]) -> None:
        self.ctx = ctx
        self.aiohttp_protocol = aiohttp_protocol
        self.connections: set[StreamProtocol] = set()
        self._date = ""
        self._ok = b""

    def __call__(self) -> StreamProtocol:
        return StreamProtocol(self)

    def close(self) -> None:
        for connection in list(self.connections):
            connection.close()

    def serve(
        self, authorization: str | None, content_type: str, body: bytes, transport: Any, arrival: bytes | None = None
    ) -> bytes:
        """One stream request, as the aiohttp route serves it when no fault is set: the answer's bytes.

        ``arrival``: a trusted `Wiretap-Arrival` value (see `arrival`)."""
        ctx = self.ctx
        stats = ctx.state.stats
        now = ctx.clock() if arrival is None else arrival_time(arrival, ctx.clock())
        stats.stream_window.add(now)
        try:
            livemode = admit(ctx, authorization, now)
            check_type(content_type, JSON, body)
            ingest(ctx, livemode, body, now)
        except ApiError as error:
            status, answer = error.status, self._error(error)
        except Exception:
            logger.exception("emulator: unexpected error handling POST %s", STREAM_PATH)
            status, answer = 500, self._error(_UNKNOWN_ERROR)
        else:
            status, answer = 200, self._answer_ok()
        stats.count_request(STREAM_PATH, RESET if transport is None or transport.is_closing() else status)
        return answer

    def _answer_ok(self) -> bytes:
        date = rfc822_formatted_time()
        if date != self._date:
            self._date = date
            self._ok = _answer(200, {}, b"{}", date)
        return self._ok

    @staticmethod
    def _error(error: ApiError) -> bytes:
        return _answer(error.status, error.headers, orjson.dumps(error.body()), rfc822_formatted_time())


def _fields(block: bytes) -> dict[bytes, bytes] | None:
    """The wanted headers' values (lower-case names, stripped values); None when the request is not plain."""
    fields: dict[bytes, bytes] = {}
    for line in block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in _WANTED:
            if name in fields:
                if name in _UNIQUE:
                    return None
                continue
            fields[name] = value.strip(_WHITESPACE)
        elif name in _HAND_OVER:
            return None
    return fields


def _answer(status: int, headers: dict[str, str], body: bytes, date: str) -> bytes:
    """A response as aiohttp writes `responses.json_response(...)` (the same headers, in its order)."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    lines.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    lines.append(f"Date: {date}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n")
    return "".join(lines).encode() + body
