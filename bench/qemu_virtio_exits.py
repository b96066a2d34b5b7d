#!/usr/bin/env python3
"""The emulator's virtio-net and virtio-pci paths checked against QEMU: the same program.

As ``bench/qemu_ne2000_exits.py`` does for the NE2000, the workload's own guest program
runs unchanged in QEMU (TCG), booted by the Multiboot stub ``guest-drivers/qemu_boot.c``,
and QEMU's ``memory_region_ops_read``/``_write`` trace events give every access the vCPU
makes to the device between the guest's BEGIN and END marks (debug port 0x508).  The
same program then runs in the emulator, whose transports count their exits by register.
Every MMIO access is one exit on KVM (no string-I/O batching applies to MMIO), so equal
accesses by register are equal exits.

Workloads:

* ``virtio-net`` -- ``guest-drivers/virtio_net.c`` (two NICs, frames one way then back,
  every byte checked) against the emulator's ``virtio-net`` path (two ``VirtioNet`` on the
  switch, virtio-mmio).  QEMU's ``pc`` machine has no virtio-mmio and the program drives
  virtio-mmio NICs, so QEMU runs the ``microvm`` machine, whose virtio-mmio slots take
  ``virtio-net-device`` (modern: ``force-legacy=false``); the two NICs share a hub.
* ``virtio-blk-pci`` -- ``guest-drivers/virtio_blk.c`` with ``mmio_base`` 0 (the device is
  found on the PCI bus: 4 KiB writes, a flush, read-verify) against the emulator's
  ``virtio-pci`` path; QEMU runs ``pc`` with ``virtio-blk-pci,disable-legacy=on`` on a raw
  file, BARs assigned by its firmware.

``virtio-net-packed`` and ``virtio-blk-pci-packed`` are the same with the packed ring
(``packed=on`` on QEMU's devices, the emulator's ``-packed`` paths), and
``virtio-net-noevent`` without EVENT_IDX (``event_idx=off``, flag-based suppression).

Both QEMU devices run with ``ioeventfd=off``: with an ioeventfd QEMU's memory core signals
the eventfd before the trace point, so a notify would not be traced (on KVM it is still
one, in-kernel, exit).  Under TCG the device runs beside the vCPU (QEMU completes a
request or moves a frame after the notify write returns), while the emulator's device
finishes the batch inside the notify exit; the program polls the used ring in RAM either
way, and reads the device status only after 200,000 empty polls.  Such status reads
(``poll_reads``) follow QEMU's timing, so the register-by-register comparison leaves
them out and reports them apart (0 in the emulator by construction; in QEMU mostly 0,
once 1 in 32 requests).  ``deviations``: receive headers the program objected to in
QEMU (``guest-drivers/virtio_net.c`` value 5); the data itself must verify.

Usage::

    python bench/qemu_virtio_exits.py                       # split rings, QD 1 and 32
    python bench/qemu_virtio_exits.py --workloads virtio-net --json --qemu 7.2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator import run as emu  # noqa: I001 -- emulator.run first: it registers the paths
from emulator import qemu_program
from emulator import virtio_mmio as vmmio
from emulator import virtio_net_paths as vnet
from emulator.devices import debugport
from emulator.ne2000_paths import packet_count
from virtio.testing.qemu import QEMU_VERSIONS, QemuBinary, QemuUnavailable, qemu_binary
from virtio.transport.mmio import CONFIG_BASE, REGISTER_NAMES
from virtio.transport.pci import COMMON_FIELDS

CMD_PORT, ARG_PORT = qemu_program.CMD_PORT, qemu_program.ARG_PORT
# microvm's virtio-mmio slots (512 bytes each from 0xfeb00000); QEMU fills them from the
# last one down, so the first virtio-net-device is at 0xfeb02e00, the second below it.
MICROVM_MMIO_BASES = (0xFEB0_2E00, 0xFEB0_2C00)
MICROVM_MMIO_SIZE = 0x200
PCI_REGION_REGISTERS = {  # QEMU's region name prefix -> the emulator's register name
    "virtio-pci-isr": "isr",
    "virtio-pci-device": "config",
    "virtio-pci-notify": "queue_notify",
    "msix-table": "msix_table",
    "msix-pba": "msix_pba",
}
POLL_REGISTERS = ("status", "device_status")  # read while waiting for a slow device
_MR_RE = qemu_program.MR_RE


@dataclasses.dataclass
class Tally:
    """One run's measurement window: device accesses by "<device>.<register>"."""

    accesses: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: every other vCPU access inside the window (expected: none).
    other: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    marked: bool = False
    result: int | None = None
    ios: int | None = None
    verify_errors: int | None = None
    #: the program's dbg_value reports (virtio_net.c: 5 = receive headers it objects to).
    values: dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.accesses.values())

    @property
    def poll_reads(self) -> int:
        return sum(v for k, v in self.accesses.items() if is_poll_read(k))


def is_poll_read(key: str) -> bool:
    """A device-status read: the program asks it only after a long silence of the device."""
    return key.rsplit(".", 1)[-1] in POLL_REGISTERS


def net_register(name: str, addr: int) -> str | None:
    """A microvm virtio-mmio access as the emulator names it: ``virtio-net-<i>.<reg>``."""
    if name != "virtio-mmio":
        return None
    for i, base in enumerate(MICROVM_MMIO_BASES):
        if base <= addr < base + MICROVM_MMIO_SIZE:
            off = addr - base
            reg = "config" if off >= CONFIG_BASE else REGISTER_NAMES.get(off, f"{off:#x}")
            return f"virtio-net-{i}.{reg}"
    return None


def pci_register(name: str, addr: int) -> str | None:
    """A virtio-blk-pci access as the emulator names it: ``virtio-blk.<reg>``.  QEMU puts
    each structure in a page of its own, so the offset in it is the address's low 12 bits."""
    if name.startswith("virtio-pci-common"):
        field = COMMON_FIELDS.get(addr & 0xFFF)
        return f"virtio-blk.{field[0] if field else f'common+{addr & 0xFFF:#x}'}"
    for prefix, reg in PCI_REGION_REGISTERS.items():
        if name.startswith(prefix):
            return f"virtio-blk.{reg}"
    return None


def parse_trace(lines: Iterable[str], register: Callable[[str, int], str | None]) -> Tally:
    """Count device accesses between the guest's BEGIN and END marks; read its reports."""
    t = Tally()
    inside = began = False
    arg = key = 0
    for line in lines:
        m = _MR_RE.search(line)
        if m is None or int(m["cpu"]) < 0:
            continue  # cpu -1: QEMU's own accesses (MSI messages), not the guest's
        addr, value, rw = int(m["addr"], 16), int(m["value"], 16), m["rw"]
        if rw == "write" and addr == ARG_PORT:
            arg = value
            continue
        if rw == "write" and addr == CMD_PORT:
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
            elif value == debugport.CMD_KEY:
                key = arg
            elif value == debugport.CMD_VALUE:
                t.values[key] = arg
            continue  # marks are not counted (the emulator subtracts them too)
        if not inside:
            continue
        reg = register(m["name"], addr)
        if reg is not None:
            t.accesses[reg] += 1
        else:
            t.other[f"{m['name']}:{addr:#x}:{rw[0]}"] += 1
    return t


@dataclasses.dataclass(frozen=True)
class Workload:
    """One comparison: the emulator path, the guest program, the QEMU machine."""

    name: str
    path: str  # emulator.run path
    program: str
    machine: str
    unit: str
    io_bytes: int
    register: Callable[[str, int], str | None]
    count: Callable[[int, int], int]  # (total bytes, queue depth) -> packets or requests
    params: Callable[[int, int], bytes]  # (count, queue depth) -> the parameter block
    devices: Callable[[Path, int], list[str]]  # (temp dir, count) -> QEMU arguments
    max_queue_depth: int
    ios_per_count: int = 1  # virtio-blk: every request is written, then read back
    #: the program's dbg_value key for device deviations it tolerates but counts
    deviation_key: int | None = None


def _net_params(npackets: int, qd: int, *, packed: bool, event_idx: bool = True) -> bytes:
    p = vnet.params(
        npackets, qd, emu.IRQ_POLL, emu.WorkloadSpec.seed, event_idx=event_idx, packed=packed
    )
    # the same block with QEMU's slot addresses in mmio_base[] (struct params, virtio_net.c)
    fields = list(vnet.NET_PARAMS.unpack(p))
    fields[12:14] = MICROVM_MMIO_BASES
    return vnet.NET_PARAMS.pack(*fields)


def _net_devices(tmp: Path, npackets: int, *, packed: bool, event_idx: bool = True) -> list[str]:
    args = [
        "-global", "virtio-mmio.force-legacy=false",  # modern virtio-mmio (version 2)
        "-global", "virtio-mmio.ioeventfd=off",
    ]  # fmt: skip
    for i, mac in enumerate(vnet.MACS):
        args += [
            "-netdev", f"hubport,id=n{i},hubid=0",
            "-device",
            f"virtio-net-device,netdev=n{i},mac={mac.hex(':')},packed={_on(packed)},"
            f"event_idx={_on(event_idx)}",
        ]  # fmt: skip
    return args


def _blk_params(nreqs: int, qd: int, *, packed: bool) -> bytes:
    return vmmio.VIRTIO_PARAMS.pack(
        emu.PARAMS_MAGIC, emu.PARAMS_VERSION, emu.IRQ_POLL, 11, nreqs, qd, 1, int(packed),
        0, vmmio.RING_ADDR, vmmio.BUF_ADDR, vmmio.HDR_ADDR,  # mmio_base 0: virtio-pci
        emu.WorkloadSpec.seed, vmmio.QUEUE_SIZE, 1, emu.REQUEST_BYTES,
    )  # fmt: skip


def _blk_devices(tmp: Path, nreqs: int, *, packed: bool) -> list[str]:
    image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(nreqs * emu.REQUEST_BYTES + (1 << 20))
    return [
        "-blockdev", f"driver=file,filename={image},node-name=disk0",
        "-device",
        "virtio-blk-pci,drive=disk0,disable-legacy=on,ioeventfd=off,num-queues=1,"
        f"queue-size={vmmio.QUEUE_SIZE},packed={_on(packed)}",
    ]  # fmt: skip


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _workloads() -> dict[str, Workload]:
    """Split ring + EVENT_IDX (the emulator's default paths), packed ring variants, and
    virtio-net without EVENT_IDX."""
    out = {}
    for packed, suffix in ((False, ""), (True, "-packed")):
        for w in (
            Workload(
                name=f"virtio-net{suffix}",
                path=f"virtio-net{suffix}",
                program="virtio_net",
                machine="microvm",
                unit="packet",
                io_bytes=vnet.FRAME_LEN,
                register=net_register,
                count=lambda total, qd: packet_count(total, qd, vnet.FRAME_LEN),
                params=functools.partial(_net_params, packed=packed),
                devices=functools.partial(_net_devices, packed=packed),
                max_queue_depth=vnet.MAX_QUEUE_DEPTH,
                deviation_key=vnet.VALUE_BAD_HEADERS,
            ),
            Workload(
                name=f"virtio-blk-pci{suffix}",
                path=f"virtio-pci{suffix}",
                program="virtio_blk",
                machine="pc",
                unit="request",
                io_bytes=emu.REQUEST_BYTES,
                register=pci_register,
                count=lambda total, qd: total // emu.REQUEST_BYTES,
                params=functools.partial(_blk_params, packed=packed),
                devices=functools.partial(_blk_devices, packed=packed),
                max_queue_depth=vmmio.MAX_QUEUE_DEPTH,
                ios_per_count=2,
            ),
        ):
            out[w.name] = w
    noevent = dataclasses.replace(  # flag-based notification suppression (no EVENT_IDX)
        out["virtio-net"],
        name="virtio-net-noevent",
        path="virtio-net-noevent",
        params=functools.partial(_net_params, packed=False, event_idx=False),
        devices=functools.partial(_net_devices, packed=False, event_idx=False),
    )
    out[noevent.name] = noevent
    return out


WORKLOADS = _workloads()
DEFAULT_WORKLOADS = ("virtio-net", "virtio-blk-pci")


def run_qemu(binary: QemuBinary, w: Workload, count: int, qd: int, timeout: float = 300.0) -> Tally:
    """Boot the workload's program in QEMU (TCG) for ``count`` packets or requests at
    queue depth ``qd``; the tally of its measurement window."""
    with tempfile.TemporaryDirectory(prefix="pyvirtio-qemu-virtio-") as tmp_s:
        tmp = Path(tmp_s)
        params = tmp / "params.bin"
        params.write_bytes(w.params(count, qd))
        args = qemu_program.command(
            binary, w.program, params, tmp, w.devices(tmp, count), machine=w.machine,
            nodefaults=True,
        )  # fmt: skip
        with open(qemu_program.run(binary, args, tmp, timeout), errors="replace") as f:
            return parse_trace(f, w.register)


def run_emulator(w: Workload, total: int, qd: int, cpu: str) -> dict[str, Any]:
    """The same program on the emulator's path (``emulator.run`` result: exits by
    register in the window, verified)."""
    return emu.run_workload(w.path, cpu, queue_depth=qd, kib=total >> 10)


def compare(w: Workload, total: int, qd: int, cpu: str, versions: Sequence[str]) -> dict:
    count = w.count(total, qd)
    ios = count * w.ios_per_count
    ours = run_emulator(w, total, qd, cpu)
    assert ours["ios"] == ios, (ours["ios"], ios)
    by_register = {k: v for k, v in ours["exits_by_register"].items() if v}
    exits = ours["exits_total"]
    row: dict[str, Any] = {
        "workload": w.name,
        "path": w.path,
        "queue_depth": qd,
        "ios": ios,
        "unit": w.unit,
        "emulator": {
            "cpu": ours["cpu"],
            "verified": ours["verified"],
            "exits": exits,
            "exits_per_io": exits / ios,
            "exits_per_mib": exits / (ios * w.io_bytes / (1 << 20)),
            "by_register": by_register,
        },
        "qemu": {},
    }
    for version in versions:
        try:
            binary = qemu_binary(version)
        except QemuUnavailable as exc:
            row["qemu"][version] = {"skipped": str(exc)}
            continue
        q = run_qemu(binary, w, count, qd)
        diff = {  # poll reads aside: they follow QEMU's timing, see the module doc
            k: (q.accesses.get(k, 0), by_register.get(k, 0))
            for k in sorted(set(q.accesses) | set(by_register))
            if q.accesses.get(k, 0) != by_register.get(k, 0) and not is_poll_read(k)
        }
        row["qemu"][version] = {
            "machine": w.machine,
            "result": q.result,
            "ios": q.ios,
            "verify_errors": q.verify_errors,
            "values": q.values,
            "deviations": q.values.get(w.deviation_key) if w.deviation_key else None,
            "window_marked": q.marked,
            "accesses": q.total,
            "accesses_per_io": q.total / ios,
            "poll_reads": q.poll_reads,
            "other_accesses": dict(q.other),
            "by_register": dict(sorted(q.accesses.items())),
            "differences": diff,  # register -> (QEMU, emulator)
            "equal": bool(
                q.marked
                and not diff
                and not q.other
                and q.result == 0
                and q.ios == ios
                and not q.verify_errors
            ),
        }
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "workload", "qd", "I/Os", "QEMU", "QEMU result", "QEMU accesses/IO",
        "emulator exits/IO", "equal by register", "QEMU poll reads", "emulator exits/MiB",
        "QEMU deviations",
    ]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e = r["emulator"]
        for version, q in r["qemu"].items():
            lead = [r["workload"], str(r["queue_depth"]), str(r["ios"]), version]
            if "skipped" in q:
                cells = [*lead, "skipped", "", "", "", "", "", ""]
            else:
                cells = [
                    *lead,
                    "ok"
                    if q["result"] == 0 and not q["verify_errors"]
                    else f"FAILED ({q['result']})",
                    f"{q['accesses_per_io']:.4g}",
                    f"{e['exits_per_io']:.4g}",
                    "yes" if q["equal"] else "NO",
                    str(q["poll_reads"]),
                    f"{e['exits_per_mib']:,.1f}",
                    "-" if q["deviations"] is None else str(q["deviations"]),
                ]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(DEFAULT_WORKLOADS)
    )
    ap.add_argument("--kib", type=int, default=256, help="KiB per run (default 256)")
    ap.add_argument("--queue-depth", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--cpu", choices=["kvm", "soft", "auto"], default="auto")
    ap.add_argument("--qemu", nargs="+", default=list(QEMU_VERSIONS), help="QEMU versions")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for name in args.workloads:
        w = WORKLOADS[name]
        for qd in dict.fromkeys(min(q, w.max_queue_depth) for q in args.queue_depth):
            rows.append(compare(w, args.kib << 10, qd, args.cpu, args.qemu))
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
