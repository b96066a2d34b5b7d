"""Run one of the emulator's guest programs in QEMU (TCG) with its device accesses traced.

The trace method behind ``bench/qemu_*_exits.py``: the same freestanding program the
emulator runs (``guest-drivers/``) boots in QEMU under the Multiboot stub
(``guest_build.build_qemu_stub``, program and parameter block as Multiboot modules);
QEMU's ``memory_region_ops_read/write`` trace events record every device access, and
the program's debug-port marks (``debugport.CMD_BEGIN`` / ``CMD_END``) bound the
measurement window.  The debug port's command register is a second ``isa-debugcon``
whose bytes reach a file at once, so the run's end (``CMD_RESULT``) is seen without
waiting for the trace log.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from emulator import guest_build
from emulator.devices import debugport
from virtio.testing.qemu import QemuBinary

TRACE_EVENTS = ("memory_region_ops_read", "memory_region_ops_write")
CMD_PORT = debugport.DEBUG_BASE + debugport.REG_CMD
ARG_PORT = debugport.DEBUG_BASE + debugport.REG_ARG
QEMU_RAM_MIB = 64
MR_RE = re.compile(
    r"memory_region_ops_(?P<rw>read|write) cpu (?P<cpu>-?\d+) mr 0x[0-9a-f]+ "
    r"addr 0x(?P<addr>[0-9a-f]+) value 0x(?P<value>[0-9a-f]+) size (?P<size>\d+) "
    r"name '(?P<name>[^']*)'"
)
"""One traced access (QEMU's ``memory_region_ops_*`` line)."""


def command(
    binary: QemuBinary,
    program: str,
    params: Path,
    tmp: Path,
    devices: Sequence[str],
    *,
    machine: str = "pc",
    nodefaults: bool = False,
) -> list[str]:
    """QEMU's command line for ``program`` (a ``guest_build`` name) with ``params``,
    its console and command ports, the trace into ``tmp``, and ``devices``."""
    stub, elf = guest_build.build_qemu_stub(), guest_build.build(program)
    return [
        *binary.command(),
        "-machine", f"{machine},accel=tcg", "-cpu", "max", "-m", str(QEMU_RAM_MIB),
        *(["-nodefaults"] if nodefaults else []),
        "-display", "none", "-serial", "none", "-monitor", "none", "-no-reboot",
        "-kernel", str(stub), "-initrd", f"{elf},{params}",
        "-chardev", f"file,id=con,path={tmp / 'console'}",
        "-device", f"isa-debugcon,iobase={debugport.DEBUG_BASE:#x},chardev=con",
        "-chardev", f"file,id=cmd,path={tmp / 'commands'}",
        "-device", f"isa-debugcon,iobase={CMD_PORT:#x},chardev=cmd",
        "-trace", f"events={tmp / 'events'}", "-D", str(tmp / "trace.log"),
        *devices,
    ]  # fmt: skip


def run(binary: QemuBinary, args: Sequence[str], tmp: Path, timeout: float) -> Path:
    """Run QEMU with ``args`` (from ``command``) until the program reports its result,
    then stop it cleanly (which flushes the trace); the trace log's path."""
    (tmp / "events").write_text("\n".join(TRACE_EVENTS) + "\n")
    errlog = tmp / "stderr"
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(args, env=binary.env(), stdout=subprocess.DEVNULL, stderr=err)
    commands = tmp / "commands"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if commands.exists() and bytes([debugport.CMD_RESULT]) in commands.read_bytes():
                break
            time.sleep(0.05)  # polling a file QEMU writes; bounded by the deadline
        else:
            raise RuntimeError(
                f"QEMU {binary.version}: no result within {timeout} s "
                f"(exit status {proc.poll()}): {errlog.read_text(errors='replace')}"
            )
    finally:
        if proc.poll() is None:
            proc.terminate()  # a clean exit flushes the trace log
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return tmp / "trace.log"
