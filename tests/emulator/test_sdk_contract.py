"""The official stripe SDK (sync client, in a thread) against the emulator: the whole metering flow."""

from __future__ import annotations

import asyncio
import time

import pytest
import stripe

from ingestor_dev.emulator import Emulator
from ingestor_dev.emulator.timefmt import format_rfc3339
from tests.emulator.conftest import TEST_KEY

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _flow(url: str) -> dict[str, object]:
    addresses = {"api": url, "meter_events": url}
    client = stripe.StripeClient(api_key=TEST_KEY, base_addresses=addresses, max_network_retries=0)
    meter = client.v1.billing.meters.create(
        params={
            "display_name": "API calls",
            "event_name": "sdk_call",
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    assert client.v1.billing.meters.retrieve(meter.id).status == "active"
    session = client.v2.billing.meter_event_session.create()
    streamer = stripe.StripeClient(
        api_key=session.authentication_token, base_addresses=addresses, max_network_retries=0
    )
    now = time.time()
    stamp = format_rfc3339(now)
    events = [
        {
            "event_name": "sdk_call",
            "identifier": f"sdk-{i}",
            "timestamp": stamp,
            "payload": {"stripe_customer_id": "cus_sdk", "value": str(i + 1)},
        }
        for i in range(100)
    ]
    streamer.v2.billing.meter_event_stream.create(params={"events": events})  # 1 + ... + 100 = 5050
    client.v2.billing.meter_events.create(
        params={
            "event_name": "sdk_call",
            "identifier": "sdk-sync",
            "payload": {"stripe_customer_id": "cus_sdk", "value": "50"},
        }
    )
    client.v1.billing.meter_events.create(
        params={
            "event_name": "sdk_call",
            "identifier": "sdk-v1",
            "payload": {"stripe_customer_id": "cus_sdk", "value": "7"},
        }
    )
    adjustment = client.v2.billing.meter_event_adjustments.create(
        params={"event_name": "sdk_call", "type": "cancel", "cancel": {"identifier": "sdk-99"}}  # value 100
    )
    assert adjustment.status == "complete"
    start = int(now) // 60 * 60
    summaries = client.v1.billing.meters.event_summaries.list(
        meter.id, params={"customer": "cus_sdk", "start_time": start - 3600, "end_time": start + 120}
    )
    listed = client.v1.billing.meters.list(params={"limit": 1})
    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        client.v2.billing.meter_events.create(
            params={
                "event_name": "sdk_call",
                "identifier": "sdk-sync",
                "payload": {"stripe_customer_id": "cus_sdk", "value": "1"},
            }
        )
    with pytest.raises(stripe.TemporarySessionExpiredError):
        stripe.StripeClient(
            api_key="ek_test_gone", base_addresses=addresses, max_network_retries=0
        ).v2.billing.meter_event_stream.create(params={"events": events[:1]})
    deactivated = client.v1.billing.meters.deactivate(meter.id)
    return {
        "total": summaries.data[0].aggregated_value,
        "listed": [m.id for m in listed.data],
        "meter": meter.id,
        "duplicate_code": duplicate.value.code,
        "deactivated": deactivated.status,
    }


async def test_sdk_metering_flow():
    async with Emulator() as emu:
        result = await asyncio.to_thread(_flow, emu.url)
        assert result["total"] == 5050 - 100 + 50 + 7
        assert result["listed"] == [result["meter"]]
        assert result["duplicate_code"] == "duplicate_meter_event"
        assert result["deactivated"] == "inactive"
        stats = await emu.stats()
        assert stats["events_valid"] == 102
        assert stats["events_cancelled"] == 1
