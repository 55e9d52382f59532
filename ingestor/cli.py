"""The `ingestor` command: one sub-command per job, each implemented in its own module.

Each sub-command module exposes ``configure_parser(parser)`` and ``main(args) -> int``; they are
imported only when chosen, so ``ingestor emulator`` does not pay for the worker's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING

from ingestor import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

#: sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("ingestor.worker_cli", "run the worker (configured from the environment; see --help)"),
    "emulator": ("ingestor.emulator.cli", "run the local Stripe API emulator"),
    "kafka": ("ingestor.devkafka", "fetch, start and stop a local single-node Kafka broker"),
    "demo": ("ingestor.demo", "the embedded default: local Kafka + emulator + sample traffic + worker"),
    "dlq": ("ingestor.replay", "dead-letter tools: replay dead-lettered events to a topic"),
    "audit": ("ingestor.audit", "compare the usage on the topics with Stripe's event summaries"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingestor", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ingestor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.configure_parser(sub_parser)
            sub_parser.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    result: int = args._main(args)  # noqa: SLF001 - set by build_parser
    return result
