"""Stripe's asynchronous validation errors, written back to Kafka.

Stripe validates meter events only after the stream accepted them. Events that then fail are reported
by the webhook events `v1.billing.meter.error_report_triggered` and `v1.billing.meter.no_meter_found`,
whose data holds samples of the failed events' identifiers. `POST /webhooks/stripe` verifies the
`Stripe-Signature` header, turns every reported identifier into one Kafka record (key: the identifier,
dead-letter headers with reason `stripe_async_error`) and answers 200 only once Kafka acknowledged all
of them; a Kafka failure answers 503 so that Stripe delivers the event again. Redelivery can write a
record twice: consumers de-duplicate on identifier + event id (both in the record's value).

The pure parts (`verify_signature`, `error_report_records`) take their inputs and return or raise;
`webhook_app` is the thin aiohttp shell around them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
from aiohttp import web

from ingestor import __version__, dlq_format
from ingestor.errors import SignatureError, WebhookPayloadError
from ingestor.timefmt import format_datetime

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ingestor.metrics import Metrics

log = logging.getLogger("ingestor.webhook")

PATH: Final = "/webhooks/stripe"
SIGNATURE_HEADER: Final = "Stripe-Signature"
#: Largest request body read; a larger one is answered 413 (Stripe's events are far smaller).
MAX_BODY_BYTES: Final = 1024 * 1024
ERROR_REPORT_TRIGGERED: Final = "v1.billing.meter.error_report_triggered"
NO_METER_FOUND: Final = "v1.billing.meter.no_meter_found"
ERROR_REPORT_TYPES: Final = frozenset({ERROR_REPORT_TRIGGERED, NO_METER_FOUND})
REASON: Final = "stripe_async_error"
#: The `type` metric label when the event could not be read (bad signature, garbage body).
UNKNOWN_TYPE: Final = "unknown"
#: Most digits accepted in the signature's `t=` (unix seconds have 10 until the year 2286); a longer run
#: is malformed, and is refused before `int()` (which refuses more than 4300 digits with a ValueError).
MAX_TIMESTAMP_DIGITS: Final = 12
#: Longest `ingestor.message` header written (as the dead-letter writer does).
MAX_MESSAGE_CHARS: Final = 1000


@dataclass(frozen=True, slots=True)
class ReportRecord:
    """One Kafka record for one identifier Stripe reported as failed."""

    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


class KafkaSender(Protocol):
    """The producer boundary (aiokafka's `AIOKafkaProducer` satisfies it)."""

    async def send_and_wait(  # noqa: PLR0913, PLR0917 - aiokafka's signature
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Any: ...


# --- signatures (pure) ------------------------------------------------------------------------------


def verify_signature(payload: bytes, header: str | None, secret: str, *, tolerance: float, now: float) -> None:
    """Check `header` the way Stripe's SDKs do; raise `SignatureError` if the payload is not Stripe's.

    The header is `t=<unix seconds>,v1=<hex>[,v1=<hex>...]` (several v1 entries while a secret is
    rolled); one v1 entry must equal HMAC-SHA256(secret, f"{t}.{payload}"), and `t` must lie within
    `tolerance` seconds of `now`, in the past or in the future.
    """
    if not header:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    timestamp, signatures = _parse_signature_header(header)
    if not signatures:
        raise SignatureError(f"no v1 signature in the {SIGNATURE_HEADER} header")
    expected = _sign(payload, secret, timestamp).encode()
    matches = [hmac.compare_digest(expected, s.encode("utf-8", "replace")) for s in signatures]
    if not any(matches):
        raise SignatureError("no signature matches the payload (wrong secret or altered body)")
    if timestamp < now - tolerance:
        raise SignatureError(f"signature timestamp is older than the tolerance of {tolerance:g} s")
    if timestamp > now + tolerance:
        raise SignatureError(f"signature timestamp is more than {tolerance:g} s in the future")


def _parse_signature_header(header: str) -> tuple[int, list[str]]:
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in header.split(","):
        scheme, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError(f"malformed {SIGNATURE_HEADER} header: an entry without '='")
        if scheme == "t":
            timestamps.append(value)
        elif scheme == "v1":
            signatures.append(value)
    if len(timestamps) != 1 or not _is_unix_seconds(timestamps[0]):
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: it needs exactly one t=<unix seconds>")
    return int(timestamps[0]), signatures


def _is_unix_seconds(text: str) -> bool:
    return 0 < len(text) <= MAX_TIMESTAMP_DIGITS and text.isascii() and text.isdigit()


def _sign(payload: bytes, secret: str, timestamp: int) -> str:
    signed = f"{timestamp}.".encode() + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


# --- error reports (pure) ---------------------------------------------------------------------------


def parse_event(body: bytes) -> dict[str, Any]:
    """The event object in a webhook body, with a string `id` and `type`."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WebhookPayloadError(f"body is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise WebhookPayloadError("body is not a JSON object")
    for name in ("id", "type"):
        if not isinstance(event.get(name), str) or not event[name]:
            raise WebhookPayloadError(f"event has no string {name!r}")
    return event


def error_report_records(event: dict[str, Any], *, version: str) -> list[ReportRecord]:
    """One record per identifier an error report names (the first sample wins for a repeated one).

    The report is read at `event["data"]["object"]` (snapshot events) or `event["data"]` (events with
    their data inline). Samples without an identifier cannot be keyed and are left out.
    """
    if event.get("type") not in ERROR_REPORT_TYPES:
        raise WebhookPayloadError(f"event type {event.get('type')!r} is not an error report")
    data = _report_data(event)
    context = {
        "event_type": event["type"],
        "event_id": _require_str(event, "id", "event"),
        "meter": _meter_id(event, data),
        "validation_start": _rfc3339(data.get("validation_start"), "validation_start"),
        "validation_end": _rfc3339(data.get("validation_end"), "validation_end"),
    }
    records: dict[str, ReportRecord] = {}
    for code, identifier, message in _samples(data):
        if identifier not in records:
            records[identifier] = _record(identifier, code, message, context, version)
    return list(records.values())


def record_code(record: ReportRecord) -> str:
    """The Stripe error code a record carries (for metrics)."""
    return next(v.decode() for k, v in record.headers if k == dlq_format.STRIPE_CODE)


def _report_data(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("data")
    if not isinstance(data, dict):
        raise WebhookPayloadError(f"{event['type']} event {event.get('id')!r} has no data object")
    inner = data.get("object")
    report: dict[str, Any] = inner if isinstance(inner, dict) else data
    if not isinstance(report.get("reason"), dict):
        raise WebhookPayloadError(f"{event['type']} event {event.get('id')!r} has no reason object in its data")
    return report


def _samples(data: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(code, identifier, error message) for every sample error that names an identifier."""
    error_types = data["reason"].get("error_types")
    if not isinstance(error_types, list):
        raise WebhookPayloadError("reason.error_types is not a list")
    for error_type in error_types:
        if not isinstance(error_type, dict):
            raise WebhookPayloadError("an entry of reason.error_types is not an object")
        code = _require_str(error_type, "code", "reason.error_types[]")
        samples = error_type.get("sample_errors") or []
        if not isinstance(samples, list):
            raise WebhookPayloadError("reason.error_types[].sample_errors is not a list")
        for sample in samples:
            identifier = _identifier(sample)
            if identifier is not None:
                message = sample.get("error_message")
                yield code, identifier, message if isinstance(message, str) else ""


def _identifier(sample: Any) -> str | None:
    if not isinstance(sample, dict):
        raise WebhookPayloadError("an entry of sample_errors is not an object")
    request = sample.get("request")
    identifier = request.get("identifier") if isinstance(request, dict) else None
    return identifier if isinstance(identifier, str) and identifier else None


def _meter_id(event: dict[str, Any], data: dict[str, Any]) -> str | None:
    related = event.get("related_object")
    if isinstance(related, dict) and isinstance(related.get("id"), str):
        return str(related["id"])
    meter = data.get("meter")
    return meter if isinstance(meter, str) else None


def _require_str(obj: dict[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise WebhookPayloadError(f"{where} has no string {name!r}")
    return value


def _rfc3339(value: Any, name: str) -> str | None:
    """An RFC 3339 UTC string (milliseconds, `Z`) for unix seconds or an RFC 3339 string; None if absent."""
    if value is None:
        return None
    moment = _moment(value)
    if moment is None or moment.tzinfo is None:
        raise WebhookPayloadError(f"{name} is neither unix seconds nor an RFC 3339 date-time: {value!r}")
    return format_datetime(moment)


def _moment(value: Any) -> datetime | None:
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, tz=UTC)
        if isinstance(value, str):
            return datetime.fromisoformat(value)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _record(identifier: str, code: str, message: str, context: dict[str, Any], version: str) -> ReportRecord:
    value = {"identifier": identifier, "code": code, "error_message": message, **context}
    headers = [
        (dlq_format.REASON, REASON.encode()),
        (dlq_format.STRIPE_CODE, code.encode()),
        (dlq_format.MESSAGE, message[:MAX_MESSAGE_CHARS].encode()),
        (dlq_format.IDENTIFIER, identifier.encode()),
        (dlq_format.VERSION, version.encode()),
    ]
    for header, field in (
        (dlq_format.FIRST_FAILURE_AT, "validation_start"),
        (dlq_format.LAST_FAILURE_AT, "validation_end"),
    ):
        if context[field] is not None:
            headers.append((header, context[field].encode()))
    return ReportRecord(key=identifier.encode(), value=orjson.dumps(value), headers=headers)


# --- the HTTP endpoint ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    status: int
    outcome: str
    message: str


class _Handler:
    def __init__(  # noqa: PLR0913 - the app's keyword-only options, passed through
        self,
        *,
        secret: str,
        tolerance: float,
        sender: KafkaSender,
        topic: str,
        metrics: Metrics,
        wall_time: Callable[[], float],
    ) -> None:
        self._secret = secret
        self._tolerance = tolerance
        self._sender = sender
        self._topic = topic
        self._metrics = metrics
        self._wall_time = wall_time

    async def handle(self, request: web.Request) -> web.Response:
        event_type, answer = await self._handle(request)
        self._metrics.webhook_events.labels(event_type, answer.outcome).inc()
        return web.json_response({"outcome": answer.outcome, "message": answer.message}, status=answer.status)

    async def _handle(self, request: web.Request) -> tuple[str, _Answer]:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            log.warning("webhook body larger than %d bytes refused", MAX_BODY_BYTES)
            return UNKNOWN_TYPE, _Answer(413, "too_large", f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            verify_signature(
                body,
                request.headers.get(SIGNATURE_HEADER),
                self._secret,
                tolerance=self._tolerance,
                now=self._wall_time(),
            )
            event = parse_event(body)
        except SignatureError as exc:
            log.warning("webhook refused: %s", exc)
            return UNKNOWN_TYPE, _Answer(400, "bad_signature", str(exc))
        except WebhookPayloadError as exc:
            log.warning("webhook refused: %s", exc)
            return UNKNOWN_TYPE, _Answer(400, "bad_payload", str(exc))
        if event["type"] not in ERROR_REPORT_TYPES:
            log.debug("webhook event %s of type %s ignored", event["id"], event["type"])
            return event["type"], _Answer(200, "ignored", "event type not handled")
        return event["type"], await self._error_report(event)

    async def _error_report(self, event: dict[str, Any]) -> _Answer:
        try:
            records = error_report_records(event, version=__version__)
        except WebhookPayloadError as exc:
            log.warning("error report %s refused: %s", event["id"], exc)
            return _Answer(400, "bad_payload", str(exc))
        failure = await self._write(records)
        if failure is not None:
            log.error(
                "error report %s: writing %d records to %s failed, answering 503 for redelivery: %r",
                event["id"],
                len(records),
                self._topic,
                failure,
            )
            return _Answer(503, "kafka_error", "could not write to Kafka; deliver again")
        self._count_codes(records)
        log.info(
            "error report %s (%s): %d identifiers written to %s",
            event["id"],
            event["type"],
            len(records),
            self._topic,
        )
        return _Answer(200, "written", f"{len(records)} records written")

    async def _write(self, records: list[ReportRecord]) -> BaseException | None:
        """Send every record and wait for every acknowledgement; the first failure, if any."""
        results = await asyncio.gather(
            *(self._sender.send_and_wait(self._topic, value=r.value, key=r.key, headers=r.headers) for r in records),
            return_exceptions=True,
        )
        return next((r for r in results if isinstance(r, BaseException)), None)

    def _count_codes(self, records: list[ReportRecord]) -> None:
        counts: dict[str, int] = {}
        for record in records:
            code = record_code(record)
            counts[code] = counts.get(code, 0) + 1
        for code, count in counts.items():
            self._metrics.error_report_records.labels(code).inc(count)


def webhook_app(  # noqa: PLR0913 - keyword-only options
    *,
    secret: str,
    tolerance: float,
    sender: KafkaSender,
    topic: str,
    metrics: Metrics,
    wall_time: Callable[[], float] = time.time,
) -> web.Application:
    """The aiohttp application serving `POST /webhooks/stripe`."""
    if not secret:
        raise ValueError("the webhook signing secret must not be empty")
    handler = _Handler(
        secret=secret, tolerance=tolerance, sender=sender, topic=topic, metrics=metrics, wall_time=wall_time
    )
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post(PATH, handler.handle)
    return app
