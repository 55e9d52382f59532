"""The Stripe webhook endpoint: signatures (checked against Stripe's own SDK), error reports, the app."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import io
import time
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import stripe
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor import dlq_format
from ingestor.errors import SignatureError, WebhookPayloadError
from ingestor.metrics import Metrics
from ingestor.webhook import (
    ERROR_REPORT_TRIGGERED,
    MAX_BODY_BYTES,
    NO_METER_FOUND,
    PATH,
    ReportRecord,
    error_report_records,
    verify_signature,
    webhook_app,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

SECRET = "whsec_test_secret"
TOLERANCE = 300.0
NOW = 1_790_000_000
TOPIC = "ingestor.errors"


def sign(payload: bytes, secret: str = SECRET, timestamp: int = NOW) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def report_data(*, start: Any = "2026-11-21T05:00:00Z", end: Any = "2026-11-21T05:01:00.250Z") -> dict[str, Any]:
    return {
        "developer_message_summary": "There is 1 invalid event",
        "validation_start": start,
        "validation_end": end,
        "reason": {
            "error_count": 4,
            "error_types": [
                {
                    "code": "meter_event_customer_not_found",
                    "error_count": 3,
                    "sample_errors": [
                        {"error_message": "Customer cus_1 not found", "request": {"identifier": "id-1"}},
                        {"error_message": "Customer cus_2 not found", "request": {"identifier": "id-2"}},
                        {"error_message": "Customer cus_1 not found", "request": {"identifier": "id-1"}},
                    ],
                },
                {
                    "code": "meter_event_invalid_value",
                    "error_count": 1,
                    "sample_errors": [{"error_message": "Value must be an integer", "request": {"identifier": "id-3"}}],
                },
            ],
        },
    }


def inline_event(event_type: str = ERROR_REPORT_TRIGGERED, event_id: str = "evt_inline") -> dict[str, Any]:
    """A v2-style event with its data inline and the meter as related object."""
    return {
        "id": event_id,
        "object": "v2.core.event",
        "type": event_type,
        "created": "2026-11-21T05:02:00.000Z",
        "related_object": {"id": "mtr_123", "type": "billing.meter", "url": "/v1/billing/meters/mtr_123"},
        "data": report_data(),
    }


def snapshot_event(event_type: str = ERROR_REPORT_TRIGGERED, event_id: str = "evt_snapshot") -> dict[str, Any]:
    """A v1-style snapshot event: the report at data.object, unix-second validation times."""
    data = report_data(start=1_795_000_000, end=1_795_000_060)
    data["meter"] = "mtr_456"
    return {"id": event_id, "object": "event", "type": event_type, "data": {"object": data}}


# --- signatures -------------------------------------------------------------------------------------


def test_valid_signature_passes() -> None:
    payload = b'{"id": "evt_1"}'
    verify_signature(payload, sign(payload), SECRET, tolerance=TOLERANCE, now=NOW)


def test_signature_made_by_the_stripe_sdk_passes() -> None:
    payload = '{"id": "evt_1", "note": "caf\u00e9"}'
    header = stripe.WebhookSignature.generate_signature_header(payload, SECRET, timestamp=NOW)
    verify_signature(payload.encode(), header, SECRET, tolerance=TOLERANCE, now=NOW)


def test_our_signature_passes_the_stripe_sdk() -> None:
    payload = b'{"id": "evt_1", "object": "event", "type": "ping", "data": {"object": {}}}'
    now = int(time.time())
    event = stripe.Webhook.construct_event(payload, sign(payload, timestamp=now), SECRET, tolerance=300)
    assert event.id == "evt_1"
    verify_signature(payload, sign(payload, timestamp=now), SECRET, tolerance=TOLERANCE, now=now)


def _sdk_accepts(payload: bytes, header: str, secret: str) -> bool:
    try:
        stripe.WebhookSignature.verify_header(payload, header, secret, 300)
    except stripe.SignatureVerificationError:
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(
    header=st.text(max_size=300)
    | st.integers(min_value=0, max_value=6000).map(lambda n: f"t={'9' * n},v1={'0' * 64}")
    | st.builds(lambda t, v: f"t={t},v1={v}", st.text(max_size=30), st.text(max_size=70)),
    payload=st.binary(max_size=100),
)
def test_any_signature_header_is_verified_or_refused_with_a_signature_error(header: str, payload: bytes) -> None:
    with contextlib.suppress(SignatureError):
        verify_signature(payload, header, SECRET, tolerance=TOLERANCE, now=NOW)


def test_a_timestamp_of_thousands_of_digits_is_malformed() -> None:
    with pytest.raises(SignatureError, match="malformed"):
        verify_signature(b"{}", f"t={'9' * 5000},v1={'0' * 64}", SECRET, tolerance=TOLERANCE, now=NOW)


def _we_accept(payload: bytes, header: str, secret: str) -> bool:
    try:
        verify_signature(payload, header, secret, tolerance=TOLERANCE, now=time.time())
    except SignatureError:
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(
    body=st.text(max_size=200),
    secret=st.text(st.characters(codec="ascii", exclude_characters="\x00"), min_size=1, max_size=40),
    signer=st.sampled_from(["same", "other", "sdk"]),
    age=st.integers(min_value=0, max_value=1000),
)
def test_same_verdict_as_the_stripe_sdk(body: str, secret: str, signer: str, age: int) -> None:
    if not secret.strip():
        secret = "whsec_" + secret
    payload = body.encode()
    timestamp = int(time.time()) - age
    if signer == "sdk":
        header = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp)
    else:
        header = sign(payload, secret if signer == "same" else secret + "x", timestamp)
    assert _we_accept(payload, header, secret) == _sdk_accepts(payload, header, secret)


def test_several_v1_entries_one_matching_passes() -> None:
    payload = b"{}"
    good = sign(payload).split(",")[1]
    header = f"t={NOW},v1={'0' * 64},{good},v0=abc"
    verify_signature(payload, header, SECRET, tolerance=TOLERANCE, now=NOW)
    assert _sdk_accepts_at(payload, header)


def _sdk_accepts_at(payload: bytes, header: str) -> bool:
    try:
        stripe.WebhookSignature.verify_header(payload, header, SECRET, tolerance=None)
    except stripe.SignatureVerificationError:
        return False
    return True


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "no Stripe-Signature header"),
        ("", "no Stripe-Signature header"),
        ("garbage", "malformed"),
        ("t=abc,v1=00", "malformed"),
        ("v1=00", "malformed"),
        (f"t={NOW},t={NOW},v1=00", "malformed"),
        (f"t={NOW},v0=00", "no v1 signature"),
        (f"t={NOW},v1={'0' * 64},v1={'1' * 64}", "no signature matches"),
        (f"t={NOW},v1=\u00e9\u00e9", "no signature matches"),
    ],
)
def test_bad_headers_are_refused(header: str | None, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        verify_signature(b"{}", header, SECRET, tolerance=TOLERANCE, now=NOW)
    if header and header.isascii():  # the SDK raises TypeError on non-ASCII signatures
        assert not _sdk_accepts_at(b"{}", header)


def test_wrong_secret_is_refused() -> None:
    payload = b"{}"
    with pytest.raises(SignatureError, match="no signature matches"):
        verify_signature(payload, sign(payload, secret="whsec_other"), SECRET, tolerance=TOLERANCE, now=NOW)


def test_altered_body_is_refused() -> None:
    with pytest.raises(SignatureError, match="no signature matches"):
        verify_signature(b'{"a": 2}', sign(b'{"a": 1}'), SECRET, tolerance=TOLERANCE, now=NOW)


def test_stale_timestamp_is_refused() -> None:
    payload = b"{}"
    verify_signature(payload, sign(payload, timestamp=NOW - 300), SECRET, tolerance=TOLERANCE, now=NOW)
    with pytest.raises(SignatureError, match="older than the tolerance"):
        verify_signature(payload, sign(payload, timestamp=NOW - 301), SECRET, tolerance=TOLERANCE, now=NOW)


def test_future_timestamp_is_refused() -> None:
    payload = b"{}"
    verify_signature(payload, sign(payload, timestamp=NOW + 300), SECRET, tolerance=TOLERANCE, now=NOW)
    with pytest.raises(SignatureError, match="in the future"):
        verify_signature(payload, sign(payload, timestamp=NOW + 301), SECRET, tolerance=TOLERANCE, now=NOW)


# --- error reports ----------------------------------------------------------------------------------


def _headers(record: ReportRecord) -> dict[str, bytes]:
    return dict(record.headers)


@pytest.mark.parametrize("event_type", [ERROR_REPORT_TRIGGERED, NO_METER_FOUND])
def test_inline_report_gives_one_record_per_identifier(event_type: str) -> None:
    records = error_report_records(inline_event(event_type), version="1.2.3")
    assert [r.key for r in records] == [b"id-1", b"id-2", b"id-3"]
    first = orjson.loads(records[0].value)
    assert first == {
        "identifier": "id-1",
        "code": "meter_event_customer_not_found",
        "error_message": "Customer cus_1 not found",
        "event_type": event_type,
        "event_id": "evt_inline",
        "meter": "mtr_123",
        "validation_start": "2026-11-21T05:00:00.000Z",
        "validation_end": "2026-11-21T05:01:00.250Z",
    }
    assert records[0].headers == [
        (dlq_format.REASON, b"stripe_async_error"),
        (dlq_format.STRIPE_CODE, b"meter_event_customer_not_found"),
        (dlq_format.MESSAGE, b"Customer cus_1 not found"),
        (dlq_format.IDENTIFIER, b"id-1"),
        (dlq_format.VERSION, b"1.2.3"),
        (dlq_format.FIRST_FAILURE_AT, b"2026-11-21T05:00:00.000Z"),
        (dlq_format.LAST_FAILURE_AT, b"2026-11-21T05:01:00.250Z"),
    ]
    assert _headers(records[2])[dlq_format.STRIPE_CODE] == b"meter_event_invalid_value"


@pytest.mark.parametrize("event_type", [ERROR_REPORT_TRIGGERED, NO_METER_FOUND])
def test_snapshot_report_gives_the_same_records(event_type: str) -> None:
    records = error_report_records(snapshot_event(event_type), version="1.2.3")
    assert [r.key for r in records] == [b"id-1", b"id-2", b"id-3"]
    value = orjson.loads(records[1].value)
    assert value["meter"] == "mtr_456"
    assert value["event_id"] == "evt_snapshot"
    assert value["validation_start"] == "2026-11-18T11:06:40.000Z"
    assert _headers(records[1])[dlq_format.LAST_FAILURE_AT] == b"2026-11-18T11:07:40.000Z"


def test_samples_without_identifier_are_left_out() -> None:
    event = inline_event()
    samples = event["data"]["reason"]["error_types"][1]["sample_errors"]
    samples.extend([{"error_message": "x"}, {"error_message": "y", "request": {}}])
    assert [r.key for r in error_report_records(event, version="v")] == [b"id-1", b"id-2", b"id-3"]


def test_missing_validation_times_and_meter_are_null() -> None:
    event = inline_event()
    del event["related_object"], event["data"]["validation_start"], event["data"]["validation_end"]
    record = error_report_records(event, version="v")[0]
    value = orjson.loads(record.value)
    assert value["meter"] is None
    assert value["validation_start"] is None
    assert dlq_format.FIRST_FAILURE_AT not in _headers(record)


def _broken(change: str) -> dict[str, Any]:
    event = inline_event()
    data = event["data"]
    if change == "no data":
        del event["data"]
    elif change == "no reason":
        del data["reason"]
    elif change == "error_types not a list":
        data["reason"]["error_types"] = {}
    elif change == "no code":
        del data["reason"]["error_types"][0]["code"]
    elif change == "sample not an object":
        data["reason"]["error_types"][0]["sample_errors"] = ["id-1"]
    elif change == "bad validation_start":
        data["validation_start"] = "yesterday"
    elif change == "naive validation_end":
        data["validation_end"] = "2026-11-21T05:00:00"
    elif change == "other type":
        event["type"] = "customer.created"
    return event


@pytest.mark.parametrize(
    "change",
    [
        "no data",
        "no reason",
        "error_types not a list",
        "no code",
        "sample not an object",
        "bad validation_start",
        "naive validation_end",
        "other type",
    ],
)
def test_malformed_reports_raise(change: str) -> None:
    with pytest.raises(WebhookPayloadError):
        error_report_records(_broken(change), version="v")


# --- the app ----------------------------------------------------------------------------------------


class RecordingSender:
    """The producer boundary: records every acknowledged send."""

    def __init__(self, fail_from: int | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.calls = 0
        self._fail_from = fail_from

    async def send_and_wait(  # noqa: PLR0917 - aiokafka's signature
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.calls += 1
        if self._fail_from is not None and self.calls >= self._fail_from:
            raise ConnectionError("broker unreachable")
        self.sent.append({"topic": topic, "key": key, "value": value, "headers": headers})


@contextlib.asynccontextmanager
async def serve(sender: RecordingSender, metrics: Metrics, wall_time: Any = lambda: NOW) -> AsyncIterator[TestClient]:
    app = webhook_app(
        secret=SECRET, tolerance=TOLERANCE, sender=sender, topic=TOPIC, metrics=metrics, wall_time=wall_time
    )
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


async def post(client: TestClient, event: Any, *, secret: str = SECRET) -> tuple[int, dict[str, Any]]:
    body = event if isinstance(event, bytes) else orjson.dumps(event)
    response = await client.post(PATH, data=body, headers={"Stripe-Signature": sign(body, secret)})
    return response.status, await response.json()


def webhook_count(metrics: Metrics, event_type: str, outcome: str) -> float | None:
    labels = {"type": event_type, "outcome": outcome}
    return metrics.registry.get_sample_value("ingestor_webhook_events_total", labels)


async def test_error_report_is_written_before_200() -> None:
    sender, metrics = RecordingSender(), Metrics()
    async with serve(sender, metrics) as client:
        status, body = await post(client, inline_event())
    assert (status, body["outcome"]) == (200, "written")
    assert [(s["topic"], s["key"]) for s in sender.sent] == [(TOPIC, b"id-1"), (TOPIC, b"id-2"), (TOPIC, b"id-3")]
    assert dict(sender.sent[0]["headers"])[dlq_format.REASON] == b"stripe_async_error"
    assert webhook_count(metrics, ERROR_REPORT_TRIGGERED, "written") == 1
    sample = metrics.registry.get_sample_value
    assert sample("ingestor_error_report_records_total", {"code": "meter_event_customer_not_found"}) == 2
    assert sample("ingestor_error_report_records_total", {"code": "meter_event_invalid_value"}) == 1


async def test_snapshot_no_meter_found_is_written() -> None:
    sender, metrics = RecordingSender(), Metrics()
    async with serve(sender, metrics) as client:
        status, _ = await post(client, snapshot_event(NO_METER_FOUND))
    assert status == 200
    assert len(sender.sent) == 3
    assert webhook_count(metrics, NO_METER_FOUND, "written") == 1


async def test_bad_signature_is_400_and_writes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    sender, metrics = RecordingSender(), Metrics()
    async with serve(sender, metrics) as client:
        status, body = await post(client, inline_event(), secret="whsec_wrong")
        unsigned = await client.post(PATH, data=b"{}")
    assert (status, body["outcome"]) == (400, "bad_signature")
    assert unsigned.status == 400
    assert sender.sent == []
    assert webhook_count(metrics, "unknown", "bad_signature") == 2
    assert SECRET not in caplog.text


async def test_stale_delivery_is_400() -> None:
    sender, metrics = RecordingSender(), Metrics()
    async with serve(sender, metrics, wall_time=lambda: NOW + TOLERANCE + 1) as client:
        status, _ = await post(client, inline_event())
    assert status == 400
    assert sender.sent == []


async def test_garbage_body_is_400() -> None:
    sender, metrics = RecordingSender(), Metrics()
    async with serve(sender, metrics) as client:
        not_json, _ = await post(client, b"not json")
        not_object, _ = await post(client, b"[1, 2]")
        broken, _ = await post(client, _broken("no reason"))
    assert (not_json, not_object, broken) == (400, 400, 400)
    assert webhook_count(metrics, "unknown", "bad_payload") == 2
    assert webhook_count(metrics, ERROR_REPORT_TRIGGERED, "bad_payload") == 1


async def test_other_event_types_are_ignored() -> None:
    sender, metrics = RecordingSender(), Metrics()
    async with serve(sender, metrics) as client:
        status, body = await post(client, {"id": "evt_2", "type": "customer.created", "data": {"object": {}}})
    assert (status, body["outcome"]) == (200, "ignored")
    assert sender.sent == []
    assert webhook_count(metrics, "customer.created", "ignored") == 1


async def test_body_over_one_mib_is_413() -> None:
    sender, metrics = RecordingSender(), Metrics()
    async with serve(sender, metrics) as client:
        body = b" " * (MAX_BODY_BYTES + 1)
        response = await client.post(PATH, data=io.BytesIO(body), headers={"Stripe-Signature": sign(body)})
    assert response.status == 413
    assert webhook_count(metrics, "unknown", "too_large") == 1


async def test_kafka_failure_is_503_and_redelivery_loses_nothing() -> None:
    flaky, metrics = RecordingSender(fail_from=2), Metrics()
    event = inline_event()
    async with serve(flaky, metrics) as client:
        status, body = await post(client, event)
    assert (status, body["outcome"]) == (503, "kafka_error")
    assert webhook_count(metrics, ERROR_REPORT_TRIGGERED, "kafka_error") == 1
    assert metrics.registry.get_sample_value("ingestor_error_report_records_total", {"code": "x"}) is None

    healthy = RecordingSender()
    async with serve(healthy, metrics) as client:
        status, _ = await post(client, copy.deepcopy(event))
    assert status == 200
    delivered = {s["key"] for s in flaky.sent + healthy.sent}
    assert delivered == {b"id-1", b"id-2", b"id-3"}
    assert {s["key"] for s in healthy.sent} == delivered


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="secret"):
        webhook_app(secret="", tolerance=TOLERANCE, sender=RecordingSender(), topic=TOPIC, metrics=Metrics())


# --- with the project's Stripe emulator as the sender -------------------------------------------------

API_KEY = "sk_test_webhookTests000000000000"


async def _stripe(http: Any, base: str, method: str, path: str, token: str = API_KEY, **kwargs: Any) -> Any:
    async with http.request(method, base + path, headers={"Authorization": f"Bearer {token}"}, **kwargs) as resp:
        assert resp.status < 300, await resp.text()
        return await resp.json() if resp.content_length != 0 else None


async def test_emulator_webhooks_arrive_at_the_sender() -> None:
    import aiohttp  # noqa: PLC0415 - only this test is an HTTP client

    from ingestor_dev.emulator import Emulator, EmulatorConfig  # noqa: PLC0415 - the emulator is a test peer

    sender, metrics = RecordingSender(), Metrics()
    app = webhook_app(secret=SECRET, tolerance=TOLERANCE, sender=sender, topic=TOPIC, metrics=metrics)
    async with TestServer(app, host="127.0.0.1") as server:
        config = EmulatorConfig(webhook_url=str(server.make_url(PATH)), webhook_secret=SECRET, customers={"cus_ok"})
        async with Emulator(config) as emulator, aiohttp.ClientSession() as http:
            form = {"display_name": "calls", "event_name": "calls", "default_aggregation[formula]": "sum"}
            meter = await _stripe(http, emulator.url, "POST", "/v1/billing/meters", data=form)
            session = await _stripe(http, emulator.url, "POST", "/v2/billing/meter_event_session")
            events = [
                {
                    "event_name": "calls",
                    "identifier": "ok-1",
                    "payload": {"stripe_customer_id": "cus_ok", "value": "1"},
                },
                {
                    "event_name": "calls",
                    "identifier": "bad-1",
                    "payload": {"stripe_customer_id": "cus_x", "value": "1"},
                },
                {
                    "event_name": "calls",
                    "identifier": "bad-2",
                    "payload": {"stripe_customer_id": "cus_y", "value": "2"},
                },
                {
                    "event_name": "nope",
                    "identifier": "bad-3",
                    "payload": {"stripe_customer_id": "cus_ok", "value": "1"},
                },
            ]
            token = session["authentication_token"]
            path = "/v2/billing/meter_event_stream"
            await _stripe(http, emulator.url, "POST", path, token=token, json={"events": events})
            await emulator.wait_webhooks()
            stats = await emulator.stats()
    assert stats["webhooks_sent"] == 2, stats
    by_key = {s["key"]: orjson.loads(s["value"]) for s in sender.sent}
    assert set(by_key) == {b"bad-1", b"bad-2", b"bad-3"}
    assert by_key[b"bad-1"]["code"] == "meter_event_customer_not_found"
    assert by_key[b"bad-1"]["event_type"] == ERROR_REPORT_TRIGGERED
    assert by_key[b"bad-1"]["meter"] == meter["id"]
    assert by_key[b"bad-3"]["event_type"] == NO_METER_FOUND
    assert by_key[b"bad-3"]["meter"] is None
    assert by_key[b"bad-3"]["code"] == "no_meter"
    assert webhook_count(metrics, ERROR_REPORT_TRIGGERED, "written") == 1
    assert webhook_count(metrics, NO_METER_FOUND, "written") == 1
