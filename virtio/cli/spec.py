"""``virtio spec``: print the machine-readable virtio spec (tables, JSON or a C header)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "spec",
        help="print the machine-readable virtio 1.4 spec",
        description=(
            "Print the virtio 1.4 definitions transcribed in virtio.spec: device IDs, "
            "feature bits, status bits, constants and structure layouts, each with "
            "its spec section.  Default: readable tables."
        ),
    )
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print virtio.spec.export() as JSON")
    fmt.add_argument(
        "--header", action="store_true", help="print a standalone C header (virtio_spec.h)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import virtio.spec as spec

    if args.json:
        text = spec.export_json()
    elif args.header:
        text = spec.c_header()
    else:
        text = render_tables(spec.export())
    sys.stdout.write(text)
    return 0


def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.append((indent + "  ".join([*cells, row[-1]])).rstrip())
    return out


def render_tables(data: dict[str, Any]) -> str:
    """Readable tables of an :func:`virtio.spec.export` dict."""
    sections = data["sections"]
    legacy = set(data["legacy"])
    newer = set(data["not_in_1_2"])

    def notes(name: str) -> str:
        marks = []
        if name in legacy:
            marks.append("legacy")
        if name in newer:
            marks.append("not in 1.2")
        return f" [{', '.join(marks)}]" if marks else ""

    lines = [f"virtio {data['spec_version']} (OASIS virtio {data['spec_version']} CS01)", ""]
    lines.append("Device IDs")
    lines += _table(
        [
            (str(value), name, f"§{sections[name]}{notes(name)}")
            for name, value in data["device_ids"].items()
        ]
    )
    for group, members in data["features_by_device"].items():
        lines += ["", f"Feature bits: {group}"]
        rows = sorted(members.items(), key=lambda item: item[1])
        lines += _table([(str(bit), name, f"§{sections[name]}{notes(name)}") for name, bit in rows])
    lines += ["", "Device status bits"]
    lines += _table(
        [(f"0x{v:02x}", name, f"§{sections[name]}") for name, v in data["status"].items()]
    )
    lines += ["", "Constants"]
    for group, names in data["enums"].items():
        lines.append(f"  {group}")
        lines += _table(
            [(hex(data["constants"][n]), n, f"§{sections[n]}{notes(n)}") for n in names],
            indent="    ",
        )
    enum_names = {n for names in data["enums"].values() for n in names}
    others = [n for n in data["constants"] if n not in enum_names]
    if others:
        lines.append("  other")
        lines += _table(
            [(hex(data["constants"][n]), n, f"§{sections[n]}{notes(n)}") for n in others],
            indent="    ",
        )
    lines += ["", "Structures (size in bytes; fields: offset size name)"]
    for name, size in data["structs"].items():
        lines.append(f"  {name}  {size} bytes  §{sections[name]}{notes(name)}")
        lines += _table(
            [
                (f"+{offset}", str(fsize), field)
                for field, offset, fsize in data["struct_fields"][name]
            ],
            indent="      ",
        )
    return "\n".join(lines) + "\n"
