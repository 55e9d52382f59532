"""`ingestor run`: the worker as a process. Configured only from the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ingestor import settings as settings_mod
from ingestor.observability import setup_logging
from ingestor.runtime import run_async, tune_gc

log = logging.getLogger("ingestor")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "environment variables:\n" + settings_mod.describe()
    parser.add_argument(
        "--check-config", action="store_true", help="validate the settings, print them (secrets hidden) and exit"
    )


async def run_worker(config: settings_mod.Settings) -> None:
    from ingestor import kafka_preflight  # noqa: PLC0415 - keep `--help` fast
    from ingestor.worker import Worker  # noqa: PLC0415 - keep `--help` fast

    # TLS and SASL refusals named by variable (exit 2) before aiokafka's clients retry them opaquely.
    await kafka_preflight.check(config.kafka)
    tune_gc()  # after the imports, so that they are frozen too

    loop = asyncio.get_running_loop()
    async with Worker(config) as worker:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.request_stop)
        log.info("worker started", extra={"topics": list(config.topics), "group": config.group_id})
        await worker.run()
    log.info("worker stopped")


def main(args: argparse.Namespace) -> int:
    try:
        config = settings_mod.load()
    except settings_mod.SettingsError as exc:
        print(f"ingestor: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(repr(config))
        return 0
    setup_logging(config.log_level, config.log_format)
    try:
        run_async(run_worker(config))
    except settings_mod.SettingsError as exc:  # found at start-up, e.g. a missing dead-letter topic
        print(f"ingestor: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0
