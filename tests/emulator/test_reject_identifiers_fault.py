"""The emulator's `reject_identifiers` fault: a synchronous 400 for events the worker cannot check locally."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from ingestor_dev.emulator import Emulator, EmulatorConfig
from ingestor_dev.emulator.faults import Faults, faults_from_json, first_rejected

KEY = "sk_test_rejectIdentifiersFault000000000"


def test_first_rejected_finds_the_first_match_and_is_off_by_default():
    ids = ["ok-1", "bad-2", "ok-3", "bad-4"]
    assert first_rejected(Faults(), ids) is None
    assert first_rejected(Faults(reject_identifiers="^bad-"), ids) == 1
    assert first_rejected(Faults(reject_identifiers="^nothing$"), ids) is None
    assert not Faults(reject_identifiers="").active
    assert Faults(reject_identifiers="x").active


def test_an_invalid_pattern_is_refused():
    with pytest.raises(ValueError, match="reject_identifiers"):
        Faults(reject_identifiers="(unclosed")
    with pytest.raises(ValueError, match="reject_identifiers"):
        faults_from_json(Faults(), {"reject_identifiers": "[z-a]"})


async def _post_stream(http: aiohttp.ClientSession, url: str, identifiers: list[str]) -> tuple[int, dict]:
    async with http.post(f"{url}/v2/billing/meter_event_session", headers={"Authorization": f"Bearer {KEY}"}) as r:
        token = (await r.json())["authentication_token"]
    events = [
        {"event_name": "api_requests", "payload": {"stripe_customer_id": "cus_1", "value": "1"}, "identifier": i}
        for i in identifiers
    ]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with http.post(
        f"{url}/v2/billing/meter_event_stream", data=orjson.dumps({"events": events}), headers=headers
    ) as resp:
        return resp.status, orjson.loads(await resp.read())


async def test_the_stream_refuses_a_matching_batch_whole_and_names_the_event_when_asked():
    async with (
        Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu,
        aiohttp.ClientSession() as http,
    ):
        # Set through the control endpoint, as a test on another process would.
        async with http.post(f"{emu.url}/_emulator/faults", json={"reject_identifiers": "^poison-"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["reject_identifiers"] == "^poison-"
        status, body = await _post_stream(http, emu.url, ["a-1", "poison-2", "a-3", "poison-4"])
        assert status == 400
        assert body["error"]["code"] == "parameter_invalid"
        assert body["error"]["param"] == "events[1].identifier"
        assert "events[1]" in body["error"]["message"]
        assert (await emu.stats())["events_accepted"] == 0  # nothing of the refused request counted

        emu.set_faults(reject_identifiers="^poison-", reject_names_index=False)
        status, body = await _post_stream(http, emu.url, ["a-1", "poison-2"])
        assert status == 400
        assert "events[" not in body["error"]["message"]

        status, _ = await _post_stream(http, emu.url, ["a-1", "a-2"])
        assert status == 200
        emu.set_faults()
        status, _ = await _post_stream(http, emu.url, ["poison-9"])
        assert status == 200
        stats = await emu.stats()
        assert stats["events_accepted"] == 3
        assert stats["faults_injected"] == 2
