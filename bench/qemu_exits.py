#!/usr/bin/env python3
"""Emulated (IDE) vs paravirtual (virtio-blk) I/O in QEMU: would-be vmexits per I/O.

Boots the test guest (:mod:`virtio.testing.qemu`: Debian 6.1 kernel + busybox/fio
initramfs) once with two disks, ``-drive if=ide`` (PIIX3 IDE, Linux ``ata_piix``
with bus-master DMA) and ``virtio-blk-pci``, and runs the same O_DIRECT 4 KiB fio
workload on each (randread and randwrite; QD 1 and 32 on virtio-blk, QD 1 on IDE,
which has one command in flight anyway).  For each run it counts, per I/O:

- **register accesses**: guest PIO/MMIO accesses to the disk controller's registers
  (IDE: task file, control block, data port, BMDMA command/status/PRD address;
  virtio: common/ISR/device config and MSI-X table, i.e. everything but the notify
  area).  On KVM each one is a PIO or MMIO exit.
- **notifies**: guest writes to the virtio-pci notify area (one exit each on KVM,
  handled in the kernel when it hits an ioeventfd).
- **interrupts**: interrupts the guest took for the disk (``/proc/interrupts`` delta,
  cross-checked with QEMU's ``ioapic_set_irq`` pin 14 raises / ``virtio_notify``).
  Counted as one exit each: on KVM without posted interrupts, an interrupt for a
  running vCPU kicks it out with an IPI, and one for a halted vCPU ends a HLT exit.
- **LAPIC accesses**: guest MMIO accesses to its local APIC (EOI, timer, ICR...):
  exits on KVM without APICv (xAPIC MMIO or x2APIC MSR writes).
- **≈exits**: the sum of the four; **of which timer**: EOIs of local timer ticks and
  APIC timer (re)programming, which follow wall-clock time rather than I/Os (under TCG
  an I/O takes milliseconds, so they weigh far more per I/O than they would on KVM).

Under TCG there are no vmexits, so these are counted from QEMU trace events
(``memory_region_ops_read``/``memory_region_ops_write``: every dispatch of a vCPU
access to a non-RAM region, with its region name) through the ``log`` trace backend.
Tracing is switched on with QMP ``trace-event-set-state`` only around each run, and
the guest writes two marker bytes to I/O port 0x80 (``/dev/port``) right before and
after fio, so the window excludes boot, the serial console traffic of the harness
and everything else.  The I/O count is the disk's ``/sys/block/*/stat`` delta read
inside the window (fio's own count is reported beside it).

virtio-blk is started with ``ioeventfd=off`` so that every notify write reaches
QEMU's MMIO dispatch (and the trace); with an ioeventfd, QEMU's memory core signals
the eventfd before tracing and several kicks can merge into one eventfd read.

With ``--accel kvm`` (where /dev/kvm boots Linux: not these CI machines), KVM's own
exit counters are also read with QMP ``query-stats`` (QEMU >= 7.1) around each run.

Usage::

    python bench/qemu_exits.py                  # table (< 3 min under TCG)
    python bench/qemu_exits.py --json           # JSON with the full breakdown
    python bench/qemu_exits.py --ios 300 --qd 1 --rw randread
    python bench/qemu_exits.py --accel kvm      # + KVM exit counters (query-stats)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from virtio.testing.guest_image import GuestImage, ensure_image
from virtio.testing.qemu import Disk, QemuGuest, QmpError

# --------------------------------------------------------------------------- constants

#: Trace events switched on during a run.  ``memory_region_ops_*`` do the counting;
#: the others cross-check it (commands, kicks, interrupts raised by the devices).
TRACE_EVENTS: tuple[str, ...] = (
    "memory_region_ops_read",
    "memory_region_ops_write",
    "ide_exec_cmd",
    "ioapic_set_irq",
    "virtio_queue_notify",
    "virtio_notify",
    "virtio_blk_handle_read",
    "virtio_blk_handle_write",
)

#: QEMU memory-region names of the PIIX IDE controller (hw/ide/ioport.c, hw/ide/piix.c):
#: ``ide`` the task file + data port and the control block, ``piix-bmdma`` BMDMA
#: command/status, ``bmdma`` the PRD table address.
IDE_REGIONS = frozenset({"ide", "piix-bmdma", "bmdma"})
#: virtio-pci regions (hw/virtio/virtio-pci.c) other than notify, and MSI-X.
VIRTIO_REGION_PREFIXES = ("virtio-pci", "msix-table", "msix-pba")
VIRTIO_NOTIFY_PREFIX = "virtio-pci-notify"
LAPIC_REGION = "apic-msi"  # QEMU maps the LAPIC MMIO page and MSI writes on one region
LAPIC_BASE = 0xFEE00000

MARK_PORT = 0x80  # "ioport80" in QEMU's pc machine: a write-only dummy
MARK_BEGIN = 0xA5
MARK_END = 0x5A
MARKER_REGION = "ioport80"

LAPIC_REGISTERS = {
    0x020: "id",
    0x030: "version",
    0x080: "tpr",
    0x0B0: "eoi",
    0x0D0: "ldr",
    0x0E0: "dfr",
    0x0F0: "svr",
    0x280: "esr",
    0x300: "icr_lo",
    0x310: "icr_hi",
    0x320: "lvt_timer",
    0x350: "lvt_lint0",
    0x360: "lvt_lint1",
    0x370: "lvt_error",
    0x380: "timer_initial_count",
    0x390: "timer_current_count",
    0x3E0: "timer_divide",
}

#: KVM vCPU statistics summed from ``query-stats`` (all cumulative counters).
KVM_STATS = (
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "irq_window_exits",
    "nmi_window_exits",
    "request_irq_exits",
    "signal_exits",
    "irq_injections",
    "halt_wakeup",
)

DEVICES = {"ide": "sda", "virtio": "vda"}
IRQ_NAMES = {"ide": re.compile(r"\bata_piix\b"), "virtio": re.compile(r"\bvirtio\d+-")}

_LINE_RE = re.compile(r"^(?:\d+@\d+\.\d+:)?(?P<event>[a-z0-9_]+) (?P<rest>.*)$")
_MR_RE = re.compile(
    r"cpu (?P<cpu>-?\d+) mr 0x[0-9a-f]+ addr 0x(?P<addr>[0-9a-f]+) "
    r"value 0x(?P<value>[0-9a-f]+) size (?P<size>\d+) name '(?P<name>[^']*)'"
)
_IOAPIC_RE = re.compile(r"vector: (?P<pin>\d+) level: (?P<level>\d+)")


# --------------------------------------------------------------------------- trace parsing


@dataclasses.dataclass
class TraceCounts:
    """What one measurement window of the QEMU trace log holds."""

    #: vCPU accesses to the disk controller's registers, by "region:r|w".
    device_registers: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    #: vCPU writes to the virtio-pci notify area.
    notifies: int = 0
    #: vCPU accesses to the local APIC, by register name ("eoi:w", ...).
    lapic: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: MSI / IOAPIC messages to the APICs (interrupt deliveries, not guest accesses).
    interrupt_messages: int = 0
    #: every other vCPU access to a non-RAM region, by "region:r|w" (PCI config, serial...).
    other: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: the cross-check events, by name (``ioapic_set_irq`` as "ioapic_raise:<pin>").
    events: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: both markers were seen (the window is exact).
    marked: bool = False

    @property
    def register_accesses(self) -> int:
        return sum(self.device_registers.values())

    @property
    def lapic_accesses(self) -> int:
        return sum(self.lapic.values())


def _region_kind(name: str, path: str) -> str:
    if name in IDE_REGIONS:
        return "device" if path == "ide" else "other"
    if name.startswith(VIRTIO_NOTIFY_PREFIX):
        return "notify" if path == "virtio" else "other"
    if name.startswith(VIRTIO_REGION_PREFIXES):
        return "device" if path == "virtio" else "other"
    return "other"


def window(lines: Iterable[str]) -> tuple[list[str], bool]:
    """The lines between the last begin marker and the next end marker (or all, unmarked)."""
    out: list[str] = []
    began = ended = False
    for line in lines:
        if MARKER_REGION in line and line.startswith("memory_region_ops_write", _prefix(line)):
            m = _MR_RE.search(line)
            if m and m["name"] == MARKER_REGION:
                value = int(m["value"], 16)
                if value == MARK_BEGIN:
                    out, began, ended = [], True, False
                    continue
                if value == MARK_END and began:
                    ended = True
                    break
        out.append(line)
    return out, began and ended


def _prefix(line: str) -> int:
    """Length of the optional ``pid@sec.usec:`` prefix (``-msg timestamp=on``)."""
    if line[:1].isdigit():
        colon = line.find(":")
        if colon > 0 and "@" in line[:colon]:
            return colon + 1
    return 0


def parse_trace(lines: Iterable[str], path: str) -> TraceCounts:
    """Count a window of the log-backend trace for the disk on ``path`` (``ide``/``virtio``)."""
    selected, marked = window(lines)
    counts = TraceCounts(marked=marked)
    for line in selected:
        m = _LINE_RE.match(line)
        if m is None:
            continue
        event, rest = m["event"], m["rest"]
        if event in ("memory_region_ops_read", "memory_region_ops_write"):
            mr = _MR_RE.search(rest)
            if mr is None:
                continue
            name, rw = mr["name"], "w" if event.endswith("write") else "r"
            from_cpu = int(mr["cpu"]) >= 0
            if name == LAPIC_REGION:
                offset = int(mr["addr"], 16) - LAPIC_BASE
                index = (offset >> 4) & 0xFF
                if 0 <= offset <= 0xFFF and index != 0 and from_cpu:
                    reg = LAPIC_REGISTERS.get(offset & 0xFF0, f"0x{offset & 0xFF0:03x}")
                    counts.lapic[f"{reg}:{rw}"] += 1
                else:  # an MSI message (from a device, or from the IOAPIC)
                    counts.interrupt_messages += 1
                continue
            if not from_cpu:
                continue  # device-side accesses (DMA to MMIO) are not guest exits
            kind = _region_kind(name, path)
            if kind == "device":
                counts.device_registers[f"{name}:{rw}"] += 1
            elif kind == "notify":
                counts.notifies += 1
            else:
                counts.other[f"{name}:{rw}"] += 1
        elif event == "ioapic_set_irq":
            io = _IOAPIC_RE.search(rest)
            if io is not None and io["level"] == "1":
                counts.events[f"ioapic_raise:{io['pin']}"] += 1
        else:
            counts.events[event] += 1
    return counts


# --------------------------------------------------------------------------- guest side


def parse_interrupts(text: str, path: str) -> int:
    """Sum of the per-CPU counts of the ``/proc/interrupts`` lines of the disk on ``path``."""
    pattern = IRQ_NAMES[path]
    total = 0
    lines = text.strip().splitlines()
    if not lines:
        return 0
    ncpu = len(lines[0].split())
    for line in lines[1:]:
        if not pattern.search(line):
            continue
        fields = line.split()
        total += sum(int(f) for f in fields[1 : 1 + ncpu] if f.isdigit())
    return total


def parse_local_timer(text: str) -> int:
    """Sum of the ``LOC:`` (local APIC timer interrupts) counts in ``/proc/interrupts``."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "LOC:":
            return sum(int(f) for f in fields[1:] if f.isdigit())
    return 0


def parse_block_stat(text: str) -> int:
    """Completed reads + writes in a ``/sys/block/<dev>/stat`` line."""
    fields = [int(f) for f in text.split()]
    return fields[0] + fields[4]


def sh_case(dev: str, rw: str, qd: int, ios: int, engine: str, size_mib: int) -> str:
    """The guest command: markers, snapshots and fio between them."""
    mark = f"dd of=/dev/port bs=1 seek={MARK_PORT} count=1 2>/dev/null"
    fio = (
        f"fio --name=qx --filename=/dev/{dev} --rw={rw} --bs=4k --direct=1 "
        f"--ioengine={engine} --iodepth={qd} --number_ios={ios} --size={size_mib}m "
        f"--randrepeat=0 --norandommap --output-format=json --output=/tmp/qx.json"
    )
    return (
        f"rm -f /tmp/qx.json\n"
        f"printf '\\{MARK_BEGIN:03o}' | {mark}\n"
        f"cat /proc/interrupts > /tmp/qx.irq0; cat /sys/block/{dev}/stat > /tmp/qx.st0\n"
        f"{fio} >/tmp/qx.out 2>&1; echo $? > /tmp/qx.rc\n"
        f"cat /proc/interrupts > /tmp/qx.irq1; cat /sys/block/{dev}/stat > /tmp/qx.st1\n"
        f"printf '\\{MARK_END:03o}' | {mark}\n"
    )


# --------------------------------------------------------------------------- measurement


@dataclasses.dataclass(frozen=True)
class Case:
    path: str  # "ide" or "virtio"
    rw: str
    qd: int

    @property
    def device(self) -> str:
        return DEVICES[self.path]


def default_cases(
    rws: Sequence[str] = ("randread", "randwrite"),
    qds: Sequence[int] = (1, 32),
    paths: Sequence[str] = ("ide", "virtio"),
    ide_qds: Sequence[int] = (1,),
) -> list[Case]:
    cases = []
    for path in paths:
        for rw in rws:
            for qd in ide_qds if path == "ide" else qds:
                cases.append(Case(path, rw, qd))
    return cases


async def _kvm_stats(guest: QemuGuest) -> dict[str, int] | None:
    """Summed vCPU counters of ``query-stats`` (None where there are none: TCG)."""
    assert guest.qmp is not None
    try:
        reply = await guest.qmp.execute(
            "query-stats", {"target": "vcpu", "providers": [{"provider": "kvm"}]}
        )
    except QmpError:
        return None
    totals: dict[str, int] = collections.Counter()
    for entry in reply or []:
        for stat in entry.get("stats", []):
            if isinstance(stat.get("value"), int):
                totals[stat["name"]] += stat["value"]
    return dict(totals) or None


async def _set_tracing(guest: QemuGuest, enable: bool) -> None:
    assert guest.qmp is not None
    for name in TRACE_EVENTS:
        await guest.qmp.execute(
            "trace-event-set-state", {"name": name, "enable": enable, "ignore-unavailable": True}
        )


async def _read_window(log: Path, start: int, timeout: float = 10.0) -> list[str]:
    """The log from ``start`` once the end marker is in it (QEMU flushes lazily)."""
    needle = f"value 0x{MARK_END:x} size 1 name '{MARKER_REGION}'".encode()
    data = b""
    with trio.move_on_after(timeout):
        while True:
            with open(log, "rb") as f:
                f.seek(start)
                data = f.read()
            if needle in data:
                break
            await trio.sleep(0.1)
    return data.decode(errors="replace").splitlines()


def _per_io(value: float, ios: int) -> float:
    return round(value / ios, 3) if ios > 0 else math.nan


async def run_case(
    guest: QemuGuest,
    log: Path,
    case: Case,
    *,
    ios: int,
    engine: str = "libaio",
    size_mib: int = 48,
    keep_trace: Path | None = None,
) -> dict[str, Any]:
    """Run one fio job in the guest with tracing on; its counts and per-I/O figures."""
    kvm_before = await _kvm_stats(guest)
    start = log.stat().st_size
    await _set_tracing(guest, True)
    t0 = time.monotonic()
    try:
        await guest.run(
            sh_case(case.device, case.rw, case.qd, ios, engine, size_mib),
            timeout=max(120.0, ios * 0.2),
        )
    finally:
        await _set_tracing(guest, False)
    seconds = time.monotonic() - t0
    kvm_after = await _kvm_stats(guest)
    lines = await _read_window(log, start)
    if keep_trace is not None:
        keep_trace.mkdir(parents=True, exist_ok=True)
        name = f"{case.path}-{case.rw}-qd{case.qd}.log"
        (keep_trace / name).write_text("\n".join(lines) + "\n")
    counts = parse_trace(lines, case.path)

    rc = (await guest.run("cat /tmp/qx.rc")).output.strip()
    if rc != "0":
        out = (await guest.run("cat /tmp/qx.out", check=False)).output
        raise RuntimeError(f"fio failed in the guest ({rc}):\n{out}")
    st = (await guest.run("cat /tmp/qx.st0; echo; cat /tmp/qx.st1")).output.split("\n\n")
    block_ios = parse_block_stat(st[1]) - parse_block_stat(st[0])
    irq0 = (await guest.run("cat /tmp/qx.irq0")).output
    irq1 = (await guest.run("cat /tmp/qx.irq1")).output
    interrupts = parse_interrupts(irq1, case.path) - parse_interrupts(irq0, case.path)
    timer_irqs = parse_local_timer(irq1) - parse_local_timer(irq0)
    report = json.loads((await guest.run("cat /tmp/qx.json")).output)
    job = report["jobs"][0]
    fio_ios = int(job["read"]["total_ios"]) + int(job["write"]["total_ios"])

    regs = counts.register_accesses
    lapic = counts.lapic_accesses
    exits = regs + counts.notifies + interrupts + lapic
    # Time-driven, not I/O-driven: EOIs of local timer ticks and timer (re)programming.
    # Under TCG one I/O takes milliseconds, so ticks land in many of them; on KVM, where
    # an I/O takes tens of microseconds, they mostly do not.
    timer = min(timer_irqs, counts.lapic["eoi:w"]) + sum(
        n for reg, n in counts.lapic.items() if reg.startswith(("timer_", "lvt_timer"))
    )
    result: dict[str, Any] = {
        "path": case.path,
        "device": case.device,
        "rw": case.rw,
        "qd": case.qd,
        "ios": block_ios,
        "fio_ios": fio_ios,
        "seconds": round(seconds, 2),
        "iops": round(fio_ios / seconds, 1) if seconds > 0 else None,
        "window_marked": counts.marked,
        "per_io": {
            "register_accesses": _per_io(regs, block_ios),
            "notifies": _per_io(counts.notifies, block_ios),
            "interrupts": _per_io(interrupts, block_ios),
            "lapic_accesses": _per_io(lapic, block_ios),
            "exits": _per_io(exits, block_ios),
            "timer_lapic_accesses": _per_io(timer, block_ios),
            "exits_without_timer": _per_io(exits - timer, block_ios),
        },
        "totals": {
            "register_accesses": regs,
            "notifies": counts.notifies,
            "interrupts": interrupts,
            "lapic_accesses": lapic,
            "exits": exits,
            "timer_lapic_accesses": timer,
            "local_timer_interrupts": timer_irqs,
            "interrupt_messages": counts.interrupt_messages,
        },
        "registers": dict(sorted(counts.device_registers.items())),
        "lapic": dict(sorted(counts.lapic.items())),
        "other_accesses": dict(sorted(counts.other.items())),
        "events": dict(sorted(counts.events.items())),
    }
    if kvm_before is not None and kvm_after is not None:
        delta = {k: kvm_after.get(k, 0) - kvm_before.get(k, 0) for k in KVM_STATS}
        result["kvm"] = {
            "totals": delta,
            "per_io": {k: _per_io(v, block_ios) for k, v in delta.items()},
        }
    return result


def guest_kwargs(accel: str, smp: int) -> dict[str, Any]:
    """QemuGuest arguments for a measurement guest (disks and tracing added by :func:`measure`)."""
    # Under TCG the guest would pick the HPET as clocksource (TCG's TSC is not trusted
    # at boot) and read it ~50 times per I/O; on KVM it would use kvm-clock.  Keep
    # the window about the disk: use the TSC, as a KVM guest effectively does.
    append = "" if accel.startswith("kvm") else "clocksource=tsc tsc=reliable"
    return {"accel": accel, "smp": smp, "append": append, "fio": True, "qmp": True}


async def measure(
    image: GuestImage,
    cases: Sequence[Case],
    *,
    ios: int = 1000,
    accel: str = "tcg",
    smp: int = 1,
    engine: str = "libaio",
    keep_trace: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Boot one guest with an IDE and a virtio-blk disk, run every case; the results."""
    size_mib = 64
    with tempfile.TemporaryDirectory(prefix="pyvirtio-qexits-") as tmp_s:
        tmp = Path(tmp_s)
        images = {}
        for path in ("ide", "virtio"):
            images[path] = tmp / f"{path}.img"
            with open(images[path], "wb") as f:
                f.truncate(size_mib << 20)
        events = tmp / "events"
        events.write_text("")  # tracing on, no event enabled until a run
        log = tmp / "trace.log"
        disks = [
            Disk(images["ide"], interface="ide"),
            Disk(images["virtio"], interface="virtio", props={"ioeventfd": False}),
        ]
        t0 = time.monotonic()
        async with QemuGuest(
            image,
            devices=disks,
            extra_args=["-trace", f"events={events}", "-D", str(log)],
            **guest_kwargs(accel, smp),
        ) as guest:
            boot = time.monotonic() - t0
            kernel = (await guest.run("uname -r")).output.strip()
            clocksource = (
                await guest.run(
                    "cat /sys/devices/system/clocksource/clocksource0/current_clocksource"
                )
            ).output.strip()
            results = []
            for case in cases:
                r = await run_case(
                    guest,
                    log,
                    case,
                    ios=ios,
                    engine=engine,
                    size_mib=size_mib - 16,
                    keep_trace=keep_trace,
                )
                if progress:
                    print(
                        f"  {case.path} {case.rw} QD{case.qd}: {r['ios']} I/Os in "
                        f"{r['seconds']} s, {r['per_io']['exits']} exits/IO",
                        file=sys.stderr,
                        flush=True,
                    )
                results.append(r)
    return {
        "accel": accel,
        "smp": smp,
        "engine": engine,
        "ios_per_run": ios,
        "guest_kernel": kernel,
        "clocksource": clocksource,
        "boot_seconds": round(boot, 1),
        "results": results,
    }


# --------------------------------------------------------------------------- output


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table of the per-I/O figures."""
    kvm = any("kvm" in r for r in report["results"])
    head = [
        "path",
        "rw",
        "QD",
        "I/Os",
        "register accesses/IO",
        "notifies/IO",
        "interrupts/IO",
        "LAPIC accesses/IO",
        "≈exits/IO",
        "of which timer/IO",
    ]
    if kvm:
        head.append("KVM exits/IO")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        p = r["per_io"]
        label = "IDE (ata_piix, BMDMA)" if r["path"] == "ide" else "virtio-blk-pci"
        cells = [
            label,
            r["rw"],
            str(r["qd"]),
            str(r["ios"]),
            _fmt(p["register_accesses"]),
            _fmt(p["notifies"]),
            _fmt(p["interrupts"]),
            _fmt(p["lapic_accesses"]),
            _fmt(p["exits"]),
            _fmt(p["timer_lapic_accesses"]),
        ]
        if kvm:
            cells.append(_fmt(r.get("kvm", {}).get("per_io", {}).get("exits", math.nan)))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ios", type=int, default=1000, help="I/Os per fio run (default 1000)")
    parser.add_argument(
        "--rw", default="randread,randwrite", help="fio patterns (default randread,randwrite)"
    )
    parser.add_argument("--qd", default="1,32", help="virtio-blk queue depths (default 1,32)")
    parser.add_argument("--ide-qd", default="1", help="IDE queue depths (default 1)")
    parser.add_argument("--paths", default="ide,virtio", help="ide,virtio (default both)")
    parser.add_argument("--engine", default="libaio", help="fio ioengine (libaio, psync)")
    parser.add_argument(
        "--accel",
        default=os.environ.get("PYVIRTIO_QEMU_ACCEL") or "tcg",
        help="tcg (default) or kvm (adds QMP query-stats exit counters)",
    )
    parser.add_argument("--smp", type=int, default=1, help="guest vCPUs (default 1)")
    parser.add_argument("--json", action="store_true", help="print the full JSON report")
    parser.add_argument("--keep-trace", type=Path, help="save each run's trace window here")
    args = parser.parse_args(argv)

    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    cases = default_cases(
        rws=[x for x in args.rw.split(",") if x],
        qds=ints(args.qd),
        paths=[x for x in args.paths.split(",") if x],
        ide_qds=ints(args.ide_qd),
    )
    unknown = {c.path for c in cases} - set(DEVICES)
    if unknown:
        parser.error(f"unknown path(s): {', '.join(sorted(unknown))}")
    t0 = time.monotonic()
    image = ensure_image(fio=True)
    report = trio.run(
        lambda: measure(
            image,
            cases,
            ios=args.ios,
            accel=args.accel,
            smp=args.smp,
            engine=args.engine,
            keep_trace=args.keep_trace,
            progress=not args.json,
        )
    )
    report["seconds"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        print(
            f"\n{report['accel']}, {report['smp']} vCPU, guest {report['guest_kernel']} "
            f"(clocksource {report['clocksource']}), fio {report['engine']} 4k O_DIRECT; "
            f"{report['seconds']} s"
        )
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
