"""The stream client over real HTTP on 127.0.0.1: only Stripe's own answer counts, redirects are not followed."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web

from ingestor.stream_client import STREAM_PATH, AiohttpTransport, Outcome, StreamClient, Transport
from ingestor.stream_transport import Http1Transport

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

BODY = b'{"events": [{"event_name": "e", "payload": {"stripe_customer_id": "cus_1", "value": "1"}}]}'


@contextlib.asynccontextmanager
async def stream_server(answer: web.Response) -> AsyncIterator[tuple[str, list[str]]]:
    """The stream path answers `answer`; `/landing` (any method) answers Stripe's `200 {}` and is recorded."""
    landed: list[str] = []

    async def stream(_: web.Request) -> web.Response:
        return answer

    async def landing(request: web.Request) -> web.Response:
        landed.append(request.method)
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application()
    app.router.add_post(STREAM_PATH, stream)
    app.router.add_route("*", "/landing", landing)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", landed
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def transport(kind: str) -> AsyncIterator[Transport]:
    """The worker's stream transport (`http1`) or aiohttp's client, the reference (`aiohttp`)."""
    if kind == "aiohttp":
        async with aiohttp.ClientSession() as http:
            yield AiohttpTransport(http, 5.0)
    else:
        lean = Http1Transport(5.0, 4)
        try:
            yield lean
        finally:
            await lean.close()


KINDS = pytest.mark.parametrize("kind", ["http1", "aiohttp"])


@KINDS
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_not_followed_and_is_an_unexpected_answer(kind: str, status: int) -> None:
    async with (
        stream_server(web.Response(status=status, headers={"Location": "/landing"})) as (base, landed),
        transport(kind) as http,
    ):
        answer = await StreamClient(http, base, "2026-06-24.dahlia").send(BODY, "ek_test_x")
    assert answer.outcome is Outcome.UNEXPECTED
    assert answer.status == status
    assert "/landing" in answer.message
    assert landed == []


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (lambda: web.Response(body=b"{}", content_type="application/json"), Outcome.ACCEPTED),
        (lambda: web.Response(text="<html>proxy</html>", content_type="text/html"), Outcome.UNEXPECTED),
        (lambda: web.Response(status=204), Outcome.UNEXPECTED),
    ],
)
@KINDS
async def test_only_stripes_own_success_counts(kind: str, answer: Callable[[], web.Response], outcome: Outcome) -> None:
    async with stream_server(answer()) as (base, _), transport(kind) as http:
        got = await StreamClient(http, base, "2026-06-24.dahlia").send(BODY, "ek_test_x")
    assert got.outcome is outcome
