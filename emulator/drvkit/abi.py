"""The guest ABI, host side: ``struct pv_params`` of ``guest-drivers/include/pyvirtio.h``.

The VMM writes the block at ``PARAMS_ADDR`` before the program starts; see that
header (and docs/driver-toolkit.md) for what each field means to the guest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from emulator import memory

PARAMS_MAGIC = 0x4F495650  # "PVIO", as every guest program's block
ABI_VERSION = 1
MAX_ARGS = 16
TRANSPORT_MMIO = 1
TRANSPORT_PCI = 2
TRANSPORTS = {"mmio": TRANSPORT_MMIO, "pci": TRANSPORT_PCI}

PV_PARAMS = struct.Struct(f"<4IQ2I3Q{MAX_ARGS}Q2I")
"""magic, abi_version, device_id, transport, regs_base, irq_line, nargs, ram_size,
heap_base, heap_size, args[16], pci_bdf, reserved (appended: older programs never
read them)."""

HEAP_MIN = 0x200000
"""The heap never starts below 2 MiB (page tables, parameters and stack are below 1 MiB,
the program at 1 MiB)."""
HEAP_ALIGN = 0x10000

RESULT_NAMES = {
    1: "bad parameters",
    2: "probe failed",
    5: "features missing",
    6: "FEATURES_OK refused",
    7: "queue setup failed",
    9: "I/O error status",
    12: "verification failed",
    13: "device needs reset",
    14: "out of memory",
    15: "frames lost",
}
"""``PV_E_*`` of pyvirtio.h (what the templates return; any non-zero is a failure)."""


@dataclass(frozen=True)
class Params:
    device_id: int
    transport: str
    regs_base: int
    irq_line: int
    ram_size: int
    heap_base: int
    args: tuple[int, ...] = ()
    pci_bdf: int = 0
    """virtio-pci: the function's configuration address (bus << 16 | device << 11 |
    function << 8, as mechanism #1 takes it); 0 over virtio-mmio."""

    def pack(self) -> bytes:
        if len(self.args) > MAX_ARGS:
            raise ValueError(f"at most {MAX_ARGS} --arg values")
        args = [a & 0xFFFF_FFFF_FFFF_FFFF for a in self.args] + [0] * (MAX_ARGS - len(self.args))
        return PV_PARAMS.pack(
            PARAMS_MAGIC, ABI_VERSION, self.device_id, TRANSPORTS[self.transport],
            self.regs_base, self.irq_line, len(self.args), self.ram_size,
            self.heap_base, self.ram_size - self.heap_base, *args, self.pci_bdf, 0,
        )  # fmt: skip


def heap_base(image_end: int) -> int:
    """First free byte above the loaded program, aligned."""
    end = max(image_end, HEAP_MIN, memory.LOAD_ADDR)
    return (end + HEAP_ALIGN - 1) & ~(HEAP_ALIGN - 1)
