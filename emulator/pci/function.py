"""A PCI type-0 function: configuration header, 32-bit memory BARs, INTx and MSI.

The function wraps a *PCI device model* (``virtio.transport.pci.PciTransport`` is
one) that provides its identity (``vendor_id``, ``device_id``, ``class_code``,
``revision``, ``subsystem_vendor_id``, ``subsystem_id``), its BARs (``bars``:
``[(index, size)]``), its capability list (``capability_pointer`` and
``config_read``/``config_write`` for offsets from 0x40 on), the bus protocol for its
BAR (``name``, ``read``, ``write``, ``register_name``), and optionally ``intx`` /
``msi`` callbacks (wired here), ``intx_status`` and ``function_reset``.

Header (PCI Local Bus 3.0 §6.1-§6.2): Vendor/Device ID, Command (Memory Space, Bus
Master, Interrupt Disable are honoured), Status (Capabilities List, Interrupt
Status), Revision/Class, Header Type 0, BARs with the sizing protocol (write all
ones, read back the size mask), Subsystem IDs, Capabilities Pointer, Interrupt
Line/Pin.  The VMM assigns BAR addresses the way firmware does (``assign_bars``);
the driver enables decoding.  A BAR is on the machine's bus only while Memory Space
is enabled and its address is sane; moving or disabling it remaps it and tells
``on_map`` listeners (for ioeventfds on a notify area).

MSI (§6.8): a message is a memory write by the function, so it needs Bus Master;
one to the x86 interrupt range (0xFEExxxxx) becomes ``machine.deliver_msi(vector)``
with the vector from the data's low byte.  Anything else is dropped and counted in
``msi_dropped`` with a log line (a guest programming error, not a device one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from emulator.bus import BusConflict

if TYPE_CHECKING:
    from emulator.machine import Machine

log = logging.getLogger(__name__)

VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS = 0x08, 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = 0x2C, 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
HEADER_END = 0x40

CMD_MEMORY = 1 << 1
CMD_BUS_MASTER = 1 << 2
CMD_INTX_DISABLE = 1 << 10
CMD_WRITABLE = 0x0001 | CMD_MEMORY | CMD_BUS_MASTER | 0x0040 | 0x0100 | CMD_INTX_DISABLE
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
INTA = 1

MSI_ADDRESS_MASK = 0xFFF0_0000
MSI_ADDRESS_BASE = 0xFEE0_0000
PCI_MMIO_BASE = 0xE000_0000
"""Start of the window the VMM assigns BARs from (below the x86 interrupt range)."""
PCI_MMIO_END = 0xFEC0_0000


class HeaderOnly:
    """A function with nothing but a header (e.g. the host bridge)."""

    bars: list[tuple[int, int]] = []
    capability_pointer = 0
    revision = 0
    subsystem_vendor_id = 0
    subsystem_id = 0

    def __init__(self, vendor_id: int, device_id: int, class_code: int, name: str) -> None:
        self.vendor_id, self.device_id, self.class_code, self.name = (
            vendor_id,
            device_id,
            class_code,
            name,
        )

    def config_read(self, offset: int, size: int) -> int:
        return 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass


class PciFunction:
    """One function on bus 0 (``slot`` set by the host bridge)."""

    def __init__(self, machine: Machine, device: Any, *, irq: int | None = None) -> None:
        self.machine = machine
        self.device = device
        self.slot: int | None = None
        self.irq = irq
        self.command = 0
        self.interrupt_line = irq if irq is not None else 0xFF
        self.bar_size = dict(device.bars)
        self.bar_base = dict.fromkeys(self.bar_size, 0)
        self.mapped: dict[int, int] = {}  # BAR index -> base on the bus
        self.on_map: list[Callable[[int, int | None], None]] = []  # (bar, base or None)
        self.msi_dropped = 0
        self.errors: list[str] = []
        self._intx_level = False
        if hasattr(device, "intx"):
            device.intx = self.set_intx
        if hasattr(device, "msi"):
            device.msi = self.send_msi

    @property
    def name(self) -> str:
        return str(self.device.name)

    # -- firmware ----------------------------------------------------------------------------
    def assign_bars(self, allocator: BarAllocator) -> None:
        """Give every BAR an address, as firmware does before the OS runs."""
        for index, size in self.bar_size.items():
            self.bar_base[index] = allocator.allocate(size)

    # -- snapshots ---------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The header's writable state: Command, BAR addresses, Interrupt Line, the
        INTx level the device drives (the device's own state is saved by its owner)."""
        return {
            "command": self.command,
            "bars": [[i, b] for i, b in sorted(self.bar_base.items())],
            "interrupt_line": self.interrupt_line,
            "intx_level": self._intx_level,
            "msi_dropped": self.msi_dropped,
        }

    def load_state(self, state: dict) -> None:
        """Apply ``save_state()`` output: BARs remapped as the saved Command decodes them."""
        bars = {int(i): int(b) for i, b in state["bars"]}
        if set(bars) != set(self.bar_size):
            raise ValueError(f"{self.name}: the snapshot's BARs are {sorted(bars)}")
        for index, base in bars.items():
            if base & (self.bar_size[index] - 1) or not 0 <= base <= 0xFFFF_FFF0:
                raise ValueError(f"{self.name}: BAR {index} at {base:#x} is not aligned")
        self.bar_base = bars
        self.interrupt_line = int(state["interrupt_line"]) & 0xFF
        self.msi_dropped = int(state["msi_dropped"])
        self._intx_level = bool(state["intx_level"])
        self._set_command(int(state["command"]) & CMD_WRITABLE)

    # -- configuration space -----------------------------------------------------------------
    def _header(self) -> bytearray:
        h = bytearray(HEADER_END)
        d = self.device
        h[VENDOR_ID : VENDOR_ID + 2] = d.vendor_id.to_bytes(2, "little")
        h[DEVICE_ID : DEVICE_ID + 2] = d.device_id.to_bytes(2, "little")
        h[COMMAND : COMMAND + 2] = self.command.to_bytes(2, "little")
        status = STATUS_CAP_LIST if d.capability_pointer else 0
        if getattr(d, "intx_status", False):
            status |= STATUS_INTERRUPT
        h[STATUS : STATUS + 2] = status.to_bytes(2, "little")
        h[REVISION] = d.revision
        h[CLASS : CLASS + 3] = d.class_code.to_bytes(3, "little")
        h[HEADER_TYPE] = 0
        for index, base in self.bar_base.items():
            at = BAR0 + 4 * index
            h[at : at + 4] = base.to_bytes(4, "little")  # 32-bit, memory, not prefetchable
        h[SUBSYSTEM_VENDOR_ID : SUBSYSTEM_VENDOR_ID + 2] = d.subsystem_vendor_id.to_bytes(
            2, "little"
        )
        h[SUBSYSTEM_ID : SUBSYSTEM_ID + 2] = d.subsystem_id.to_bytes(2, "little")
        h[CAPABILITIES_POINTER] = d.capability_pointer
        h[INTERRUPT_LINE] = self.interrupt_line
        h[INTERRUPT_PIN] = INTA if self.irq is not None else 0
        return h

    def config_read(self, offset: int, size: int) -> int:
        if offset >= HEADER_END:
            return self.device.config_read(offset, size) & ((1 << (8 * size)) - 1)
        return int.from_bytes(self._header()[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset >= HEADER_END:
            self.device.config_write(offset, size, value)
            return
        # Read-modify-write of the dwords touched, then apply the writable fields.
        for reg in range(offset & ~3, offset + size, 4):
            lo, hi = max(offset, reg), min(offset + size, reg + 4)
            part = (value >> (8 * (lo - offset))) & ((1 << (8 * (hi - lo))) - 1)
            self._write_dword(reg, lo - reg, hi - lo, part)

    def _write_dword(self, reg: int, start: int, length: int, value: int) -> None:
        old = int.from_bytes(self._header()[reg : reg + 4], "little")
        mask = ((1 << (8 * length)) - 1) << (8 * start)
        new = (old & ~mask) | ((value << (8 * start)) & mask)
        if reg == COMMAND and mask & 0xFFFF:
            self._set_command(new & 0xFFFF & CMD_WRITABLE)
        elif BAR0 <= reg < BAR0 + 24:
            index = (reg - BAR0) // 4
            if index in self.bar_size:
                size = self.bar_size[index]
                self.bar_base[index] = new & ~(size - 1) & 0xFFFF_FFF0
                self._remap()
        elif reg == INTERRUPT_LINE and mask & 0xFF:
            self.interrupt_line = new & 0xFF
        # everything else in the header is read-only

    def _set_command(self, value: int) -> None:
        self.command = value
        self._remap()
        self._apply_intx()

    # -- BAR mapping -------------------------------------------------------------------------
    def _decodable(self, base: int, size: int) -> bool:
        return (
            bool(self.command & CMD_MEMORY)
            and base >= self.machine.ram_size
            and base + size <= MSI_ADDRESS_BASE
        )

    def _remap(self) -> None:
        bus = self.machine.bus
        for index, size in self.bar_size.items():
            base = self.bar_base[index]
            want = base if self._decodable(base, size) else None
            have = self.mapped.get(index)
            if want == have:
                continue
            if have is not None:
                bus.remove_mmio(have)
                del self.mapped[index]
                for cb in self.on_map:
                    cb(index, None)
            if want is not None:
                try:
                    bus.add_mmio(want, size, self.device)
                except BusConflict as exc:
                    self.errors.append(str(exc))
                    log.error("%s: BAR %d not mapped: %s", self.name, index, exc)
                    continue
                self.mapped[index] = want
                for cb in self.on_map:
                    cb(index, want)

    # -- interrupts --------------------------------------------------------------------------
    def set_intx(self, level: bool) -> None:
        self._intx_level = bool(level)
        self._apply_intx()

    def _apply_intx(self) -> None:
        if self.irq is not None:
            up = self._intx_level and not self.command & CMD_INTX_DISABLE
            self.machine.set_irq_line(self.irq, up)
            if up:
                self.machine.wake()

    def send_msi(self, address: int, data: int) -> None:
        vector = data & 0xFF
        if not self.command & CMD_BUS_MASTER:
            reason = "Bus Master is disabled"
        elif address & MSI_ADDRESS_MASK != MSI_ADDRESS_BASE:
            reason = f"address {address:#x} is outside the interrupt range"
        elif vector < 0x10:
            reason = f"vector {vector:#x} is reserved"
        else:
            self.machine.deliver_msi(vector)
            return
        self.msi_dropped += 1
        log.warning("%s: MSI (address %#x, data %#x) dropped: %s", self.name, address, data, reason)


class BarAllocator:
    """Naturally aligned BAR addresses from the PCI memory window, as firmware does."""

    def __init__(self, base: int = PCI_MMIO_BASE, end: int = PCI_MMIO_END) -> None:
        self.next = base
        self.end = end

    def save_state(self) -> dict:
        return {"next": self.next}

    def load_state(self, state: dict) -> None:
        nxt = int(state["next"])
        if not PCI_MMIO_BASE <= nxt <= self.end:
            raise ValueError(f"BAR allocator at {nxt:#x}: outside the PCI memory window")
        self.next = nxt

    def allocate(self, size: int) -> int:
        base = (self.next + size - 1) & ~(size - 1)
        if base + size > self.end:
            raise ValueError("the PCI memory window is full")
        self.next = base + size
        return base
