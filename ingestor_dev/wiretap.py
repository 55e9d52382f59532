"""A loopback TCP pass-through that counts requests by the time the kernel received them.

A budget test that reads the emulator's own request window is only as good as the emulator's worst
pause: a stalled event loop stamps a backlog of requests as arriving together. The tap measures
arrivals apart from the emulator and from its own scheduling:

- it is its own process (`WireTap` starts ``python -m ingestor_dev.wiretap``), with one thread per
  direction of each connection doing nothing but copying bytes, so neither the emulator's loop nor
  its collector (the GIL) delays it;
- it reads with ``recvmsg`` and ``SO_TIMESTAMPNS``: each read carries the kernel's receive time of
  its data (CLOCK_REALTIME, epoch seconds like ``time.time()``), whenever the tap gets to run;
- it frames HTTP/1.1 keep-alive requests by ``Content-Length`` (`RequestFramer`) and peeks before it
  reads so that one read never takes bytes of two requests: a request's arrival is the kernel time
  of the segment that completed it. Linux merges segments that wait unread in a socket's receive
  queue and keeps the later time, so a stamp can only be late, by as long as the tap itself was not
  scheduled; the record keeps that lag (``read - kernel``) per request, and `Arrivals.max_lag` shows it;
- with ``--stamp`` it passes each request on with a ``Wiretap-Arrival: <epoch seconds>`` header,
  which the emulator takes for the request's arrival when configured to
  (`EmulatorConfig.trust_arrival_header`, loopback peers only).

A request the tap cannot frame (``Transfer-Encoding``, a bad ``Content-Length``) turns its
connection into a plain copy, counted as ``unframed``. Responses are copied unchanged.

Run by hand::

    python -m ingestor_dev.wiretap --upstream 127.0.0.1:12111 --port 12112 --record /tmp/arrivals.txt --stamp

It prints ``wiretap listening on http://HOST:PORT`` (flushed), then appends one line per request to
the record: ``<kernel ns> <read ns> <METHOD> <path>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

if TYPE_CHECKING:
    from types import TracebackType

STREAM_PATH: Final = "/v2/billing/meter_event_stream"
ARRIVAL_HEADER: Final = "Wiretap-Arrival"
#: Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS) on every architecture that uses asm-generic; the socket
#: module does not name it.
SO_TIMESTAMPNS: Final = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC: Final = struct.Struct("@qq")
_ANCILLARY: Final = socket.CMSG_SPACE(_TIMESPEC.size)
READ_SIZE: Final = 65536
#: a longer head is not HTTP a client of ours sends: the connection is copied without framing
MAX_HEAD: Final = 65536
_END: Final = b"\r\n\r\n"
_LISTENING: Final = "wiretap listening on "
_START_TIMEOUT_S: Final = 20.0


class FramingError(ValueError):
    """The bytes are not an HTTP/1.1 request the tap can frame by Content-Length.

    ``done``: the requests completed before the unframable one; ``rest``: every byte from its start on.
    """

    def __init__(self, message: str, done: list[Request] | None = None, rest: bytes = b"") -> None:
        super().__init__(message)
        self.done = done or []
        self.rest = rest


@dataclass(frozen=True, slots=True)
class Request:
    """One complete request as received: its head (through the blank line) and body."""

    method: str
    path: str
    head: bytes
    body: bytes

    def stamped(self, arrival_ns: int) -> bytes:
        """The request's bytes with the arrival header added as the last header line."""
        header = f"{ARRIVAL_HEADER}: {arrival_ns // 1_000_000_000}.{arrival_ns % 1_000_000_000:09d}\r\n".encode()
        return self.head[:-2] + header + b"\r\n" + self.body


class RequestFramer:
    """HTTP/1.1 request framing by Content-Length, across any split of the byte stream (pure).

    `feed` takes the bytes of one read and returns the requests that read completed. `take` says how
    many bytes of what is waiting (``peek``) to read next so that a read ends where a request ends.
    """

    __slots__ = ("_buffer", "_need")

    def __init__(self) -> None:
        self._buffer = b""
        #: the size (head and body) of the request at the start of the buffer, once its head is complete
        self._need = 0

    @property
    def pending(self) -> int:
        """Bytes received of a request not yet complete."""
        return len(self._buffer)

    def take(self, peek: bytes) -> int:
        """How many of the waiting bytes ``peek`` to read: up to the end of the current request when
        its head is visible, else all of them."""
        if self._need:
            return min(len(peek), self._need - len(self._buffer))
        data = self._buffer + peek
        end = data.find(_END)
        if end < 0:
            return len(peek)
        try:
            size = end + 4 + _content_length(data[:end])
        except FramingError:
            return len(peek)  # `feed` says so
        return max(1, min(len(peek), size - len(self._buffer)))

    def feed(self, data: bytes) -> list[Request]:
        """Add one read's bytes; the requests now complete, in order. Raises `FramingError`."""
        buffer = self._buffer + data if self._buffer else data
        done: list[Request] = []
        try:
            while (request := self._complete(buffer)) is not None:
                done.append(request)
                buffer = buffer[self._need :]
                self._need = 0
        except FramingError as error:
            self._buffer, self._need = b"", 0
            raise FramingError(str(error), done, buffer) from None
        self._buffer = buffer
        return done

    def _complete(self, buffer: bytes) -> Request | None:
        """The request at the start of ``buffer`` if it is all there (its size is then `_need`)."""
        if not self._need:
            end = buffer.find(_END)
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    raise FramingError("a request head longer than the tap reads")
                return None
            self._need = end + 4 + _content_length(buffer[:end])
        if len(buffer) < self._need:
            return None
        return _request(buffer[: self._need], buffer.find(_END) + 4)


def _content_length(head: bytes) -> int:
    """The body's length from a request head (no Content-Length: none). Raises `FramingError`."""
    length: int | None = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            raise FramingError("Transfer-Encoding is not framed by the tap")
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit() or (length is not None and int(value) != length):
                raise FramingError("a bad or repeated Content-Length")
            length = int(value)
    return length or 0


def _request(raw: bytes, body_start: int) -> Request:
    line = raw[: raw.find(b"\r\n")].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise FramingError(f"not an HTTP/1.x request line: {line[:80]!r}")
    return Request(parts[0], parts[1].partition("?")[0], raw[:body_start], raw[body_start:])


def kernel_time_ns(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The SO_TIMESTAMPNS receive time in a ``recvmsg`` result's ancillary data, in epoch nanoseconds."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            return int(seconds) * 1_000_000_000 + int(nanoseconds)
    return None


# -- the pass-through (runs in its own process) -------------------------------------------------------


class _Record:
    """The arrival record: one line per request, appended by every connection's thread."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, kernel_ns: int, read_ns: int, method: str, path: str) -> None:
        os.write(self._fd, f"{kernel_ns} {read_ns} {method} {path}\n".encode("latin-1"))

    def unframed(self) -> None:
        os.write(self._fd, b"0 0 - unframed\n")


class _Pipe:
    """One proxied connection: client → upstream framed and stamped, upstream → client copied."""

    def __init__(self, client: socket.socket, upstream: socket.socket, record: _Record, *, stamp: bool) -> None:
        self.client = client
        self.upstream = upstream
        self._record = record
        self._stamp = stamp
        client.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def start(self) -> None:
        threading.Thread(target=self._requests, daemon=True).start()
        threading.Thread(target=self._responses, daemon=True).start()

    def _requests(self) -> None:
        framer = RequestFramer()
        try:
            while self._forward_one_read(framer):
                pass
        except OSError:
            pass
        finally:
            _shutdown(self.upstream, socket.SHUT_WR)

    def _forward_one_read(self, framer: RequestFramer) -> bool:
        peek = self.client.recv(READ_SIZE, socket.MSG_PEEK)
        if not peek:
            return False
        data, ancillary, _, _ = self.client.recvmsg(framer.take(peek), _ANCILLARY)
        read_ns = time.time_ns()
        kernel_ns = kernel_time_ns(ancillary) or read_ns
        try:
            requests = framer.feed(data)
        except FramingError as error:
            self._forward(error.done, kernel_ns, read_ns)
            self._record.unframed()
            self.upstream.sendall(error.rest)
            self._copy(self.client, self.upstream)
            return False
        self._forward(requests, kernel_ns, read_ns)
        return True

    def _forward(self, requests: list[Request], kernel_ns: int, read_ns: int) -> None:
        out = []
        for request in requests:
            self._record.write(kernel_ns, read_ns, request.method, request.path)
            out.append(request.stamped(kernel_ns) if self._stamp else request.head + request.body)
        if out:
            self.upstream.sendall(b"".join(out))

    def _responses(self) -> None:
        try:
            self._copy(self.upstream, self.client)
        except OSError:
            pass
        finally:
            _shutdown(self.client, socket.SHUT_RDWR)
            _shutdown(self.upstream, socket.SHUT_RDWR)
            self.client.close()
            self.upstream.close()

    @staticmethod
    def _copy(source: socket.socket, target: socket.socket) -> None:
        while data := source.recv(READ_SIZE):
            target.sendall(data)


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


def serve(listener: socket.socket, upstream: tuple[str, int], record: _Record, *, stamp: bool) -> None:
    """Accept connections forever, each proxied to ``upstream`` by its own two threads."""
    while True:
        client, _ = listener.accept()
        try:
            target = socket.create_connection(upstream)
        except OSError:
            client.close()  # the upstream refuses: so does the tap
            continue
        for sock in (client, target):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _Pipe(client, target, record, stamp=stamp).start()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ingestor_dev.wiretap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, type=_address, help="HOST:PORT to pass the connections to")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 = any (default)")
    parser.add_argument("--record", required=True, help="append one line per request to this file")
    parser.add_argument("--stamp", action="store_true", help=f"add a `{ARRIVAL_HEADER}` header to each request")
    args = parser.parse_args(argv)
    listener = socket.create_server((args.host, args.port), backlog=256)
    record = _Record(args.record)
    host, port = listener.getsockname()[:2]
    print(f"{_LISTENING}http://{host}:{port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        serve(listener, args.upstream, record, stamp=args.stamp)


# -- reading the record (tests and the benchmark) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    #: kernel receive time, epoch seconds
    at: float
    #: how much later the tap read it, seconds (how late a stamp can be: see the module docstring)
    lag: float
    method: str
    path: str


class Arrivals:
    """The requests the tap saw, oldest first by kernel time."""

    def __init__(self, arrivals: list[Arrival], unframed: int = 0) -> None:
        self.all = sorted(arrivals, key=lambda a: a.at)
        self.unframed = unframed

    @classmethod
    def parse(cls, text: str) -> Arrivals:
        arrivals: list[Arrival] = []
        unframed = 0
        for line in text.splitlines():
            kernel, read, method, path = line.split(" ", 3)
            if method == "-":
                unframed += 1
                continue
            arrivals.append(Arrival(int(kernel) / 1e9, (int(read) - int(kernel)) / 1e9, method, path))
        return cls(arrivals, unframed)

    def times(self, path: str = STREAM_PATH, method: str = "POST") -> list[float]:
        return [a.at for a in self.all if a.path == path and a.method == method]

    def count(self, path: str = STREAM_PATH) -> int:
        return len(self.times(path))

    def max_in_window(self, width: float = 1.0, path: str = STREAM_PATH) -> int:
        """The most requests within any half-open interval ``[t, t + width)``."""
        return max_in_window(self.times(path), width)

    def per_second(self, path: str = STREAM_PATH) -> dict[int, int]:
        """Requests per whole epoch second."""
        return dict(sorted(Counter(int(t) for t in self.times(path)).items()))

    @property
    def max_lag(self) -> float:
        return max((a.lag for a in self.all), default=0.0)


def max_in_window(times: list[float], width: float = 1.0) -> int:
    """The most of ``times`` within any half-open interval of length ``width``: O(n log n)."""
    ordered = sorted(times)
    best = start = 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - width:
            start += 1
        best = max(best, end - start + 1)
    return best


class WireTap:
    """The tap in its own process, in front of ``upstream`` (an ``http://host:port`` URL)::

    async with WireTap(emu.url, stamp=True) as tap:
        ... point the worker at tap.url ...
        tap.arrivals().max_in_window()
    """

    def __init__(self, upstream: str, *, stamp: bool = False) -> None:
        self._upstream = upstream.removeprefix("http://").rstrip("/")
        self._stamp = stamp
        self._dir = tempfile.TemporaryDirectory(prefix="wiretap-")
        self.record = Path(self._dir.name) / "arrivals.txt"
        self._process: asyncio.subprocess.Process | None = None
        self._final: Arrivals | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        command = [sys.executable, "-m", "ingestor_dev.wiretap", "--upstream", self._upstream]
        command += ["--record", str(self.record), *(["--stamp"] if self._stamp else [])]
        self._process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
        )
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), _START_TIMEOUT_S)
        text = line.decode().strip()
        if not text.startswith(_LISTENING):
            await self.stop()
            raise RuntimeError(f"the wire tap did not start: {text!r}")
        self.url = text.removeprefix(_LISTENING)

    async def stop(self) -> None:
        """Stop the tap's process and keep what it recorded for `arrivals` (safe to call twice)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        self._final = self.arrivals()
        self._dir.cleanup()

    def arrivals(self) -> Arrivals:
        """Every request recorded so far (after `stop`: every request recorded)."""
        if self._final is not None:
            return self._final
        try:
            return Arrivals.parse(self.record.read_text("latin-1"))
        except FileNotFoundError:
            return Arrivals([])


if __name__ == "__main__":
    main()
