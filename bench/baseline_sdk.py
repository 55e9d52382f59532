"""The baseline the worker is compared with: a straightforward Kafka -> Stripe loop on the official SDK.

One aiokafka consumer; each poll of at most `--batch-events` records becomes one
`client.v2.billing.meter_event_stream.create_async(...)` call (stripe's async client over
`stripe.AIOHTTPClient()`), then the consumer commits. One request at a time, stdlib `json`, a session
from `client.v2.billing.meter_event_session.create_async()` renewed before it expires. Events carry
the same fields the worker sends (identifier derived from the record's coordinates, the Kafka record
timestamp as RFC 3339). It runs until `--events` events were sent, or until SIGTERM.

    .venv/bin/python bench/baseline_sdk.py --bootstrap HOST:PORT --topic T --group G \
        --url http://127.0.0.1:PORT --key sk_live_... --events 200000

`bench/pipeline_bench.py` runs it and reads its CPU time from /proc the same way as the worker's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any

import stripe
from aiokafka import AIOKafkaConsumer

SESSION_MARGIN_S = 60.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--url", required=True, help="Stripe (emulator) base URL for both api and meter_events")
    parser.add_argument("--key", required=True, help="Stripe secret key")
    parser.add_argument("--events", type=int, required=True, help="stop after sending this many events")
    parser.add_argument("--batch-events", type=int, default=100, help="events per stream call (default 100)")
    return parser.parse_args(argv)


class Sessions:
    """A meter event session token, renewed a minute before it expires."""

    def __init__(self, client: stripe.StripeClient) -> None:
        self._client = client
        self._token = ""
        self._expires = 0.0

    async def token(self) -> str:
        if time.time() >= self._expires - SESSION_MARGIN_S:
            session = await self._client.v2.billing.meter_event_session.create_async()
            self._token = session.authentication_token
            self._expires = _epoch(session.expires_at)
        return self._token


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value)).timestamp()


def to_event(record: Any) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(record.value)
    event.setdefault("identifier", f"sdk-{record.topic}-{record.partition}-{record.offset}")
    if "timestamp" not in event:
        stamp = datetime.fromtimestamp(record.timestamp / 1000, tz=UTC)
        event["timestamp"] = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return event


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    http_client = stripe.AIOHTTPClient()
    addresses: Any = {"api": args.url, "meter_events": args.url}
    api = stripe.StripeClient(args.key, http_client=http_client, base_addresses=addresses)
    sessions = Sessions(api)
    stream_clients: dict[str, stripe.StripeClient] = {}
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    sent = 0
    try:
        while sent < args.events and not stop.is_set():
            polled = await consumer.getmany(timeout_ms=100, max_records=min(args.batch_events, args.events - sent))
            events = [to_event(record) for records in polled.values() for record in records]
            if not events:
                continue
            token = await sessions.token()
            client = stream_clients.get(token)
            if client is None:
                stream_clients.clear()
                client = stream_clients[token] = stripe.StripeClient(
                    token, http_client=http_client, base_addresses=addresses
                )
            await client.v2.billing.meter_event_stream.create_async({"events": events})
            await consumer.commit()
            sent += len(events)
    finally:
        await consumer.stop()
        with contextlib.suppress(Exception):
            await http_client.close_async()
    print(f"baseline sent {sent} events", flush=True)
    # Stay alive until told to stop, so that the bench reads this process's CPU time from /proc.
    await stop.wait()
    return 0


def main() -> int:
    return asyncio.run(run(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
