"""Client CPU per stream request: aiohttp's client against `stream_transport.Http1Transport`.

    .venv/bin/python bench/transport_bench.py [--requests 20000] [--concurrency 8] [--rounds 3]

The emulator runs as a subprocess; this process sends `--requests` 100-event stream requests
(`StreamClient.send`, unique identifiers, each answered `200 {}`) with `--concurrency` senders, once
per transport per round (interleaved, so that the machine's load hits both alike), and prints this
process's CPU time (`getrusage`: user and system; the emulator's is not counted) per request. Every answer
must be accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pipeline_bench import API_KEY, EVENT_NAME, Emulator  # noqa: E402
from ingestor.session import SESSION_PATH  # noqa: E402
from ingestor.stream_client import Outcome, StreamClient  # noqa: E402
from ingestor.stream_transport import Http1Transport  # noqa: E402
from ingestor.stripe_http import AiohttpTransport, StripeHttp, Transport  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

VERSION = "2026-06-24.dahlia"


def bodies(n: int) -> list[bytes]:
    run = uuid.uuid4().hex[:8]
    out = []
    for r in range(n):
        events = [
            {
                "event_name": EVENT_NAME,
                "identifier": f"tb_{run}_{r}_{i}",
                "payload": {"stripe_customer_id": f"cus_{i:05d}", "value": "1"},
            }
            for i in range(100)
        ]
        out.append(orjson.dumps({"events": events}))
    return out


async def token(http: aiohttp.ClientSession, base: str) -> str:
    headers = {"Authorization": f"Bearer {API_KEY}", "Stripe-Version": VERSION}
    async with http.post(base + SESSION_PATH, headers=headers) as resp:
        return str((await resp.json())["authentication_token"])


async def run(client: StreamClient, work: list[bytes], tok: str, concurrency: int) -> tuple[float, float]:
    queue = iter(work)

    async def sender() -> None:
        for body in queue:
            answer = await client.send(body, tok)
            assert answer.outcome is Outcome.ACCEPTED, answer

    start = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    end = resource.getrusage(resource.RUSAGE_SELF)
    return end.ru_utime - start.ru_utime, end.ru_stime - start.ru_stime


def client(transport: Transport, base: str) -> StreamClient:
    return StreamClient(StripeHttp(transport, base, stripe_version=VERSION, timeout=30.0))


async def main(args: argparse.Namespace) -> None:
    emu = Emulator(1_000_000, Path("/tmp/transport-bench-emulator.log"))
    try:
        await emu.prepare()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency + 8)) as http:
            tok = await token(http, emu.url)
            fast = Http1Transport(args.concurrency)
            transports: dict[str, Callable[[], Transport]] = {
                "aiohttp": lambda: AiohttpTransport(http),
                "http1": lambda: fast,
            }
            for make in transports.values():  # warm-up: connections, caches
                await run(
                    client(make(), emu.url),
                    bodies(200),
                    tok,
                    args.concurrency,
                )
            for rnd in range(args.rounds):
                for name, make in transports.items():
                    work = bodies(args.requests)
                    user, system = await run(
                        client(make(), emu.url),
                        work,
                        tok,
                        args.concurrency,
                    )
                    per = 1e6 / args.requests
                    print(
                        f"round {rnd + 1} {name:8s} {(user + system) * per:6.1f} µs CPU / request "
                        f"(user {user * per:5.1f}, system {system * per:5.1f})",
                        flush=True,
                    )
            await fast.close()
    finally:
        await emu.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(parser.parse_args()))
