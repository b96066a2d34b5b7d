"""Logging options shared by every long-running command (``virtio serve ...``).

``--log-level LEVEL`` (default: INFO for servers, so the lines an operator needs
are there: listening, each front-end's connect and disconnect, driver errors and
NEEDS_RESET, shutdown) and ``--log-format text|json``.  They are accepted after the
subcommand (``virtio serve blk --log-level debug ...``), where operators put them;
``virtio -v`` before the subcommand still works (-v INFO, -vv DEBUG).

JSON lines carry ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``msg`` and, for an
exception, ``exc``: one object per line, for journald/Loki/jq.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

LEVELS = ("debug", "info", "warning", "error")


def add_log_options(parser: argparse.ArgumentParser, *, default: str = "info") -> None:
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-level",
        choices=LEVELS,
        type=str.lower,
        default=None,
        help=f"log level on stderr (default {default})",
    )
    group.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log line format"
    )
    parser.set_defaults(default_log_level=default)


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


def configure(args: argparse.Namespace) -> None:
    """Set up the root logger from ``-v`` and the subcommand's logging options."""
    verbose = getattr(args, "verbose", 0)
    level_name = getattr(args, "log_level", None)
    if level_name is None:
        if verbose > 1:
            level_name = "debug"
        elif verbose:
            level_name = "info"
        else:
            level_name = getattr(args, "default_log_level", "warning")
    handler = logging.StreamHandler(sys.stderr)
    if getattr(args, "log_format", "text") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level_name.upper()))
