"""`ingestor emulator`: run the Stripe API emulator until SIGTERM or SIGINT.

Prints `emulator listening on http://HOST:PORT` (flushed) once it accepts connections.
`ingestor emulator create-meter NAME` and `ingestor emulator totals NAME --customer C` talk to a running one
(see `ingestor_dev.emulator.client_cli`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING, Any

import orjson

from ingestor.runtime import tune_gc
from ingestor_dev.emulator import client_cli
from ingestor_dev.emulator.config import EmulatorConfig
from ingestor_dev.emulator.faults import faults_from_json
from ingestor_dev.emulator.limits import DEFAULT_SESSION_TTL_S, DEFAULT_VALIDATION_INTERVAL_S, MAX_BODY_BYTES
from ingestor_dev.emulator.server import Emulator

if TYPE_CHECKING:
    import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=12111, help="port to listen on; 0 = any (default 12111)")
    parser.add_argument(
        "--session-ttl", type=float, default=DEFAULT_SESSION_TTL_S, help="session token lifetime in seconds"
    )
    parser.add_argument(
        "--stream-rps-limit",
        type=int,
        default=None,
        help="stream requests/s per API key (default 10000 live, 25 test; 0 = unlimited)",
    )
    parser.add_argument("--api-key", action="append", default=[], help="accept only these keys (repeatable)")
    parser.add_argument(
        "--customer", action="append", default=None, help="known customers (repeatable); others are not found"
    )
    parser.add_argument("--webhook-url", default=None, help="POST error reports here as signed events")
    parser.add_argument("--webhook-secret", default=None, help="whsec_... signing secret for --webhook-url")
    parser.add_argument("--seed", type=int, default=0, help="seed for fault decisions and ids")
    parser.add_argument("--record-latency", action="store_true", help="keep end-to-end latency percentiles")
    parser.add_argument(
        "--validation-interval", type=float, default=DEFAULT_VALIDATION_INTERVAL_S, help="seconds between validations"
    )
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="request body cap in bytes")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a fault (repeatable), e.g. error_retry_true=0.05, latency_s=0.02, scope=all, refuse_connections=true",
    )
    parser.add_argument(
        "--trust-arrival-header",
        action="store_true",
        help="take a loopback stream request's Wiretap-Arrival header (python -m ingestor_dev.wiretap --stamp) "
        "for its arrival time",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    actions = parser.add_subparsers(dest="emulator_action", metavar="ACTION", required=False)
    client_cli.configure_parsers(actions)


def _fault_changes(items: list[str]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--fault expects NAME=VALUE, got {item!r}")
        try:
            changes[name.strip()] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            changes[name.strip()] = raw
    return changes


def build_config(args: argparse.Namespace) -> EmulatorConfig:
    return EmulatorConfig(
        session_ttl=args.session_ttl,
        stream_rps_limit=args.stream_rps_limit,
        api_keys=tuple(args.api_key),
        customers=tuple(args.customer) if args.customer is not None else None,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        seed=args.seed,
        record_latency=args.record_latency,
        validation_interval=args.validation_interval,
        max_body_bytes=args.max_body_bytes,
        faults=faults_from_json(EmulatorConfig().faults, _fault_changes(args.fault)),
        trust_arrival_header=args.trust_arrival_header,
    )


async def serve(config: EmulatorConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Emulator(config, host=host, port=port) as emulator:
        print(f"emulator listening on {emulator.url}", flush=True)
        await stop.wait()


def _loop_factory() -> Any:
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 - optional speed-up

        return uvloop.new_event_loop
    return None


def main(args: argparse.Namespace) -> int:
    if getattr(args, "emulator_action", None):  # a client of a running emulator
        return client_cli.main(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tune_gc()
    try:
        config = build_config(args)
    except ValueError as exc:
        print(f"ingestor emulator: {exc}")
        return 2
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(config, args.host, args.port))
    return 0
