"""The `ingestor` command: one sub-command per job, each implemented in its own module.

Each sub-command module exposes ``configure_parser(parser)`` and ``main(args) -> int``; they are
imported only when chosen, so ``ingestor emulator`` does not pay for the worker's imports.

The development tools (``emulator``, ``kafka``, ``demo``) live in the separate ``ingestor_dev`` package,
present in a source checkout (``make setup``) and absent from the wheel and the production image: there
those sub-commands exit 2 with a one-line explanation instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING

from ingestor import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

#: The package of the development tools; never imported by the runtime itself.
DEV_PACKAGE = "ingestor_dev"

#: sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("ingestor.worker_cli", "run the worker (configured from the environment; see --help)"),
    "emulator": ("ingestor_dev.emulator.cli", "run the local Stripe API emulator"),
    "kafka": ("ingestor_dev.devkafka", "fetch, start and stop a local single-node Kafka broker"),
    "demo": ("ingestor_dev.demo", "the embedded default: local Kafka + emulator + sample traffic + worker"),
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
            module = _import_command(name, module_name)
            module.configure_parser(sub_parser)
            sub_parser.set_defaults(_main=module.main)
    return parser


def _import_command(name: str, module_name: str) -> ModuleType:
    """The sub-command's module; a development tool that is not installed ends the process with exit 2."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != DEV_PACKAGE:
            raise
        print(
            f"ingestor {name}: a development tool, not installed here ({DEV_PACKAGE} is absent: "
            "it ships with the source checkout, `make setup`, not with the production image)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    result: int = args._main(args)  # noqa: SLF001 - set by build_parser
    return result
