"""Workload runner: one function that boots a guest program against a device path.

A *path* is a registered :class:`WorkloadPath`: which guest program to build, how to
put devices on the machine's bus, and the parameter block the program reads.  To add
``virtio-mmio`` later: write ``guest-drivers/virtio_mmio.c`` (+ entry in
``guest_build.PROGRAMS``), a device exposing ``read/write/register_name`` mapped with
``machine.bus.add_mmio(...)``, and call :func:`register_path`.

The guest brackets its workload with debug-port BEGIN/END marks; exit counts and
timings in the result cover only that window.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from emulator import guest_build
from emulator.devices import ata
from emulator.devices.ide import FileBackend, IdeController, MemoryBackend
from emulator.machine import Machine

PARAMS_MAGIC = 0x4F495650  # "PVIO"
PARAMS_VERSION = 1
# struct params in guest-drivers/ide.c
IDE_PARAMS = struct.Struct("<8I2Q4I")
MODE_PIO = 0
MODE_PIO_MULTI = 1
MODE_DMA = 2
IRQ_POLL = 0
IRQ_MODES = {"hlt": 1, "idt": 2}  # HLT wake-up (IF=0) / delivery through the IDT

REQUEST_BYTES = 4096
BUF_ADDR = 0x400000  # request buffer (page aligned)
PRD_ADDR = 0x10000  # PRD table (dword aligned, below the stack)
PATTERN_KEY = 0x5A5A5A5A_00000000
DEFAULT_RAM = 32 << 20


class WorkloadFailed(RuntimeError):
    """The guest program reported a non-zero result."""


@dataclass
class WorkloadSpec:
    path: str
    total_bytes: int
    queue_depth: int
    irq: bool
    lba48: bool = False
    irq_mode: str = "idt"
    image: str | None = None  # raw disk image file (default: a bytearray)

    @property
    def irq_param(self) -> int:
        return IRQ_MODES[self.irq_mode] if self.irq else IRQ_POLL

    seed: int = 0x1234_5678

    @property
    def nreqs(self) -> int:
        return self.total_bytes // REQUEST_BYTES


@dataclass
class WorkloadPath:
    """How to run one I/O path: program name + machine setup returning a verifier."""

    program: str
    setup: Callable[[Machine, WorkloadSpec], Callable[[], bool]]
    max_queue_depth: int = 1
    description: str = ""
    # Names of the phases the guest marks (BEGIN starts the first) and how many of the
    # workload's requests each phase issues: a function of the request count.
    phases: tuple[str, ...] = ()
    phase_ios: Callable[[int], tuple[int, ...]] | None = None
    extra: dict = field(default_factory=dict)


PATHS: dict[str, WorkloadPath] = {}


def register_path(name: str, path: WorkloadPath) -> None:
    PATHS[name] = path


def expected_sector(lba: int, seed: int) -> bytes:
    """The 512 bytes the guest writes to sector ``lba`` (see fill() in ide.c)."""
    words = [((lba << 32) | w) ^ seed ^ PATTERN_KEY for w in range(64)]
    return struct.pack("<64Q", *words)


def _ide_setup(mode: int, multiple: int = 0):
    def setup(m: Machine, spec: WorkloadSpec) -> Callable[[], bool]:
        sectors_per_req = REQUEST_BYTES // ata.SECTOR_SIZE
        size = spec.total_bytes + (1 << 20)
        disk = MemoryBackend(size) if spec.image is None else FileBackend(spec.image, size)
        m.closers.append(getattr(disk, "close", lambda: None))
        ide = IdeController(disk, memory=m.memory, irq=m.irq_line(ata.PRIMARY_IRQ))
        ide.attach(m.bus)
        m.devices["ide"] = ide
        m.write_params(
            IDE_PARAMS.pack(
                PARAMS_MAGIC, PARAMS_VERSION, mode, spec.irq_param, int(spec.lba48),
                sectors_per_req, spec.nreqs, multiple, BUF_ADDR, PRD_ADDR,
                spec.seed, 0, 1, 0,
            )
        )  # fmt: skip

        def verify() -> bool:
            if ide.errors:
                return False
            nsect = spec.nreqs * sectors_per_req
            return all(disk.read(lba, 1) == expected_sector(lba, spec.seed) for lba in range(nsect))

        return verify

    return setup


IDE_PHASES = ("write", "flush", "read")


def _ide_phase_ios(nreqs: int) -> tuple[int, ...]:
    return (nreqs, 0, nreqs)


for _name, _setup, _desc in (
    ("ide-pio", _ide_setup(MODE_PIO), "ATA PIO, READ/WRITE SECTORS"),
    (
        "ide-pio-multi",
        _ide_setup(MODE_PIO_MULTI, REQUEST_BYTES // ata.SECTOR_SIZE),
        "ATA PIO, READ/WRITE MULTIPLE (one DRQ block per request)",
    ),
    ("ide-dma", _ide_setup(MODE_DMA), "PIIX bus-master DMA (PRD tables)"),
):
    register_path(_name, WorkloadPath("ide", _setup, 1, _desc, IDE_PHASES, _ide_phase_ios))


def run_workload(
    path: str,
    cpu: str = "auto",
    mib: int = 1,
    queue_depth: int = 1,
    irq: bool = False,
    *,
    kib: int | None = None,
    lba48: bool = False,
    irq_mode: str = "idt",
    image: str | None = None,
    timeout: float | None = 600.0,
    ram_size: int = DEFAULT_RAM,
    save_at: int | None = None,
    save_to: str | os.PathLike[str] | None = None,
) -> dict:
    """Write then read-verify ``mib`` MiB (or ``kib`` KiB) in 4 KiB requests.

    Returns ``{"path", "queue_depth", "cpu", "ios", "exits_per_io", "exits_by_reason",
    "exits_by_register", "mb_per_s", "us_per_io", "verified", ...}``; ``cpu`` is the
    backend actually used (``auto`` resolves to ``kvm`` or ``soft``).

    ``save_at=N, save_to=FILE``: pause after exit N (see ``Machine.pause_at_exit``),
    write a snapshot to FILE (``emulator.snapshot``), and carry on to the end; the
    result's ``saved_at_exit`` is the exit the snapshot was taken at.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; known: {sorted(PATHS)}")
    wp = PATHS[path]
    if not 1 <= queue_depth <= wp.max_queue_depth:
        raise ValueError(
            f"path {path!r} supports queue_depth 1..{wp.max_queue_depth} "
            "(legacy IDE has one command in flight)"
        )
    if irq_mode not in IRQ_MODES:
        raise ValueError(f"irq_mode must be one of {sorted(IRQ_MODES)}")
    total = (kib << 10) if kib is not None else (mib << 20)
    if total < REQUEST_BYTES or total % REQUEST_BYTES:
        raise ValueError("the transfer size must be a positive multiple of 4 KiB")
    if (save_at is None) != (save_to is None):
        raise ValueError("save_at and save_to go together")
    spec = WorkloadSpec(path, total, queue_depth, irq, lba48, irq_mode=irq_mode, image=image)
    recipe = {
        "kind": "workload", "path": path, "total_bytes": total, "queue_depth": queue_depth,
        "irq": irq, "lba48": lba48, "irq_mode": irq_mode, "ram_size": ram_size,
    }  # fmt: skip
    elf = guest_build.build(wp.program)
    m = Machine(ram_size=ram_size, cpu=cpu)
    try:
        verify = wp.setup(m, spec)
        _watched_polling(m, wp)
        m.load_elf(elf)
        saved_at = None
        if save_at is not None:
            from emulator import snapshot

            m.pause_at_exit(save_at)
            m.run(timeout=timeout)
            if m.paused:
                saved_at = m.bus.stats.total
                snapshot.write(snapshot.capture(m, recipe), save_to)  # type: ignore[arg-type]
                m.resume()
                m.run(timeout=timeout)
        else:
            m.run(timeout=timeout)
        result = _result(m, wp, spec, verify)
        result["saved_at_exit"] = saved_at
        return result
    finally:
        m.close()


def restore_workload(
    snapshot_file: str | os.PathLike[str],
    cpu: str = "auto",
    *,
    image: str | None = None,
    timeout: float | None = 600.0,
) -> dict:
    """Restore a workload snapshot (``run_workload(save_at=..., save_to=...)``) in this
    process on ``cpu`` and run it to the end; the same result dict as ``run_workload``,
    with ``restored_at_exit``.  The disk is a memory disk, or ``image`` (a raw file the
    saved disk contents are written into): a recipe's image path is never written."""
    from emulator import snapshot

    snap = snapshot.read(snapshot_file)
    r = snap.recipe
    if r.get("kind") != "workload" or r.get("path") not in PATHS:
        raise snapshot.SnapshotError(f"{snapshot_file}: not a workload snapshot ({r!r})")
    wp = PATHS[r["path"]]
    spec = WorkloadSpec(
        r["path"], int(r["total_bytes"]), int(r["queue_depth"]), bool(r["irq"]),
        bool(r["lba48"]), irq_mode=str(r["irq_mode"]), image=image,
    )  # fmt: skip
    m = Machine(ram_size=int(r["ram_size"]), cpu=cpu)
    try:
        verify = wp.setup(m, spec)
        snapshot.apply(m, snap)
        m.run(timeout=timeout)
        result = _result(m, wp, spec, verify)
        result["restored_at_exit"] = snap.exits
        return result
    finally:
        m.close()


def _watched_polling(m: Machine, wp: WorkloadPath) -> None:
    """A device the VMM watches itself (a vhost-user back-end: ``Machine.fail`` when it
    hangs up): tell the virtio-blk program never to read Status while it polls, so the
    polled rows take no exit however long the back-end takes (``poll_spins``)."""
    if m.watched_devices and wp.program == "virtio_blk":
        from emulator import virtio_mmio

        virtio_mmio.write_poll_spins(m, virtio_mmio.POLL_FOREVER)


def _result(m: Machine, wp: WorkloadPath, spec: WorkloadSpec, verify: Callable[[], bool]) -> dict:
    path, queue_depth, irq, irq_mode = spec.path, spec.queue_depth, spec.irq, spec.irq_mode
    dbg = m.debug
    if dbg.result != 0:
        raise WorkloadFailed(
            f"{path}: guest result {dbg.result} (errors={dbg.verify_errors}); "
            f"output: {dbg.text!r}; device errors: {_device_errors(m)}"
        )
    window = m.window
    seconds = m.window_seconds or 0.0
    ios = dbg.ios
    io_bytes = wp.extra.get("io_bytes", REQUEST_BYTES)
    assert window is not None
    return {
        "path": path,
        "queue_depth": queue_depth,
        "cpu": m.cpu_name,
        "irq": irq,
        "irq_mode": irq_mode if irq else None,
        "interrupts": m.interrupts_delivered,
        "ios": ios,
        "exits_per_io": window.total / ios if ios else 0.0,
        "exits_by_reason": dict(sorted(window.by_reason.items())),
        "exits_by_register": dict(sorted(window.by_register.items())),
        "exits_by_device": dict(sorted(window.by_device.items())),
        "exits_total": window.total,
        "unit": wp.extra.get("unit", "request"),
        "io_bytes": io_bytes,
        "mb_per_s": (ios * io_bytes / 1e6) / seconds if seconds else 0.0,
        "us_per_io": seconds * 1e6 / ios if ios else 0.0,
        "us_per_exit": seconds * 1e6 / window.total if window.total else 0.0,
        "verified": dbg.verify_errors == 0 and verify(),
        "phases": _phases(m, wp, spec),
        "all_exits": m.bus.stats.total,
    }


def _phases(m: Machine, wp: WorkloadPath, spec: WorkloadSpec) -> dict:
    if not wp.phases or len(m.phases) != len(wp.phases):
        return {}
    count = wp.extra.get("count")  # paths whose I/Os are not 4 KiB requests (packets)
    n_ios = count(spec.total_bytes, spec.queue_depth) if count else spec.nreqs
    ios = wp.phase_ios(n_ios) if wp.phase_ios else (0,) * len(wp.phases)
    out = {}
    for name, n, (_mark, stats, seconds) in zip(wp.phases, ios, m.phases, strict=True):
        out[name] = {
            "ios": n,
            "exits": stats.total,
            "exits_per_io": stats.total / n if n else None,
            "us_per_io": seconds * 1e6 / n if n else None,
            "seconds": seconds,
            "exits_by_reason": dict(sorted(stats.by_reason.items())),
        }
    return out


def _device_errors(m: Machine) -> list[str]:
    return [str(e) for d in m.devices.values() for e in getattr(d, "errors", [])]


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin CLI
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m emulator.run")
    ap.add_argument("path", choices=sorted(PATHS), nargs="?")
    ap.add_argument("--cpu", choices=["kvm", "soft", "auto"], default="auto")
    ap.add_argument(
        "--save-at",
        nargs=2,
        metavar=("N", "FILE"),
        help="save a snapshot after exit N (the first write exit from N on) to FILE",
    )
    ap.add_argument(
        "--restore", metavar="FILE", help="restore a snapshot (on --cpu) and run it to the end"
    )
    ap.add_argument("--mib", type=int, default=1)
    ap.add_argument("--kib", type=int)
    ap.add_argument("--queue-depth", type=int, default=1)
    ap.add_argument("--irq", action="store_true")
    ap.add_argument("--lba48", action="store_true")
    ap.add_argument("--irq-mode", choices=sorted(IRQ_MODES), default="idt")
    ap.add_argument("--image", help="raw disk image file (created/resized)")
    args = ap.parse_args(argv)
    if args.restore:
        res = restore_workload(args.restore, args.cpu, image=args.image)
        json.dump(res, sys.stdout, indent=2)
        print()
        return 0
    if args.path is None:
        ap.error("a path is needed (or --restore FILE)")
    res = run_workload(
        args.path,
        args.cpu,
        args.mib,
        args.queue_depth,
        irq=args.irq,
        kib=args.kib,
        lba48=args.lba48,
        irq_mode=args.irq_mode,
        image=args.image,
        save_at=int(args.save_at[0]) if args.save_at else None,
        save_to=args.save_at[1] if args.save_at else None,
    )
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


# Paths in modules of their own register themselves: the NE2000 path (two ISA NICs back
# to back, exits per packet) and the virtio paths (virtio-blk + virtio-mmio).
from emulator import ne2000_paths as _ne2000_paths  # noqa: E402, F401
from emulator import virtio_mmio as _virtio_mmio  # noqa: E402, F401
from emulator.pci import virtio as _virtio_pci  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    # Run the imported module's main: that module holds every registered path.
    from emulator.run import main as _main

    sys.exit(_main())
