"""`ingestor run`: the worker as a process. Configured only from the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from ingestor import config_report
from ingestor import settings as settings_mod
from ingestor.observability import setup_logging
from ingestor.runtime import run_async, tune_gc

log = logging.getLogger("ingestor")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "environment variables:\n" + settings_mod.describe()
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the settings and print them as a table (value, origin, `auto` resolved; secrets masked)",
    )


class _Interrupted(BaseException):
    """SIGTERM before the event loop's handlers are in place (while Python imports and reads settings)."""


def _interrupted(signum: int, frame: object) -> None:
    del signum, frame
    raise _Interrupted


async def run_worker(config: settings_mod.Settings) -> None:
    """Start the worker and run it until SIGTERM or SIGINT; either one during start-up ends it cleanly."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    running: list[Any] = []  # the worker, once it runs: a signal then drains it
    stopped_early = asyncio.Event()

    def on_signal() -> None:
        if running:
            running[0].request_stop()
        elif not stopped_early.is_set():
            stopped_early.set()
            main_task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        await _start_and_run(config, running)
    except asyncio.CancelledError:
        if not stopped_early.is_set():
            raise
        main_task.uncancel()
        log.info("stopped during start-up")
        return
    log.info("worker stopped")


async def _start_and_run(config: settings_mod.Settings, running: list[Any]) -> None:
    from ingestor import kafka_preflight  # noqa: PLC0415 - keep `--help` fast
    from ingestor.worker import Worker  # noqa: PLC0415 - keep `--help` fast

    # TLS and SASL refusals named by variable (exit 2) before aiokafka's clients retry them opaquely.
    await kafka_preflight.check(config.kafka)
    tune_gc()  # after the imports, so that they are frozen too
    async with Worker(config) as worker:
        running.append(worker)
        log.info("worker started", extra={"topics": list(config.topics), "group": config.group_id})
        await worker.run()


def main(args: argparse.Namespace) -> int:
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        return _main(args)
    except (_Interrupted, KeyboardInterrupt):  # a signal before the worker's own handlers: nothing to drain
        print("ingestor: stopped before start-up completed", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    try:
        config = settings_mod.load()
        if args.check_config:
            print(config_report.report(config, os.environ))
            return 0
    except settings_mod.SettingsError as exc:
        return _refused(exc)
    setup_logging(config.log_level, config.log_format)
    try:
        run_async(run_worker(config))
    except settings_mod.SettingsError as exc:  # found at start-up, e.g. a missing dead-letter topic
        return _refused(exc)
    return 0


def _refused(exc: settings_mod.SettingsError) -> int:
    """One line naming the variable, exit code 2 (no traceback: the message says what to change)."""
    print(f"ingestor: configuration error: {exc}", file=sys.stderr)
    return 2
