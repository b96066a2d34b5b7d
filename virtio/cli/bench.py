"""``virtio bench``: the same block workload through emulated and paravirtual I/O paths.

Each row boots the emulator's guest program for one path (``emulator.run``): it writes
N 4 KiB requests, flushes, reads them back and checks them, and the VMM checks the
disk on its own.  Rows: IDE PIO, IDE bus-master DMA, virtio-blk over virtio-mmio in
the VMM at queue depth 1 and 32, ``vhost-user`` when a path of that name is
registered, and the network rows: ``ne2000`` (two ISA NE2000s back to back) and
``virtio-net`` (two virtio-net NICs over virtio-mmio on the switch); an I/O is one
packet, sent by one NIC and received by the other; ``virtio-input`` (a keyboard over
virtio-mmio, events injected while the guest sleeps; an I/O is one input event, the
queue depth the burst of key groups per injection).  By default requests run 256 KiB,
packets 64 KiB and input events 16 KiB (``QUICK_KIB``; ``--full`` or an explicit size
runs every path at one size).  The table gives exits per I/O
(split by exit reason), exits per MiB,
MB/s and µs per I/O; ``--chart`` writes a PNG bar chart of exits per I/O on a log
scale (matplotlib).  No QEMU is needed.

Exit status: 0 if every row ran and verified, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

DEFAULT_PATHS = (
    "ide-pio", "ide-dma", "virtio-mmio", "virtio-pci", "vhost-user", "vhost-user-pci", "ne2000",
    "virtio-net", "virtio-input",
)  # fmt: skip
OPTIONAL_PATHS = frozenset({"vhost-user", "vhost-user-pci"})
"""Skipped silently when not registered (another component adds them)."""
PATH_MODULES = ("emulator.vhost_user", "emulator.virtio_net_paths", "emulator.virtio_input_paths")
"""Modules that register more paths when imported (absent ones are skipped)."""
DEFAULT_QUEUE_DEPTHS = (1, 32)
DEFAULT_KIB = 256
QUICK_KIB = {"packet": 64, "event": 16}
"""Default size by I/O unit when neither --kib nor --mib is given (``--full``: DEFAULT_KIB
for every path): 64 KiB is 43 1514-byte frames (an NE2000 frame costs ~170 ms on this
nested KVM), 16 KiB is 2,048 input events (256 KiB would be 32,768: ~27 s at burst 1 on
KVM).  Exits per I/O do not depend on the size (the batched rows round to whole
batches)."""
DEFAULT_CHART = "virtio-bench.png"
REQUEST_BYTES = 4096


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="exits per I/O in the VMM: IDE vs virtio-blk, NE2000 vs virtio-net, virtio-input",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--cpu", choices=["kvm", "soft", "auto"], default="auto")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--mib", type=int, help=f"MiB written then read per path (default {DEFAULT_KIB} KiB)"
    )
    size.add_argument("--kib", type=int, help="KiB written then read per path (multiple of 4)")
    p.add_argument(
        "--full",
        action="store_true",
        help=f"without --kib/--mib: {DEFAULT_KIB} KiB for every path (default: "
        + ", ".join(f"{kib} KiB of {unit}s" for unit, kib in QUICK_KIB.items())
        + ", to keep the default run short)",
    )
    p.add_argument(
        "--paths",
        nargs="+",
        metavar="PATH",
        help=f"paths to run (default: {' '.join(DEFAULT_PATHS)}; unregistered"
        " optional ones are skipped)",
    )
    p.add_argument(
        "--queue-depth",
        nargs="+",
        type=int,
        metavar="N",
        help="queue depths for paths that support them (default: 1 32; IDE runs at 1)",
    )
    p.add_argument("--irq", action="store_true", help="complete by interrupt, not polling")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument(
        "--chart",
        metavar="PATH",
        default=DEFAULT_CHART,
        help=f"PNG chart of exits per I/O (default {DEFAULT_CHART}); '' for none",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per row")
    p.set_defaults(func=run)


# -- planning and running --------------------------------------------------------------------
def plan(paths: list[str], depths: list[int], registry: dict) -> list[tuple[str, int]]:
    """(path, queue depth) rows: a depth above a path's maximum runs at that maximum
    (a batched row for a NIC whose ring holds 9 frames), and IDE always runs at 1."""
    rows = []
    for name in paths:
        wp = registry[name]
        usable = [min(qd, wp.max_queue_depth) for qd in depths if qd >= 1] or [1]
        rows.extend((name, qd) for qd in dict.fromkeys(usable))
    return rows


def path_kib(wp, kib: int, explicit: bool, full: bool) -> int:
    """The size a path runs: ``kib`` when given or ``--full``, else its unit's quick size."""
    if explicit or full:
        return kib
    return min(kib, QUICK_KIB.get(wp.extra.get("unit", "request"), kib))


def make_row(res: dict) -> dict:
    ios = res["ios"]
    mib = ios * res.get("io_bytes", REQUEST_BYTES) / (1 << 20)
    total = res["exits_total"]
    return {
        "path": res["path"],
        "queue_depth": res["queue_depth"],
        "cpu": res["cpu"],
        "irq": res["irq"],
        "ios": ios,
        "unit": res.get("unit", "request"),
        "io_bytes": res.get("io_bytes", REQUEST_BYTES),
        "kib": res.get("kib"),
        "exits_total": total,
        "exits_per_io": res["exits_per_io"],
        "exits_by_reason": res["exits_by_reason"],
        "exits_per_io_by_reason": {k: v / ios for k, v in res["exits_by_reason"].items()}
        if ios
        else {},
        "exits_by_register": res["exits_by_register"],
        "exits_per_mib": total / mib if mib else 0.0,
        "interrupts": res["interrupts"],
        "mb_per_s": res["mb_per_s"],
        "us_per_io": res["us_per_io"],
        "verified": bool(res["verified"]),
        "phases": {
            name: {k: ph[k] for k in ("ios", "exits", "exits_per_io", "us_per_io")}
            for name, ph in res.get("phases", {}).items()
        },
    }


def failed_row(path: str, qd: int, cpu: str, irq: bool, exc: BaseException) -> dict:
    return {
        "path": path,
        "queue_depth": qd,
        "cpu": cpu,
        "irq": irq,
        "ios": 0,
        "exits_total": 0,
        "exits_per_io": None,
        "exits_by_reason": {},
        "exits_per_io_by_reason": {},
        "exits_by_register": {},
        "exits_per_mib": None,
        "interrupts": 0,
        "mb_per_s": None,
        "us_per_io": None,
        "verified": False,
        "error": f"{type(exc).__name__}: {exc}",
    }


def load_registry() -> dict:
    """``emulator.run.PATHS`` after importing the optional path modules."""
    import importlib

    from emulator import run as emu

    for name in PATH_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return emu.PATHS


def run(args: argparse.Namespace) -> int:
    from emulator import run as emu

    if args.kib is not None:
        kib = args.kib
    elif args.mib is not None:
        kib = args.mib * 1024
    else:
        kib = DEFAULT_KIB
    if kib <= 0 or kib % 4:
        print("virtio bench: the size must be a positive multiple of 4 KiB", file=sys.stderr)
        return 2
    registry = load_registry()
    requested = list(args.paths or DEFAULT_PATHS)
    unknown = [p for p in requested if p not in registry and p not in OPTIONAL_PATHS]
    if unknown:
        print(
            f"virtio bench: unknown path(s) {', '.join(unknown)};"
            f" known: {', '.join(sorted(registry))}",
            file=sys.stderr,
        )
        return 2
    paths = [p for p in requested if p in registry]
    for name in requested:
        if name not in registry:
            print(f"virtio bench: {name}: not registered in this build, skipped", file=sys.stderr)
    depths = list(args.queue_depth or DEFAULT_QUEUE_DEPTHS)
    if any(qd < 1 for qd in depths):
        print("virtio bench: queue depths must be >= 1", file=sys.stderr)
        return 2
    todo = plan(paths, depths, registry)
    rows = []
    t_all = time.monotonic()
    explicit = args.kib is not None or args.mib is not None
    for i, (path, qd) in enumerate(todo, 1):
        label = f"[{i}/{len(todo)}] {path} qd{qd}"
        row_kib = path_kib(registry[path], kib, explicit, args.full)
        print(f"{label}: running ({row_kib} KiB, cpu {args.cpu}) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            res = emu.run_workload(
                path, args.cpu, queue_depth=qd, irq=args.irq, kib=row_kib, timeout=args.timeout
            )
            row = make_row({**res, "kib": row_kib})
        except Exception as exc:  # a failed row is reported, the others still run
            row = failed_row(path, qd, args.cpu, args.irq, exc)
        rows.append(row)
        took = time.monotonic() - t0
        if row.get("error"):
            print(f"{label}: FAILED after {took:.1f} s: {row['error']}", file=sys.stderr)
        else:
            ok = "verified" if row["verified"] else "DATA MISMATCH"
            print(
                f"{label}: {row['exits_per_io']:.4g} exits/IO on {row['cpu']}, {took:.1f} s, {ok}",
                file=sys.stderr,
                flush=True,
            )
    print(f"done in {time.monotonic() - t_all:.1f} s", file=sys.stderr)
    if args.json:
        json.dump({"rows": rows, "kib": kib}, sys.stdout, indent=2)
        print()
    else:
        print(format_table(rows))
    if args.chart:
        Path(args.chart).write_bytes(chart_png(rows))
        print(f"chart written to {args.chart}", file=sys.stderr)
    return 0 if rows and all(r["verified"] for r in rows) else 1


# -- table ---------------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _unit(row: dict) -> str:
    """What one I/O of the row is: a 4 KiB request, or a packet of N bytes."""
    size = row.get("io_bytes", REQUEST_BYTES)
    if row.get("unit", "request") == "request":
        return f"{size // 1024}K req" if size % 1024 == 0 else f"{size} B req"
    if row.get("unit") == "event":
        return "input event"
    return f"{size} B pkt"


def format_table(rows: list[dict]) -> str:
    head = [
        "path",
        "qd",
        "cpu",
        "I/O",
        "I/Os",
        "exits/IO",
        "by reason (per I/O)",
        "exits/MiB",
        "MB/s",
        "µs/IO",
        "check",
    ]
    body = []
    for r in rows:
        reasons = ", ".join(
            f"{k} {_fmt(v, 3)}" for k, v in sorted(r["exits_per_io_by_reason"].items())
        )
        body.append(
            [
                r["path"],
                str(r["queue_depth"]),
                r["cpu"],
                _unit(r),
                str(r["ios"]),
                _fmt(r["exits_per_io"]),
                reasons or "-",
                _fmt(r["exits_per_mib"]),
                _fmt(r["mb_per_s"], 3),
                _fmt(r["us_per_io"], 3),
                "ok" if r["verified"] else ("FAILED" if r.get("error") else "MISMATCH"),
            ]
        )
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)
    ]
    right = {1, 4, 5, 7, 8, 9}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    out.extend(line(b) for b in body)
    errors = [f"  {r['path']} qd{r['queue_depth']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        out.append("errors:")
        out.extend(errors)
    return "\n".join(out)


# -- PNG chart ---------------------------------------------------------------------------
COLORS = {  # by path prefix, first match wins
    "ide-pio-multi": "#e68c5a",
    "ide-pio": "#d6604d",
    "ide-dma": "#f4a528",
    "virtio-mmio": "#4393c3",
    "vhost-user": "#4daf4a",
    "ne2000": "#8c510a",
    "virtio-net": "#2166ac",
    "virtio-input": "#762a83",
}
DEFAULT_COLOR = "#7878a0"
ZERO_LABEL = "0 (no VMM exit)"
FAILED_LABEL = "FAILED"


def _bar_color(path: str) -> str:
    return next((c for name, c in COLORS.items() if path.startswith(name)), DEFAULT_COLOR)


def _tick(x: float, _pos: object = None) -> str:
    """Axis tick text: ``0.01``, ``1``, ``1,000``."""
    return f"{x:,.0f}" if x >= 1 else f"{x:g}"


def chart_figure(rows: list[dict]):
    """The chart as a matplotlib ``Figure``: one horizontal bar of exits per I/O per
    row, log scale.  A row with 0 exits has no bar (log scale) but says so; a failed
    row says FAILED; values print with thousands separators."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = [r.get("exits_per_io") for r in rows]
    positive = [v for v in values if v]
    lo_exp = min([-2, *(math.floor(math.log10(v)) for v in positive)])
    hi_exp = max([1, *(math.ceil(math.log10(v)) for v in positive)])
    lo, hi = 10.0**lo_exp, 10.0**hi_exp
    fig = Figure(figsize=(9.0, 1.9 + 0.5 * len(rows)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_xlim(lo, hi * 10 ** (0.2 * (hi_exp - lo_exp)))  # room for the value labels
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    ax.set_yticks(range(len(rows)), [f"{r['path']} qd{r['queue_depth']} {r['cpu']}" for r in rows])
    ax.xaxis.set_major_locator(LogLocator(base=10, numticks=hi_exp - lo_exp + 3))
    ax.xaxis.set_major_formatter(FuncFormatter(_tick))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(axis="x", which="major", color="#d7d7d7", linewidth=0.8)
    ax.set_axisbelow(True)
    for i, (row, v) in enumerate(zip(rows, values, strict=True)):
        if v is None:
            ax.text(lo * 1.1, i, FAILED_LABEL, va="center", color="#c80000", weight="bold")
        elif v == 0:
            ax.text(lo * 1.1, i, ZERO_LABEL, va="center", color="#303030")
        else:
            ax.barh(i, v - lo, left=lo, height=0.7, color=_bar_color(row["path"]))
            mark = "" if row.get("verified") else "  (NOT VERIFIED)"
            ax.text(v * 1.15, i, _fmt(v, 3) + mark, va="center", color="#282828")
    ax.set_xlabel("VMM exits per I/O (log scale)")
    ax.set_title("Exits per I/O: 4 KiB requests (write + read-verify); NICs: per packet")
    fig.text(0.01, 0.005, "pyvirtio emulator: exits counted by the VMM", color="#787878", size=8)
    return fig


def chart_png(rows: list[dict]) -> bytes:
    """:func:`chart_figure` rendered to PNG bytes (Agg, no display needed)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = chart_figure(rows)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()
