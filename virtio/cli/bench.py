"""``virtio bench``: the same block workload through emulated and paravirtual I/O paths.

Each row boots the emulator's guest program for one path (``emulator.run``): it writes
N 4 KiB requests, flushes, reads them back and checks them, and the VMM checks the
disk on its own.  Rows: IDE PIO, IDE bus-master DMA, virtio-blk over virtio-mmio in
the VMM at queue depth 1 and 32, and ``vhost-user`` when a path of that name is
registered.  The table gives exits per I/O (split by exit reason), exits per MiB,
MB/s and µs per I/O; ``--chart`` writes a PNG bar chart of exits per I/O on a log
scale (own encoder: zlib + struct, a 3x5 pixel font).  No QEMU is needed.

Exit status: 0 if every row ran and verified, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
import zlib
from pathlib import Path

DEFAULT_PATHS = ("ide-pio", "ide-dma", "virtio-mmio", "vhost-user")
OPTIONAL_PATHS = frozenset({"vhost-user"})
"""Skipped silently when not registered (another component adds them)."""
PATH_MODULES = ("emulator.vhost_user",)
"""Modules that register more paths when imported (absent ones are skipped)."""
DEFAULT_QUEUE_DEPTHS = (1, 32)
DEFAULT_KIB = 256
DEFAULT_CHART = "virtio-bench.png"
REQUEST_BYTES = 4096


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="exits per I/O: IDE PIO / DMA vs virtio-blk (virtio-mmio, vhost-user) in the VMM",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--cpu", choices=["kvm", "soft", "auto"], default="auto")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--mib", type=int, help=f"MiB written then read per path (default {DEFAULT_KIB} KiB)"
    )
    size.add_argument("--kib", type=int, help="KiB written then read per path (multiple of 4)")
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
    rows = []
    for name in paths:
        wp = registry[name]
        usable = [qd for qd in depths if 1 <= qd <= wp.max_queue_depth]
        if not usable:
            usable = [1]
        rows.extend((name, qd) for qd in dict.fromkeys(usable))
    return rows


def make_row(res: dict) -> dict:
    ios = res["ios"]
    mib = ios * REQUEST_BYTES / (1 << 20)
    total = res["exits_total"]
    return {
        "path": res["path"],
        "queue_depth": res["queue_depth"],
        "cpu": res["cpu"],
        "irq": res["irq"],
        "ios": ios,
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
    depths = list(args.queue_depth or DEFAULT_QUEUE_DEPTHS)
    if any(qd < 1 for qd in depths):
        print("virtio bench: queue depths must be >= 1", file=sys.stderr)
        return 2
    todo = plan(paths, depths, registry)
    rows = []
    t_all = time.monotonic()
    for i, (path, qd) in enumerate(todo, 1):
        label = f"[{i}/{len(todo)}] {path} qd{qd}"
        print(f"{label}: running ({kib} KiB, cpu {args.cpu}) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            res = emu.run_workload(
                path, args.cpu, queue_depth=qd, irq=args.irq, kib=kib, timeout=args.timeout
            )
            row = make_row(res)
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


def format_table(rows: list[dict]) -> str:
    head = [
        "path",
        "qd",
        "cpu",
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
    right = {1, 3, 4, 6, 7, 8}

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
FONT = {  # 3x5 pixel glyphs, rows top to bottom
    "A": (".#.", "#.#", "###", "#.#", "#.#"),
    "B": ("##.", "#.#", "##.", "#.#", "##."),
    "C": (".##", "#..", "#..", "#..", ".##"),
    "D": ("##.", "#.#", "#.#", "#.#", "##."),
    "E": ("###", "#..", "##.", "#..", "###"),
    "F": ("###", "#..", "##.", "#..", "#.."),
    "G": (".##", "#..", "#.#", "#.#", ".##"),
    "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"),
    "J": ("..#", "..#", "..#", "#.#", ".#."),
    "K": ("#.#", "#.#", "##.", "#.#", "#.#"),
    "L": ("#..", "#..", "#..", "#..", "###"),
    "M": ("#.#", "###", "###", "#.#", "#.#"),
    "N": ("##.", "#.#", "#.#", "#.#", "#.#"),
    "O": (".#.", "#.#", "#.#", "#.#", ".#."),
    "P": ("##.", "#.#", "##.", "#..", "#.."),
    "Q": (".#.", "#.#", "#.#", "##.", ".##"),
    "R": ("##.", "#.#", "##.", "#.#", "#.#"),
    "S": (".##", "#..", ".#.", "..#", "##."),
    "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"),
    "V": ("#.#", "#.#", "#.#", "#.#", ".#."),
    "W": ("#.#", "#.#", "###", "###", "#.#"),
    "X": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "Y": ("#.#", "#.#", ".#.", ".#.", ".#."),
    "Z": ("###", "..#", ".#.", "#..", "###"),
    "0": ("###", "#.#", "#.#", "#.#", "###"),
    "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("##.", "..#", ".#.", "#..", "###"),
    "3": ("##.", "..#", ".#.", "..#", "##."),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "##.", "..#", "##."),
    "6": (".##", "#..", "###", "#.#", "###"),
    "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "##."),
    "-": ("...", "...", "###", "...", "..."),
    ".": ("...", "...", "...", "...", ".#."),
    "/": ("..#", "..#", ".#.", "#..", "#.."),
    " ": ("...", "...", "...", "...", "..."),
    "=": ("...", "###", "...", "###", "..."),
    "(": (".#.", "#..", "#..", "#..", ".#."),
    ")": (".#.", "..#", "..#", "..#", ".#."),
    ",": ("...", "...", "...", ".#.", "#.."),
    ":": ("...", ".#.", "...", ".#.", "..."),
    "!": (".#.", ".#.", ".#.", "...", ".#."),
    "+": ("...", ".#.", "###", ".#.", "..."),
}
GLYPH_W, GLYPH_H, SCALE = 3, 5, 2


class Canvas:
    def __init__(self, width: int, height: int, bg=(255, 255, 255)) -> None:
        self.width = width
        self.height = height
        self.px = bytearray(bytes(bg) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            i = 3 * (y * self.width + x0)
            self.px[i : i + len(row)] = row

    def text(self, x: int, y: int, s: str, color=(0, 0, 0), scale: int = SCALE) -> int:
        for ch in s.upper():
            glyph = FONT.get(ch, FONT[" "])
            for gy in range(GLYPH_H):
                for gx in range(GLYPH_W):
                    if glyph[gy][gx] == "#":
                        self.rect(
                            x + gx * scale,
                            y + gy * scale,
                            x + (gx + 1) * scale,
                            y + (gy + 1) * scale,
                            color,
                        )
            x += (GLYPH_W + 1) * scale
        return x

    @staticmethod
    def text_width(s: str, scale: int = SCALE) -> int:
        return len(s) * (GLYPH_W + 1) * scale

    def png(self) -> bytes:
        return encode_png(self.width, self.height, bytes(self.px))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG (filter 0 on every scanline)."""
    if len(rgb) != 3 * width * height:
        raise ValueError("pixel data does not match the image size")
    stride = 3 * width
    raw = b"".join(b"\0" + rgb[y * stride : (y + 1) * stride] for y in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


COLORS = {  # by path prefix, first match wins
    "ide-pio-multi": (230, 140, 90),
    "ide-pio": (214, 96, 77),
    "ide-dma": (244, 165, 40),
    "virtio-mmio": (67, 147, 195),
    "vhost-user": (77, 175, 74),
}
DEFAULT_COLOR = (120, 120, 160)


def chart_png(rows: list[dict]) -> bytes:
    """Horizontal bars of exits per I/O, log scale, one per row."""
    good = [r for r in rows if r.get("exits_per_io")]
    values = [r["exits_per_io"] for r in good] or [1.0]
    lo = math.floor(math.log10(min(values))) if values else -2
    hi = math.ceil(math.log10(max(values)))
    lo = min(lo, -2)
    hi = max(hi, lo + 1, 1)
    labels = [f"{r['path']} qd{r['queue_depth']} {r['cpu']}" for r in rows]
    label_w = max([Canvas.text_width(s) for s in labels] + [60]) + 16
    plot_w = 560
    bar_h, gap, top, bottom = 22, 10, 44, 40
    width = label_w + plot_w + 90
    height = top + len(rows) * (bar_h + gap) + bottom
    c = Canvas(width, height)
    c.text(10, 10, "EXITS PER I/O (LOG SCALE), 4 KIB REQUESTS, WRITE + READ-VERIFY")

    def xpos(v: float) -> int:
        return label_w + int(plot_w * (math.log10(v) - lo) / (hi - lo))

    plot_bottom = top + len(rows) * (bar_h + gap)
    for d in range(lo, hi + 1):
        x = xpos(10.0**d)
        c.rect(x, top - 6, x + 1, plot_bottom, (215, 215, 215))
        tick = f"{10.0**d:g}" if d < 0 else str(10**d)
        c.text(x - Canvas.text_width(tick) // 2, plot_bottom + 8, tick, (90, 90, 90))
    c.rect(label_w, top - 6, label_w + 1, plot_bottom, (0, 0, 0))
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        y = top + i * (bar_h + gap)
        c.text(label_w - 8 - Canvas.text_width(label), y + 6, label)
        v = row.get("exits_per_io")
        if not v:
            c.text(label_w + 6, y + 6, "FAILED" if row.get("error") else "0", (200, 0, 0))
            continue
        color = next(
            (c for name, c in COLORS.items() if row["path"].startswith(name)), DEFAULT_COLOR
        )
        x1 = max(label_w + 2, xpos(v))
        c.rect(label_w + 1, y, x1, y + bar_h, color)
        mark = "" if row.get("verified") else " !"
        c.text(x1 + 6, y + 6, _fmt(v, 3) + mark, (40, 40, 40))
    c.text(10, height - 16, "pyvirtio emulator: exits counted by the VMM", (120, 120, 120))
    return c.png()
