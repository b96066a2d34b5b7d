#!/usr/bin/env python3
"""The emulator's NE2000 checked against QEMU's own ``ne2k_isa``: the same guest program.

The ``ne2000`` workload's guest program (``guest-drivers/ne2000.c``: two NICs cabled
back to back, frames sent and received with remote DMA and every byte checked) runs
unchanged in QEMU, booted by a Multiboot stub (``guest-drivers/qemu_boot.c``) that
gives it what the project's VMM gives it: its parameter block, the long-mode page
tables and GDT, the stack.  QEMU gets two ``ne2k_isa`` (0x300/IRQ 9, 0x320/IRQ 10) on
one hub, so a frame one sends the other receives.

QEMU runs under TCG, which has no exits, so its port accesses are counted from trace
events, as ``bench/qemu_exits.py`` does for IDE: ``memory_region_ops_read``/``_write``
name the region (``ne2000``) and the port of every access.  The window is the guest's
own BEGIN/END marks on the debug port (0x508).  The same program then runs in the
emulator, whose NE2000 counts its accesses by port; both tallies must be equal, port by
port, and both runs must verify their data (guest result 0, no byte wrong).  Equal
accesses mean equal exits under one exit model: the emulator's exits per packet (KVM's
rule: one exit per ``out``/``in`` and per ``rep outsw`` element, ``rep insw`` batched
per page) are then QEMU's too.

Usage::

    python bench/qemu_ne2000_exits.py                   # table, QEMU 7.2 (+10.0 if unpacked)
    python bench/qemu_ne2000_exits.py --json --packets 36 --batch 1 9 --cpu soft
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator import guest_build, qemu_program
from emulator import ne2000_paths as paths
from emulator import run as emu
from emulator.devices import debugport, dp8390
from emulator.machine import Machine
from virtio.testing.qemu import QEMU_VERSIONS, QemuBinary, QemuUnavailable, qemu_binary

TRACE_EVENTS = ("memory_region_ops_read", "memory_region_ops_write")
NE2000_REGION = "ne2000"
CMD_PORT = debugport.DEBUG_BASE + debugport.REG_CMD
ARG_PORT = debugport.DEBUG_BASE + debugport.REG_ARG
QEMU_RAM_MIB = 64
_MR_RE = qemu_program.MR_RE


@dataclasses.dataclass
class Tally:
    """What one run's measurement window holds."""

    #: NE2000 port accesses by "nic<i>:<offset>:r|w" (offset from the board's I/O base).
    accesses: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: every other vCPU access inside the window (expected: none).
    other: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    marked: bool = False
    result: int | None = None
    ios: int | None = None
    verify_errors: int | None = None

    @property
    def total(self) -> int:
        return sum(self.accesses.values())


def nic_key(port: int, rw: str) -> str | None:
    for i, base in enumerate(paths.IO_BASES):
        if base <= port < base + dp8390.IO_LEN:
            return f"nic{i}:{port - base:#04x}:{rw}"
    return None


def parse_trace(lines: Iterable[str]) -> Tally:
    """Count NE2000 accesses between the guest's BEGIN and END marks; read its reports."""
    t = Tally()
    inside = began = False
    arg = 0
    for line in lines:
        m = _MR_RE.search(line)
        if m is None or int(m["cpu"]) < 0:
            continue
        port, value, rw = int(m["addr"], 16), int(m["value"], 16), m["rw"][0]
        if rw == "w" and port == ARG_PORT:
            arg = value
            continue
        if rw == "w" and port == CMD_PORT:
            if value == debugport.CMD_BEGIN:
                inside = began = True
            elif value == debugport.CMD_END and inside:
                inside = False
                t.marked = began
            elif value == debugport.CMD_RESULT:
                t.result = arg
            elif value == debugport.CMD_IOS:
                t.ios = arg
            elif value == debugport.CMD_ERRORS:
                t.verify_errors = arg
            continue  # marks are not counted (the emulator subtracts them too)
        if not inside:
            continue
        key = nic_key(port, rw) if m["name"] == NE2000_REGION else None
        if key is not None:
            t.accesses[key] += 1
        else:
            t.other[f"{m['name']}:{port:#x}:{rw}"] += 1
    return t


def nic_devices() -> list[str]:
    """Two ``ne2k_isa`` on one hub, at the emulator's I/O bases, IRQs and MACs."""
    args: list[str] = []
    for i, (base, irq, mac) in enumerate(zip(paths.IO_BASES, paths.IRQS, paths.MACS, strict=True)):
        args += [
            "-netdev", f"hubport,id=n{i},hubid=0",
            "-device",
            f"ne2k_isa,netdev=n{i},iobase={base:#x},irq={irq},mac={mac.hex(':')}",
        ]  # fmt: skip
    return args


def run_qemu(binary: QemuBinary, npackets: int, batch: int, timeout: float = 300.0) -> Tally:
    """Boot the guest program in QEMU (TCG) with two ne2k_isa on a hub; its tally."""
    with tempfile.TemporaryDirectory(prefix="pyvirtio-ne2k-") as tmp_s:
        tmp = Path(tmp_s)
        params = tmp / "params.bin"
        params.write_bytes(paths.params(npackets, batch, emu.IRQ_POLL, emu.WorkloadSpec.seed))
        args = qemu_program.command(binary, "ne2000", params, tmp, nic_devices())
        with open(qemu_program.run(binary, args, tmp, timeout), errors="replace") as f:
            return parse_trace(f)


def run_emulator(npackets: int, batch: int, cpu: str) -> tuple[Tally, dict[str, Any]]:
    """The same program in the emulator: its NE2000 accesses in the window, and its exits."""
    spec = emu.WorkloadSpec("ne2000", npackets * paths.FRAME_LEN, batch, False)
    assert paths.packet_count(spec.total_bytes, batch) == npackets
    m = Machine(ram_size=emu.DEFAULT_RAM, cpu=cpu)
    snaps: dict[int, collections.Counter[str]] = {}
    try:
        verify = emu.PATHS["ne2000"].setup(m, spec)
        nics = [m.devices[f"ne2000-{i}"] for i in range(len(paths.IO_BASES))]
        machine_mark = m.debug.on_mark

        def on_mark(cmd: int) -> None:
            if cmd in (debugport.CMD_BEGIN, debugport.CMD_END):
                snaps[cmd] = collections.Counter(
                    {f"nic{i}:{k}": v for i, n in enumerate(nics) for k, v in n.accesses.items()}
                )
            assert machine_mark is not None
            machine_mark(cmd)

        m.debug.on_mark = on_mark
        m.load_elf(guest_build.build("ne2000"))
        m.run(timeout=600)
        t = Tally(
            accesses=snaps[debugport.CMD_END] - snaps[debugport.CMD_BEGIN],
            marked=True,
            result=m.debug.result,
            ios=m.debug.ios,
            verify_errors=m.debug.verify_errors,
        )
        window = m.window
        assert window is not None
        exits = {
            "exits": window.total,
            "by_reason": dict(window.by_reason),
            "verified": m.debug.result == 0 and verify(),
            "cpu": m.cpu_name,
        }
        return t, exits
    finally:
        m.close()


def compare(npackets: int, batch: int, cpu: str, versions: Sequence[str]) -> dict[str, Any]:
    ours, exits = run_emulator(npackets, batch, cpu)
    row: dict[str, Any] = {
        "packets": npackets,
        "batch": batch,
        "frame_len": paths.FRAME_LEN,
        "emulator": {
            "cpu": exits["cpu"],
            "verified": exits["verified"],
            "accesses": ours.total,
            "accesses_per_packet": ours.total / npackets,
            "exits": exits["exits"],
            "exits_per_packet": exits["exits"] / npackets,
            "exits_per_mib": exits["exits"] / (npackets * paths.FRAME_LEN / (1 << 20)),
        },
        "qemu": {},
    }
    for version in versions:
        try:
            binary = qemu_binary(version)
        except QemuUnavailable as exc:
            row["qemu"][version] = {"skipped": str(exc)}
            continue
        q = run_qemu(binary, npackets, batch)
        diff = {
            k: (q.accesses.get(k, 0), ours.accesses.get(k, 0))
            for k in sorted(set(q.accesses) | set(ours.accesses))
            if q.accesses.get(k, 0) != ours.accesses.get(k, 0)
        }
        row["qemu"][version] = {
            "result": q.result,
            "ios": q.ios,
            "verify_errors": q.verify_errors,
            "window_marked": q.marked,
            "accesses": q.total,
            "accesses_per_packet": q.total / npackets,
            "other_accesses": dict(q.other),
            "by_port": dict(sorted(q.accesses.items())),
            "differences": diff,  # port -> (QEMU, emulator)
            "equal": q.marked and not diff and q.result == 0 and q.ios == npackets,
        }
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "batch", "packets", "QEMU", "QEMU result", "QEMU accesses/pkt",
        "emulator accesses/pkt", "equal by port", "emulator exits/pkt", "exits/MiB",
    ]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e = r["emulator"]
        for version, q in r["qemu"].items():
            if "skipped" in q:
                cells = [str(r["batch"]), str(r["packets"]), version, "skipped", "", "", "", "", ""]
            else:
                cells = [
                    str(r["batch"]),
                    str(r["packets"]),
                    version,
                    "ok" if q["result"] == 0 else f"FAILED ({q['result']})",
                    f"{q['accesses_per_packet']:.3f}",
                    f"{e['accesses_per_packet']:.3f}",
                    "yes" if q["equal"] else "NO",
                    f"{e['exits_per_packet']:.3f}",
                    f"{e['exits_per_mib']:,.0f}",
                ]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=72, help="frames per run (default 72)")
    ap.add_argument(
        "--batch", type=int, nargs="+", default=[1, paths.MAX_QUEUE_DEPTH], help="batch sizes"
    )
    ap.add_argument("--cpu", choices=["kvm", "soft", "auto"], default="auto")
    ap.add_argument("--qemu", nargs="+", default=list(QEMU_VERSIONS), help="QEMU versions")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for batch in args.batch:
        step = 2 * batch
        n = max(step, args.packets // step * step)
        rows.append(compare(n, batch, args.cpu, args.qemu))
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
    else:
        print(format_table(rows))
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    ok = all(
        r["emulator"]["verified"] and all(q.get("equal", True) for q in r["qemu"].values())
        for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
