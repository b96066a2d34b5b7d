"""The ``virtio`` console command.

Each subcommand lives in its own module ``virtio.cli.<name>`` that defines
``register(subparsers) -> None``; the parser it adds sets ``func`` to a callable
taking the parsed namespace and returning the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from virtio import __version__
from virtio.cli.logs import configure as configure_logging

# Subcommand modules, in the order ``virtio --help`` lists them.
SUBCOMMANDS = ("spec", "serve", "stat", "bench", "descriptors", "run_driver", "trace")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only`` (a module of ``SUBCOMMANDS``), just that
    subcommand: each module imports what its options need (device models, the
    emulator), and a back-end that starts on every reconnection should not pay for
    the others."""
    parser = argparse.ArgumentParser(
        prog="virtio",
        description="Spec-driven virtio devices: vhost-user backends, an emulator core, tools.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output on stderr"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS if only is None else (only,):
        try:
            module = importlib.import_module(f"virtio.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"virtio.cli.{name}":
                continue  # subcommand not part of this build
            raise
        module.register(sub)
    return parser


def _requested(argv: Sequence[str]) -> str | None:
    """The subcommand module ``argv`` names (its first word that is not an option), or
    None when it names none of ``SUBCOMMANDS`` (then every one is registered, for the
    help and the error message)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return next((name for name in SUBCOMMANDS if name.replace("_", "-") == word), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_requested(argv))
    args = parser.parse_args(argv)
    configure_logging(args)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    return int(func(args) or 0)
