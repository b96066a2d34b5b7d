"""``virtio trace show FILE``: replay a ``run-driver --trace`` file, each step annotated
with the virtio 1.4 section it follows (errors: the clause they cite)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("trace", help="replay run-driver traces", description=__doc__)
    sub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print a trace annotated with spec sections")
    show.add_argument("file")
    show.add_argument("--kind", action="append", help="only these event kinds (repeatable)")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    from emulator.drvkit.trace import annotate, read_trace

    try:
        for e in read_trace(args.file):
            if args.kind and e.kind not in args.kind:
                continue
            print(annotate(e))
    except (OSError, ValueError) as exc:
        print(f"virtio trace: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # pragma: no cover - e.g. piped into head
        return 0
    return 0
