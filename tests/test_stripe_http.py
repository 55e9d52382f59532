"""ingestor.stripe_http: the headers every call carries, its timeout, error bodies read one way, no secret leaks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from ingestor.errors import StripeUnreachable
from ingestor.stream_client import Outcome, StreamClient, classify
from ingestor.stripe_http import USER_AGENT, ErrorDetails, StripeHttp, read_error
from tests.fakes import STRIPE_VERSION, loopback, stripe_http

if TYPE_CHECKING:
    from collections.abc import Mapping

KEY = "sk_test_51SecretKeyThatMustNeverLeak"
TOKEN = "ek_test_SessionTokenThatMustNeverLeak"


@dataclass
class Recording:
    """A `Transport` that records each request and answers `answer` (or raises `error`)."""

    answer: tuple[int, dict[str, str], bytes] = (200, {}, b"{}")
    error: BaseException | None = None
    calls: list[tuple[str, str, dict[str, str], bytes | None, float]] = field(default_factory=list)

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, timeout: float
    ) -> tuple[int, dict[str, str], bytes]:
        self.calls.append((method, url, dict(headers), body, timeout))
        if self.error is not None:
            raise self.error
        return self.answer


def api(transport: Recording, base: str = "https://api.stripe.test/") -> StripeHttp:
    return StripeHttp(transport, base, stripe_version=STRIPE_VERSION, timeout=7.5, api_key=KEY)


# --- requests -----------------------------------------------------------------------------------------


async def test_an_api_call_carries_the_key_the_version_the_user_agent_and_the_timeout() -> None:
    transport = Recording()
    reply = await api(transport).request("GET", "/v1/billing/meters", params={"limit": "100", "starting_after": "m 1"})
    [(method, url, headers, body, timeout)] = transport.calls
    assert (method, url, body, timeout) == (
        "GET",
        "https://api.stripe.test/v1/billing/meters?limit=100&starting_after=m+1",
        None,
        7.5,
    )
    assert headers == {"Authorization": f"Bearer {KEY}", "Stripe-Version": STRIPE_VERSION, "User-Agent": USER_AGENT}
    assert (reply.status, reply.body) == (200, b"{}")


async def test_a_post_with_a_body_is_json_and_carries_its_idempotency_key() -> None:
    transport = Recording()
    await api(transport).request("POST", "/v2/billing/meter_event_adjustments", body=b"{}", idempotency_key="idem-1")
    headers = transport.calls[0][2]
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == "idem-1"


async def test_a_session_token_replaces_the_key() -> None:
    transport = Recording()
    events = StripeHttp(transport, "https://meter-events.stripe.test", stripe_version=STRIPE_VERSION, timeout=1.0)
    await StreamClient(events).send(b'{"events": []}', TOKEN)
    [(method, url, headers, body, timeout)] = transport.calls
    assert (method, url, body, timeout) == (
        "POST",
        "https://meter-events.stripe.test/v2/billing/meter_event_stream",
        b'{"events": []}',
        1.0,
    )
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Idempotency-Key" not in headers


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TimeoutError(), "timeout"),
        (aiohttp.ServerTimeoutError("read timed out"), "timeout"),
        (ConnectionRefusedError(111, f"refused for {KEY}"), "connection_error"),
        (aiohttp.ClientConnectionError(f"Bearer {TOKEN} dropped"), "connection_error"),
        (aiohttp.ClientPayloadError("truncated"), "connection_error"),
    ],
)
async def test_no_answer_is_stripe_unreachable_without_a_secret(error: BaseException, code: str) -> None:
    transport = Recording(error=error)
    with pytest.raises(StripeUnreachable) as caught:
        await api(transport).request("POST", "/v2/billing/meter_event_session")
    assert caught.value.code == code
    assert caught.value.retriable
    assert "/v2/billing/meter_event_session" in str(caught.value)
    for secret in (KEY, TOKEN):
        assert secret not in str(caught.value)


async def test_the_stream_retries_when_there_is_no_answer() -> None:
    events = StripeHttp(Recording(error=TimeoutError()), "https://x.test", stripe_version="v", timeout=1.0)
    answer = await StreamClient(events).send(b"{}", TOKEN)
    assert (answer.outcome, answer.status, answer.code) == (Outcome.RETRY, 0, "timeout")


async def test_the_aiohttp_transport_times_out_each_request() -> None:
    release = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=b"{}")

    app = web.Application()
    app.router.add_get("/v1/billing/meters", hang)
    async with loopback(app) as base, stripe_http(base, timeout=0.1) as http:
        try:
            with pytest.raises(StripeUnreachable) as caught:
                await http.request("GET", "/v1/billing/meters")
        finally:
            release.set()
    assert caught.value.code == "timeout"


async def test_the_aiohttp_transport_returns_an_error_answer_and_its_headers() -> None:
    async def refuse(_: web.Request) -> web.Response:
        body = {"error": {"type": "invalid_request_error", "code": "api_key_expired", "message": f"Expired: {KEY}"}}
        return web.Response(status=401, body=orjson.dumps(body), headers={"Request-Id": "req_1"})

    app = web.Application()
    app.router.add_post("/v2/billing/meter_event_session", refuse)
    async with loopback(app) as base, stripe_http(base, api_key=KEY) as http:
        reply = await http.request("POST", "/v2/billing/meter_event_session")
        error = http.error(reply)
    assert (error.status, error.type, error.code, error.request_id) == (
        401,
        "invalid_request_error",
        "api_key_expired",
        "req_1",
    )
    assert error.message == "Expired: [redacted]"


# --- error bodies -------------------------------------------------------------------------------------


def test_a_v2_error_and_its_headers() -> None:
    body = orjson.dumps(
        {
            "error": {
                "type": "temporary_session_expired",
                "code": "billing_meter_event_session_expired",
                "message": "The session has expired.",
                "doc_url": "https://docs.stripe.com/error-codes",
            }
        }
    )
    headers = {
        "Stripe-Should-Retry": "false",
        "Retry-After": "2.5",
        "Stripe-Rate-Limited-Reason": "global-rate",
        "Request-Id": "req_9",
    }
    assert read_error(401, headers, body) == ErrorDetails(
        401,
        "temporary_session_expired",
        "billing_meter_event_session_expired",
        "The session has expired.",
        should_retry=False,
        retry_after=2.5,
        rate_limited_reason="global-rate",
        request_id="req_9",
    )


def test_a_v1_error() -> None:
    body = orjson.dumps({"error": {"type": "invalid_request_error", "message": "No such meter", "param": "id"}})
    error = read_error(404, {"Stripe-Should-Retry": "TRUE"}, body)
    assert (error.type, error.code, error.code_or_type, error.message) == (
        "invalid_request_error",
        "",
        "invalid_request_error",
        "No such meter",
    )
    assert error.should_retry is True


@pytest.mark.parametrize(
    ("headers", "should_retry", "retry_after"),
    [({}, None, None), ({"Stripe-Should-Retry": "maybe", "Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}, None, None)],
)
def test_headers_that_say_nothing(
    headers: dict[str, str], should_retry: bool | None, retry_after: float | None
) -> None:
    error = read_error(503, headers, b"")
    assert (error.should_retry, error.retry_after) == (should_retry, retry_after)


def test_a_redirect_keeps_where_it_pointed() -> None:
    error = read_error(302, {"Location": "https://login.example/" + "x" * 500}, b"")
    assert error.location.startswith("https://login.example/")
    assert len(error.location) == 200


@pytest.mark.parametrize(
    "body", [b"<html>bad gateway</html>", b"[]", b'{"error": "x"}', b'"text"', b"null", b'{"error": {"code": 5}}']
)
def test_a_body_that_is_not_a_stripe_error(body: bytes) -> None:
    error = read_error(502, {}, body)
    assert (error.type, error.code) == ("", "")
    assert error.message in {body.decode(), ""}


def test_secrets_are_redacted_from_messages() -> None:
    message = f"Expired API Key provided: {KEY}. Also sk_live_abc***1234, rk_test_x and Bearer {TOKEN}; key k-123"
    error = read_error(401, {}, orjson.dumps({"error": {"message": message}}), secrets=("k-123",))
    for secret in (KEY, TOKEN, "sk_live_abc", "rk_test_x", "k-123"):
        assert secret not in error.message
    assert error.message.startswith("Expired API Key provided: [redacted]")


def test_the_streams_answers_never_carry_a_token() -> None:
    body = orjson.dumps({"error": {"code": "invalid", "message": f"token Bearer {TOKEN} is not valid, {TOKEN}"}})
    for status in (400, 401, 500):
        assert TOKEN not in classify(status, {}, body).message


@given(
    st.integers(100, 599),
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(["Retry-After", "Stripe-Should-Retry", "Location"]), st.text(max_size=30)),
)
def test_any_answer_reads_into_error_details(status: int, body: bytes, headers: dict[str, Any]) -> None:
    error = read_error(status, headers, body)
    assert error.status == status
    assert error.retry_after is None or error.retry_after >= 0.0
