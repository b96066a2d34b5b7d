"""The ``virtio`` console command.

Each subcommand lives in its own module ``virtio.cli.<name>`` that defines
``register(subparsers) -> None``; the parser it adds sets ``func`` to a callable
taking the parsed namespace and returning the exit status.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from virtio import __version__
from virtio.cli.logs import configure as configure_logging

# Subcommand modules, in the order ``virtio --help`` lists them.
SUBCOMMANDS = ("spec", "serve", "stat", "bench", "descriptors", "run_driver", "trace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtio",
        description="Spec-driven virtio devices: vhost-user backends, an emulator core, tools.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output on stderr"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"virtio.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"virtio.cli.{name}":
                continue  # subcommand not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    return int(func(args) or 0)
