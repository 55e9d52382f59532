"""Every HTTP input the worker serves, fuzzed over real sockets on 127.0.0.1.

The webhook endpoint (`POST /webhooks/stripe`, facing Stripe and so the internet) and the operator
endpoints (`/metrics`, `/healthz`, `/readyz`) are served as the worker serves them (`start_site`), on an
event loop in a thread, and hit with raw HTTP/1.1 requests built by hypothesis: methods, paths, query
strings, headers (the `Stripe-Signature` header in particular) and bodies, signed or not. Whatever
arrives, the answer is a 4xx or the endpoint's normal answer (2xx, or 503 for health), never a 5xx,
and no log line carries a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any, Self

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestor.metrics import Metrics
from ingestor.observability import HealthState, http_app, start_site
from ingestor.webhook import ERROR_REPORT_TRIGGERED, NO_METER_FOUND, PATH, webhook_app

if TYPE_CHECKING:
    from collections.abc import Iterator

    from aiohttp import web

SECRET = "whsec_fuzz_secret"
NOW = 1_790_000_000
HEALTH_PATHS = ("/healthz", "/readyz")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Sender:
    """The Kafka producer boundary: acks everything."""

    def __init__(self) -> None:
        self.sent = 0

    async def send_and_wait(self, topic: str, value: bytes | None = None, **_: Any) -> None:
        self.sent += 1


class Capture(logging.Handler):
    """Every log record of the process while the servers run (the server thread included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Servers:
    """The webhook app and the operator app on one event loop in a thread, as the worker starts them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-servers", daemon=True)
        self.runners: list[web.AppRunner] = []
        self.ports: dict[str, int] = {}
        self.health = HealthState(stuck_after=10.0)

    def __enter__(self) -> Self:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _start(self) -> None:
        metrics = Metrics()
        hook = webhook_app(
            secret=SECRET, tolerance=300.0, sender=Sender(), topic="errors", metrics=metrics, wall_time=lambda: NOW
        )
        for name, app in (("webhook", hook), ("operator", http_app(metrics, self.health))):
            runner, port = await start_site(app, "127.0.0.1", 0)
            self.runners.append(runner)
            self.ports[name] = port

    async def _stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with Servers() as running:
        yield running


@pytest.fixture(scope="module")
def capture() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def request(port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> int:
    """Send one raw HTTP/1.1 request; the status code of the answer."""
    head = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    head += [f"{name}: {value}" for name, value in headers]
    head.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0].split(b" ")
    assert len(status_line) >= 2, f"no HTTP answer: {answer[:200]!r}"
    return int(status_line[1])


def refusal_logged(records: list[logging.LogRecord]) -> bool:
    """The webhook's refusal, or the server's for a request that is not valid HTTP: a warning line."""
    return any(r.name in {"ingestor.webhook", "ingestor.http"} and r.levelno == logging.WARNING for r in records)


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in records
        if r.exc_info is not None or r.exc_text or "Traceback" in r.getMessage()
    ]


@contextlib.contextmanager
def judged(capture: Capture) -> Iterator[list[logging.LogRecord]]:
    """The log records of one example; none may carry a traceback."""
    start = len(capture.records)
    records: list[logging.LogRecord] = []
    yield records
    records.extend(capture.records[start:])
    assert tracebacks(records) == []


def sign(body: bytes, timestamp: int | str = NOW, secret: str = SECRET) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


# -- strategies ---------------------------------------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Header values: visible ASCII, spaces and tabs, and obs-text (bytes 0x80-0xff, sent as latin-1).
VALUE_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f") | st.just("\t")
#: Request-target characters (no space, no control characters; anything else, escaped or not).
TARGET_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
#: Framing headers are the client's (a wrong Content-Length would only make the server wait).
FRAMING = {"content-length", "transfer-encoding", "connection", "host", "expect", "upgrade"}

methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE"]) | st.text(
    TOKEN_CHARS, min_size=1, max_size=12
)
header_names = st.sampled_from(
    ["Stripe-Signature", "Content-Type", "Content-Encoding", "Accept", "Accept-Encoding", "Cookie", "X-Forwarded-For"]
) | st.text(TOKEN_CHARS, min_size=1, max_size=20).filter(lambda name: name.lower() not in FRAMING)
header_values = st.text(VALUE_CHARS, max_size=200).map(str.strip)
#: Short runs of digits, and runs past what `int()` converts (4300 digits): a t= Stripe never sends.
digits = st.one_of(st.integers(1, 30), st.integers(4000, 6000)).map(lambda n: "9" * n) | st.integers().map(str)
signatures = st.one_of(
    header_values,
    digits.map(lambda t: f"t={t},v1={'0' * 64}"),
    st.builds(lambda t, v: f"t={t},v1={v}", header_values, header_values),
    st.lists(st.tuples(st.sampled_from(["t", "v1", "v0", "", " t"]), header_values), max_size=6).map(
        lambda items: ",".join(f"{k}={v}" for k, v in items)
    ),
)
headers = st.lists(st.tuples(header_names, header_values), max_size=6)
queries = st.text(TARGET_CHARS.filter(lambda c: c != "#"), max_size=60).map(lambda q: f"?{q}" if q else "")
#: orjson writes 64-bit integers; larger ones come as raw bytes (`numbers`, `st.binary`).
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | int64 | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
report_keys = st.sampled_from(
    [
        "reason",
        "error_types",
        "code",
        "sample_errors",
        "request",
        "identifier",
        "error_message",
        "validation_start",
        "validation_end",
        "object",
        "meter",
        "related_object",
        "id",
    ]
)
report_like = st.recursive(
    st.none() | int64 | st.floats(allow_nan=False) | st.text(max_size=20) | st.just("2026-11-21T05:00:00Z"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(report_keys, inner, max_size=5),
    max_leaves=25,
)
events = st.builds(
    lambda event_id, event_type, data: {"id": event_id, "type": event_type, "data": data},
    st.text(max_size=10),
    st.sampled_from([ERROR_REPORT_TRIGGERED, NO_METER_FOUND, "v1.billing.meter.other", ""]),
    report_like,
)
#: An error report whose timestamps are numbers no float or datetime can hold.
numbers = st.sampled_from(["1e400", "-1e400", "9" * 400, "1" + "0" * 5000, "-0", "1.5e-400"]).map(
    lambda n: (
        f'{{"id": "evt_1", "type": "{ERROR_REPORT_TRIGGERED}", "data": {{"validation_start": {n}, '
        f'"validation_end": {n}, "reason": {{"error_types": []}}}}}}'
    ).encode()
)
bodies = st.binary(max_size=300) | json_values.map(orjson.dumps) | events.map(orjson.dumps) | numbers


# -- the webhook --------------------------------------------------------------------------------------


@FUZZ
@given(signature=signatures, body=bodies, extra=headers)
def test_webhook_any_signature_header_is_a_4xx(
    servers: Servers, capture: Capture, signature: str, body: bytes, extra: list[tuple[str, str]]
) -> None:
    with judged(capture) as records:
        status = request(servers.ports["webhook"], "POST", PATH, [("Stripe-Signature", signature), *extra], body)
    assert 400 <= status < 500
    assert refusal_logged(records)


@FUZZ
@given(body=bodies, extra=headers, query=queries)
def test_webhook_any_signed_body_is_written_ignored_or_a_4xx(
    servers: Servers, capture: Capture, body: bytes, extra: list[tuple[str, str]], query: str
) -> None:
    with judged(capture) as records:
        status = request(
            servers.ports["webhook"], "POST", PATH + query, [*extra, ("Stripe-Signature", sign(body))], body
        )
    assert status == 200 or 400 <= status < 500
    if status >= 400:
        assert refusal_logged(records)


def test_webhook_a_timestamp_of_thousands_of_digits_is_a_bad_signature(servers: Servers, capture: Capture) -> None:
    body = orjson.dumps({"id": "evt_1", "type": ERROR_REPORT_TRIGGERED})
    for timestamp in ("9" * 5000, "1" + "0" * 4300, "0" * 20 + str(NOW)):
        with judged(capture) as records:
            status = request(
                servers.ports["webhook"], "POST", PATH, [("Stripe-Signature", sign(body, timestamp))], body
            )
        assert status == 400
        assert [r.getMessage()[:60] for r in records if r.name == "ingestor.webhook"] == [
            "webhook refused: malformed Stripe-Signature header: it needs"
        ]


# -- every port, any request --------------------------------------------------------------------------

paths = st.sampled_from(
    [PATH, "/metrics", "/healthz", "/readyz", "/", "//metrics", PATH + "/", "/metrics/..", "/%2e%2e/metrics", "*"]
) | st.text(TARGET_CHARS, max_size=40).map(lambda p: "/" + p)


@FUZZ
@given(
    port=st.sampled_from(["webhook", "operator"]),
    method=methods,
    path=paths,
    query=queries,
    extra=headers,
    body=st.binary(max_size=200),
)
def test_any_request_to_any_port_is_a_4xx_or_the_normal_answer(  # noqa: PLR0917 - one argument per input
    servers: Servers,
    capture: Capture,
    port: str,
    method: str,
    path: str,
    query: str,
    extra: list[tuple[str, str]],
    body: bytes,
) -> None:
    with judged(capture):
        status = request(servers.ports[port], method, path + query, extra, body)
    assert status < 500 or (status == 503 and path in HEALTH_PATHS), status
    if 200 <= status < 300:
        assert (port, path) in {("operator", "/metrics"), *(("operator", p) for p in HEALTH_PATHS)} or (
            port == "webhook" and path == PATH
        )


@pytest.mark.parametrize("path", ["/metrics", *HEALTH_PATHS])
def test_operator_endpoints_answer_normally(servers: Servers, capture: Capture, path: str) -> None:
    with judged(capture):
        status = request(servers.ports["operator"], "GET", path, [], b"")
    assert status in {200, 503}
