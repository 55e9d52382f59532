"""Delivering error reports to a webhook endpoint, signed like Stripe, in order, off the hot path."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from ingestor_dev.emulator.reports import webhook_event
from ingestor_dev.emulator.signature import signature_header

if TYPE_CHECKING:
    from ingestor_dev.emulator.config import Clock
    from ingestor_dev.emulator.ids import IdFactory
    from ingestor_dev.emulator.state import EmulatorState

logger = logging.getLogger(__name__)

ATTEMPTS = 3
BACKOFF_S = 0.2
TIMEOUT_S = 5.0


class WebhookSender:
    def __init__(self, url: str, secret: str, clock: Clock, ids: IdFactory, state: EmulatorState) -> None:
        self._url = url
        self._secret = secret
        self._clock = clock
        self._ids = ids
        self._state = state
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def enqueue(self, reports: list[dict[str, Any]]) -> None:
        for report in reports:
            self._queue.put_nowait(webhook_event(report, self._ids.new("evt_"), int(self._clock())))

    async def drain(self) -> None:
        """Wait until every queued webhook was delivered (or given up on)."""
        await self._queue.join()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                event = await self._queue.get()
                try:
                    await self._deliver(session, event)
                finally:
                    self._queue.task_done()

    async def _deliver(self, session: aiohttp.ClientSession, event: dict[str, Any]) -> None:
        payload = orjson.dumps(event).decode()
        for attempt in range(ATTEMPTS):
            # Signed with the real time: receivers check it against their own clock.
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": signature_header(payload, self._secret, int(time.time())),
            }
            try:
                async with session.post(self._url, data=payload.encode(), headers=headers) as response:
                    if response.status < 300:
                        self._state.stats.webhooks_sent += 1
                        return
            except (aiohttp.ClientError, TimeoutError):
                logger.warning("webhook delivery failed (attempt %d)", attempt + 1)
            await asyncio.sleep(BACKOFF_S * (attempt + 1))
        self._state.stats.webhooks_failed += 1
