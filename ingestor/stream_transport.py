"""A lean HTTP/1.1 keep-alive client for the one hot request: `POST /v2/billing/meter_event_stream`.

It implements `stripe_http.Transport` (one request: status, headers and body back) on asyncio
protocols, with `httptools` (the llhttp parser uvicorn uses) reading the answers. aiohttp's client
costs ≈ 75 µs per 100-event request in objects this request does not need (a request and response
object, a task-free stream reader, cookie jar, tracing signals, URL objects); this does the same
exchange in a fraction of it. aiohttp still serves everything else (sessions, catalog, adjustments).

What it does, as aiohttp's client does for this request:

- TLS for `https` with certificate and host name verification (`ssl.create_default_context()`).
- Keep-alive: a connection goes back to the pool after a complete answer unless the answer said
  `Connection: close` (or was HTTP/1.0 without keep-alive), was read until the connection closed, or
  anything arrived after it; idle connections are closed after `keepalive_s`. At most `limit` requests
  are in flight at once (the senders' concurrency); a request over the limit waits for a slot.
- Answers framed by `Content-Length`, chunked, or read until the server closes; `1xx` interim answers
  are skipped; `gzip`/`deflate` bodies are decompressed (aiohttp does that too, so classification
  sees the same body), though no compression is asked for.
- One deadline of the request's `timeout` seconds for the whole exchange (connect, send, answer), as aiohttp's
  `ClientTimeout(total=...)`: past it, `TimeoutError` and the connection is closed.
- Redirects are never followed: a 3xx is returned like any other answer.
- Errors: `TimeoutError`, or an `OSError` (refused, reset, TLS failure, `ServerDisconnectedError`
  when the connection closes before a complete answer, `BadHttpAnswerError` when the answer is not
  HTTP), the classes `stripe_http.StripeHttp` turns into `StripeUnreachable` (a retry).

Headers are the caller's (`stripe_http` sets Authorization, Stripe-Version, User-Agent, Content-Type); this
adds only Host, Accept and Content-Length.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import zlib
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from collections.abc import Mapping

#: aiohttp's default idle keep-alive time for client connections is 15 s; the worker's connector uses 30.
KEEPALIVE_S: Final = 30.0
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
#: what aiohttp refuses in a header name or value (line breaks and other control characters but tab)
_FORBIDDEN: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: 101 would switch protocols: never asked for, so never followed either
_SWITCHING_PROTOCOLS: Final = 101

#: what `request` returns: status, headers (case-insensitive), body
RawAnswer = tuple[int, "Mapping[str, str]", bytes]


class ServerDisconnectedError(ConnectionError):
    """The connection closed (or was reset) before a complete answer arrived."""


class BadHttpAnswerError(ConnectionError):
    """What arrived is not an HTTP/1.1 answer (the parser's reason is the message)."""


class _Connection(asyncio.Protocol):
    """One connection and the one exchange on it at a time; feeds received bytes to the parser."""

    __slots__ = (
        "_body",
        "_complete",
        "_headers",
        "_in_body",
        "_parser",
        "_waiter",
        "closed",
        "idle_since",
        "reusable",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[RawAnswer] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._in_body = False
        self._complete = False
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():  # bytes nobody asked for: this connection is not to be trusted
            self.reusable = False
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish(_SWITCHING_PROTOCOLS, keep_alive=False)
        except httptools.HttpParserError as exc:
            self.reusable = False
            self._fail(BadHttpAnswerError(str(exc) or type(exc).__name__))

    def eof_received(self) -> bool:
        self.closed = True  # never taken from the pool again
        return False  # close the transport; connection_lost completes or fails the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if exc is None and self._complete is False and self._reads_until_close():
            self._finish(self._parser.get_status_code(), keep_alive=False)
        else:
            self._fail(ServerDisconnectedError("the server closed the connection before a complete answer"))

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer to one request
            self.reusable = False
        self._headers = []
        self._body = []
        self._in_body = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_body = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: the real one follows
            self._in_body = False
            return
        if self._complete:
            return
        self._finish(status, keep_alive=self._parser.should_keep_alive())

    # ------------------------------------------------------------------ the exchange

    def send(self, data: bytes, waiter: asyncio.Future[RawAnswer]) -> None:
        assert self.transport is not None
        self._waiter = waiter
        self._complete = False
        self._in_body = False  # what the previous answer left must not frame this one
        self._headers = []
        self._body = []
        self.transport.write(data)

    def done(self) -> None:
        """The exchange is over (answered, failed or timed out)."""
        self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _reads_until_close(self) -> bool:
        """Headers complete, framed by neither a length nor chunks: the body ends when the connection does."""
        if not self._in_body:
            return False
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return True

    def _finish(self, status: int, *, keep_alive: bool) -> None:
        self._complete = True
        if not keep_alive:
            self.reusable = False
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        # a field value's surrounding spaces and tabs are not part of it (RFC 9110 5.5), as aiohttp reads it
        headers = CIMultiDict(
            [(name.decode("latin-1"), value.decode("latin-1").strip(" \t")) for name, value in self._headers]
        )
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if body and encoding in ("gzip", "deflate"):
            try:
                body = zlib.decompress(body, 47 if encoding == "gzip" else 15)
            except zlib.error:
                if encoding == "gzip":
                    self._fail(BadHttpAnswerError(f"cannot decode a {encoding} body"))
                    return
                try:  # deflate without its zlib wrapper, as some servers send it
                    body = zlib.decompress(body, -15)
                except zlib.error:
                    self._fail(BadHttpAnswerError(f"cannot decode a {encoding} body"))
                    return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result((status, CIMultiDictProxy(headers), body))

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()


class _Origin:
    """Where a URL's requests go and the part of their head that never changes."""

    __slots__ = ("host", "key", "port", "prefix", "ssl")

    def __init__(self, method: str, url: str, context: ssl.SSLContext | None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            msg = f"not an http(s) URL: {url[:200]!r}"
            raise ValueError(msg)
        self.host = parts.hostname
        self.port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self.ssl = (context or _default_context()) if parts.scheme == "https" else None
        authority = self.host if ":" not in self.host else f"[{self.host}]"
        if self.port != _DEFAULT_PORTS[parts.scheme]:
            authority = f"{authority}:{self.port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if _FORBIDDEN.search(method) is not None or " " in method:
            msg = f"not an HTTP method: {method[:20]!r}"
            raise ValueError(msg)
        self.prefix = f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: */*\r\n"
        #: the connections' pool: one per scheme, host and port, whatever the method and path
        self.key = (parts.scheme, self.host, self.port)


class Http1Transport:
    """`Transport` for the stream endpoint: pooled keep-alive HTTP/1.1 connections, one origin per URL.

    `close()` closes every connection; the worker calls it on the way out.
    """

    def __init__(
        self,
        limit: int,
        *,
        keepalive_s: float = KEEPALIVE_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._keepalive = keepalive_s
        self._ssl_context = ssl_context
        self._slots = asyncio.Semaphore(limit)
        self._origins: dict[tuple[str, str], _Origin] = {}
        #: idle connections per (scheme, host, port), the most recently used last
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float,  # noqa: ASYNC109 - one deadline for connect, send and answer, as aiohttp's total
    ) -> RawAnswer:
        origin = self._origins.get((method, url))
        if origin is None:
            origin = self._origins[method, url] = _Origin(method, url, self._ssl_context)
        head = _head(origin.prefix, headers, None if body is None else len(body))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with asyncio.timeout_at(deadline):  # waiting for a free connection counts, as in aiohttp's total
            await self._slots.acquire()
        try:
            return await self._exchange(origin, head if body is None else head + body, deadline)
        finally:
            self._slots.release()

    async def _exchange(self, origin: _Origin, data: bytes, deadline: float) -> RawAnswer:
        """One request on a pooled (or new) connection, answered by `deadline`; never sent after it."""
        loop = asyncio.get_running_loop()
        conn = self._take(origin, loop.time())
        if conn is None:
            conn = await self._connect(origin, deadline)
        if loop.time() >= deadline:  # nothing sent: the connection stays good
            self._release(origin, conn, loop.time())
            raise TimeoutError
        waiter: asyncio.Future[RawAnswer] = loop.create_future()
        timer = loop.call_at(deadline, _expire, waiter)
        self._busy.add(conn)
        try:
            conn.send(data, waiter)
            return await waiter
        except BaseException:
            conn.reusable = False
            raise
        finally:
            timer.cancel()
            conn.done()
            self._busy.discard(conn)
            self._release(origin, conn, loop.time())

    async def close(self) -> None:
        self._closed = True
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
            pool.clear()
        for conn in list(self._busy):
            conn.close()

    def _take(self, origin: _Origin, now: float) -> _Connection | None:
        pool = self._idle.get(origin.key)
        while pool:
            conn = pool.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive and not conn.transport.is_closing():  # type: ignore[union-attr]
                return conn
            conn.close()
        return None

    def _release(self, origin: _Origin, conn: _Connection, now: float) -> None:
        if conn.closed or not conn.reusable or self._closed:
            if not conn.closed:
                conn.abort()
            return
        conn.idle_since = now
        self._idle.setdefault(origin.key, []).append(conn)

    async def _connect(self, origin: _Origin, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline):
            _, conn = await loop.create_connection(
                _Connection,
                origin.host,
                origin.port,
                ssl=origin.ssl,
                server_hostname=origin.host if origin.ssl is not None else None,
            )
        return conn


@functools.cache
def _default_context() -> ssl.SSLContext:
    """The system's trusted CAs, host names checked: what aiohttp uses. Loaded once (it reads files)."""
    return ssl.create_default_context()


def _expire(waiter: asyncio.Future[RawAnswer]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _head(prefix: str, headers: Mapping[str, str], length: int | None) -> bytes:
    """The request head (Content-Length when there is a body); a control character in a header name or
    value is refused, as aiohttp refuses it."""
    lines = [prefix]
    for name, value in headers.items():
        if _FORBIDDEN.search(f"{name}\t{value}") is not None or ":" in name:
            msg = "Forbidden control character detected in headers. Potential header injection attack."
            raise ValueError(msg)
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n" if length is None else f"Content-Length: {length}\r\n\r\n")
    return "".join(lines).encode("utf-8")
