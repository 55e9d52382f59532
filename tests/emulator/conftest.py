"""Shared fixtures: an in-process emulator on 127.0.0.1:0 and an HTTP client, per test."""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import pytest_asyncio

from ingestor_dev.emulator import Emulator, EmulatorConfig
from ingestor_dev.emulator.timefmt import format_rfc3339

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

TEST_KEY = "sk_test_emulator0001"
LIVE_KEY = "sk_live_emulator0001"
STREAM = "/v2/billing/meter_event_stream"


@dataclass
class FakeClock:
    now: float = field(default_factory=lambda: float(int(time.time())))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def event(
    identifier: str, value: str = "1", *, customer: str = "cus_1", name: str = "api_call", **extra: Any
) -> dict[str, Any]:
    payload = {"stripe_customer_id": customer, "value": value}
    result: dict[str, Any] = {"event_name": name, "identifier": identifier, "payload": payload}
    result.update(extra)
    return result


def stamp(unix: float) -> str:
    return format_rfc3339(unix)


class Api:
    """A thin client for the tests: each method is one HTTP call against the emulator."""

    def __init__(self, http: aiohttp.ClientSession, emu: Emulator) -> None:
        self.http = http
        self.emu = emu
        self.url = emu.url

    async def call(
        self,
        method: str,
        path: str,
        *,
        key: str | None = TEST_KEY,
        json: Any = None,
        form: dict[str, str] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        all_headers = dict(headers or {})
        if key is not None:
            all_headers.update(auth(key))
        body: Any = data
        if form is not None:
            body = urllib.parse.urlencode(form)
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        async with self.http.request(
            method, self.url + path, json=json, data=body, headers=all_headers, params=params
        ) as response:
            payload = await response.json(content_type=None) if response.content_length != 0 else None
            return response.status, payload, response.headers

    async def meter(
        self, name: str = "api_call", formula: str = "sum", key: str = TEST_KEY, **extra: str
    ) -> dict[str, Any]:
        form = {"display_name": name, "event_name": name, "default_aggregation[formula]": formula, **extra}
        status, body, _ = await self.call("POST", "/v1/billing/meters", form=form, key=key)
        assert status == 200, body
        return body

    async def session(self, key: str = TEST_KEY) -> str:
        status, body, _ = await self.call("POST", "/v2/billing/meter_event_session", key=key)
        assert status == 200, body
        return str(body["authentication_token"])

    async def stream(self, token: str, events: list[dict[str, Any]]) -> tuple[int, Any, Any]:
        return await self.call("POST", STREAM, key=token, json={"events": events})

    async def summaries(self, meter_id: str, customer: str, start: int, end: int, **extra: Any) -> tuple[int, Any]:
        params = {"customer": customer, "start_time": start, "end_time": end, **extra}
        status, body, _ = await self.call("GET", f"/v1/billing/meters/{meter_id}/event_summaries", params=params)
        return status, body


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def config() -> EmulatorConfig:
    return EmulatorConfig(stream_rps_limit=0)


@pytest_asyncio.fixture(loop_scope="function")
async def emu(config: EmulatorConfig) -> AsyncIterator[Emulator]:
    async with Emulator(config, host="127.0.0.1", port=0) as emulator:
        yield emulator


@pytest_asyncio.fixture(loop_scope="function")
async def api(emu: Emulator) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as http:
        yield Api(http, emu)
