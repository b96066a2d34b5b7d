"""PCI host bridge: configuration mechanism #1 (I/O ports 0xCF8 / 0xCFC, PCI Local Bus
3.0 §3.2.2.3.2) over bus 0.

``CONFIG_ADDRESS`` (0xCF8, 32-bit): bit 31 enable, bus [23:16], device [15:11],
function [10:8], register [7:2].  ``CONFIG_DATA`` (0xCFC..0xCFF): a 1-, 2- or 4-byte
access at 0xCFC + n reaches register + n of the selected function.  With the enable
bit clear, or for an absent function, reads return all ones and writes are dropped
(how software finds empty slots).  Only bus 0, function 0 of each of the 32 devices
is populated; device 0 is the host bridge itself.

Every access is one PIO exit, accounted to ``pci-host.config_address`` /
``pci-host.config_data``.  :func:`pci_host` gives a machine its bridge (created on
first use, so machines without PCI devices have no ports at 0xCF8).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.pci.function import HeaderOnly, PciFunction

if TYPE_CHECKING:
    from emulator.machine import Machine

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
ENABLE = 1 << 31
SLOTS = 32
HOST_VENDOR_ID = 0x1B36  # Red Hat, Inc. (QEMU's generic PCIe host bridge ids)
HOST_DEVICE_ID = 0x0008
CLASS_HOST_BRIDGE = 0x060000


class PciHostBridge:
    """Bus 0 and its configuration ports."""

    name = "pci-host"

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.address = 0
        self.slots: dict[int, PciFunction] = {}
        bridge = HeaderOnly(HOST_VENDOR_ID, HOST_DEVICE_ID, CLASS_HOST_BRIDGE, name="host-bridge")
        self.add(PciFunction(machine, bridge), slot=0)
        machine.bus.add_pio(CONFIG_ADDRESS, 4, self, 0)
        machine.bus.add_pio(CONFIG_DATA, 4, self, 4)

    def add(self, function: PciFunction, slot: int | None = None) -> int:
        """Put ``function`` in ``slot`` (default: the first free one); returns the slot."""
        if slot is None:
            slot = next((s for s in range(1, SLOTS) if s not in self.slots), None)
            if slot is None:
                raise ValueError("PCI bus 0 is full")
        if not 0 <= slot < SLOTS or slot in self.slots:
            raise ValueError(f"PCI slot {slot} is taken or out of range")
        self.slots[slot] = function
        function.slot = slot
        return slot

    def _selected(self) -> tuple[PciFunction | None, int]:
        if not self.address & ENABLE:
            return None, 0
        bus = (self.address >> 16) & 0xFF
        dev = (self.address >> 11) & 0x1F
        fn = (self.address >> 8) & 0x7
        if bus or fn:
            return None, 0
        return self.slots.get(dev), self.address & 0xFC

    # -- snapshots -------------------------------------------------------------------------
    def save_state(self) -> dict:
        """CONFIG_ADDRESS and every function's header state, by slot."""
        return {
            "address": self.address,
            "slots": [[slot, f.save_state()] for slot, f in sorted(self.slots.items())],
        }

    def load_state(self, state: dict) -> None:
        saved = {int(slot): fs for slot, fs in state["slots"]}
        if set(saved) != set(self.slots):
            raise ValueError(f"PCI bus 0: the snapshot's slots are {sorted(saved)}")
        self.address = int(state["address"]) & 0x80FF_FFFC
        for slot, function in self.slots.items():
            function.load_state(saved[slot])

    # -- bus protocol ----------------------------------------------------------------------
    def register_name(self, offset: int, is_write: bool) -> str:
        return "config_address" if offset < 4 else "config_data"

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            return self.address if size == 4 and offset == 0 else (1 << (8 * size)) - 1
        function, reg = self._selected()
        if function is None:
            return (1 << (8 * size)) - 1
        return function.config_read(reg + offset - 4, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if size == 4 and offset == 0:
                self.address = value & 0x80FF_FFFC
            return
        function, reg = self._selected()
        if function is not None:
            function.config_write(reg + offset - 4, size, value)


def pci_host(machine: Machine) -> PciHostBridge:
    """The machine's PCI host bridge, created (with its ports) on first use."""
    host = machine.devices.get("pci-host")
    if host is None:
        host = PciHostBridge(machine)
        machine.devices["pci-host"] = host
    assert isinstance(host, PciHostBridge)
    return host
