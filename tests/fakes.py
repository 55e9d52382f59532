"""Fakes at the boundaries, shared by the tests: a virtual clock that tests move by hand, a loopback HTTP
server and a Stripe HTTP layer over a real aiohttp session."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from ingestor.observability import start_site
from ingestor.settings import DEFAULT_STRIPE_VERSION as STRIPE_VERSION
from ingestor.stream_transport import Http1Transport
from ingestor.stripe_http import AiohttpTransport, StripeHttp

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


#: Event-loop turns `FakeClock.advance` gives woken tasks to run before it looks at the clock again.
SETTLE_TURNS = 50


async def settle(turns: int = SETTLE_TURNS) -> None:
    """Let every runnable task run until it blocks again (tasks chained up to ``turns`` deep)."""
    for _ in range(turns):
        await asyncio.sleep(0)


class FakeClock:
    """A `ingestor.clock.Clock` whose time moves only in `advance`; sleepers wake in deadline order."""

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self.now = start
        self.wall_offset = wall_offset
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall_offset + self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._seq), future))
        await future

    @property
    def sleepers(self) -> int:
        """Sleeps still pending (cancelled ones excluded)."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    def next_deadline(self) -> float | None:
        live = [deadline for deadline, _, future in self._sleepers if not future.done()]
        return min(live, default=None)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking each sleeper at its deadline, in order."""
        target = self.now + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            if future.done():
                continue
            self.now = max(self.now, deadline)
            future.set_result(None)
            await settle()
        self.now = max(self.now, target)
        await settle()


@contextlib.asynccontextmanager
async def loopback(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 (an ephemeral port); yields its base URL."""
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def add_landing(app: web.Application, body: bytes) -> list[str]:
    """`/landing` (any method) answers `body` as JSON and records each caller's method: where a redirect
    points, so that a test can show nothing followed it."""
    landed: list[str] = []

    async def landing(request: web.Request) -> web.Response:
        landed.append(request.method)
        return web.Response(body=body, content_type="application/json")

    app.router.add_route("*", "/landing", landing)
    return landed


@contextlib.asynccontextmanager
async def stripe_http(
    base: str, *, api_key: str = "sk_test_x", timeout: float = 5.0, transport: str = "aiohttp"
) -> AsyncIterator[StripeHttp]:
    """The production Stripe HTTP layer against `base`, over aiohttp's client (`aiohttp`) or the stream
    request's own (`http1`, `ingestor.stream_transport`)."""
    async with aiohttp.ClientSession() as session:
        lean = Http1Transport(4) if transport == "http1" else None
        try:
            yield StripeHttp(
                lean or AiohttpTransport(session), base, stripe_version=STRIPE_VERSION, timeout=timeout, api_key=api_key
            )
        finally:
            if lean is not None:
                await lean.close()
