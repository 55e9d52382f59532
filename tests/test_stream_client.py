"""The stream client over real HTTP on 127.0.0.1: only Stripe's own answer counts, redirects are not followed."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from ingestor.stream_client import STREAM_PATH, Outcome, StreamClient
from tests.fakes import add_landing, loopback, stripe_http

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

BODY = b'{"events": [{"event_name": "e", "payload": {"stripe_customer_id": "cus_1", "value": "1"}}]}'


@contextlib.asynccontextmanager
async def stream_server(answer: web.Response) -> AsyncIterator[tuple[str, list[str]]]:
    """The stream path answers `answer`; `/landing` (any method) answers Stripe's `200 {}` and is recorded."""

    async def stream(_: web.Request) -> web.Response:
        return answer

    app = web.Application()
    app.router.add_post(STREAM_PATH, stream)
    landed = add_landing(app, b"{}")
    async with loopback(app) as base:
        yield base, landed


#: the stream request's own client (the worker's) and aiohttp's, the reference
KINDS = pytest.mark.parametrize("kind", ["http1", "aiohttp"])


@KINDS
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_not_followed_and_is_an_unexpected_answer(kind: str, status: int) -> None:
    async with (
        stream_server(web.Response(status=status, headers={"Location": "/landing"})) as (base, landed),
        stripe_http(base, transport=kind) as http,
    ):
        answer = await StreamClient(http).send(BODY, "ek_test_x")
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
    async with stream_server(answer()) as (base, _), stripe_http(base, transport=kind) as http:
        got = await StreamClient(http).send(BODY, "ek_test_x")
    assert got.outcome is outcome
