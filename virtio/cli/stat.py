"""``virtio stat --control PATH``: the statistics of a running back-end, live.

::

    virtio stat --control /run/virtio.ctl               # refreshing table (Ctrl-C ends)
    virtio stat --control /run/virtio.ctl --once        # one table, for scripts and tests
    virtio stat --control /run/virtio.ctl --once --json # the query-stats reply as is

One row per queue and one per export (``*``): requests completed (and per second
between refreshes), in flight, the share served by the native data plane, data
read and written, requests that did not end OK, used-buffer notifications sent /
suppressed, and the latency quantiles (upper bound of the histogram bucket: pop to
used entry).  The figures are ``query-stats``'s (``virtio.exports``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

from virtio.stats import latency_quantile

COLUMNS = (
    "EXPORT", "QUEUE", "REQUESTS", "REQ/S", "INFLIGHT", "DATAPLANE", "READ", "WRITTEN",
    "NOT-OK", "NOTIFY", "P50", "P99",
)  # fmt: skip


def register(subparsers: Any) -> None:
    stat = subparsers.add_parser(
        "stat",
        help="show a back-end's statistics (from its control socket)",
        description=__doc__.split("\n\n")[0],
    )
    stat.add_argument("--control", required=True, metavar="PATH", help="the control socket")
    stat.add_argument("--export", metavar="ID", help="only this export")
    stat.add_argument("--once", action="store_true", help="print one table and exit")
    stat.add_argument("--json", action="store_true", help="print the query-stats reply (JSON)")
    stat.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="refresh interval (1 s)"
    )
    stat.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        print("virtio stat: --interval must be positive", file=sys.stderr)
        return 2
    try:
        return trio.run(_run, args)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:  # no such socket, nobody listening, connection lost
        print(f"virtio stat: {args.control}: {exc.strerror or exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace) -> int:
    from virtio.control.client import ControlClient, ControlReplyError
    from virtio.control.protocol import ControlError

    arguments = {"export": args.export} if args.export else {}
    tty = sys.stdout.isatty()
    previous: tuple[float, dict[str, Any]] | None = None
    async with await ControlClient.connect(args.control) as client:
        while True:
            try:
                snap = await client.execute("query-stats", **arguments)
            except ControlReplyError as exc:
                print(f"virtio stat: {exc.error_class}: {exc}", file=sys.stderr)
                return 1
            except ControlError as exc:
                raise ConnectionError(str(exc)) from None
            now = trio.current_time()
            if args.json:
                print(json.dumps(snap), flush=True)
            else:
                rates = (now - previous[0], previous[1]) if previous is not None else None
                table = format_table(snap, rates)
                print(("\x1b[H\x1b[J" if tty else "") + table, flush=True)
            if args.once:
                return 0
            previous = (now, snap)
            await trio.sleep(args.interval)


def _size(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _us(value: int | None) -> str:
    if value is None:
        return "-"
    return f"<{value}us" if value < 10_000 else f"<{value // 1000}ms"


def _row(
    export: str, queue: str, q: dict[str, Any], old: dict[str, Any] | None, dt: float | None
) -> list[str]:
    done = q["completed"]
    rate = "-" if old is None or not dt else f"{(done - old['completed']) / dt:.0f}"
    share = f"{100 * q['dataplane'] // done}%" if done else "-"
    reads = sum(n for k, n in q["bytes"].items() if k in ("in", "read", "rx", "buffers"))
    writes = sum(n for k, n in q["bytes"].items() if k in ("out", "write", "tx"))
    status = q["status"]
    not_ok = sum(n for name, n in status.items() if name != "ok")
    notes = q["notifications"]
    buckets = q["latency"]["buckets_us"]
    return [
        export,
        queue,
        str(done),
        rate,
        str(q["in_flight"]),
        share,
        _size(reads),
        _size(writes),
        str(not_ok),
        f"{notes['sent']}/{notes['suppressed']}",
        _us(latency_quantile(buckets, 0.5)),
        _us(latency_quantile(buckets, 0.99)),
    ]


def format_table(snap: dict[str, Any], rates: tuple[float, dict[str, Any]] | None) -> str:
    """The table of one ``query-stats`` reply; ``rates`` = (seconds since, the reply
    before) adds requests per second."""
    dt, before = rates if rates is not None else (None, None)
    old_exports = {e["id"]: e for e in before["exports"]} if before else {}
    rows = [list(COLUMNS)]
    for e in snap["exports"]:
        old = old_exports.get(e["id"])
        old_queues = {q["queue"]: q for q in old["queues"]} if old else {}
        for q in e["queues"]:
            rows.append(_row(e["id"], str(q["queue"]), q, old_queues.get(q["queue"]), dt))
        rows.append(_row(e["id"], "*", e["totals"], old["totals"] if old else None, dt))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in
             enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]  # fmt: skip
    return f"{snap['time']}\n" + "\n".join(lines)
