"""Address -> device dispatch for port I/O and MMIO, with exit accounting.

A device is any object with::

    name: str
    def read(self, offset: int, size: int) -> int
    def write(self, offset: int, size: int, value: int) -> None
    def register_name(self, offset: int, is_write: bool) -> str

(:class:`Device` provides ``register_name`` from ``read_registers`` /
``write_registers`` tables.)  One device may be mapped at several windows; each
window passes its own ``offset`` base through ``window`` so a device can tell its
command block from its control block.

Every exit that reaches the VMM is counted once by reason, device and register in
``bus.stats``, whatever the CPU backend.  Accesses to unmapped addresses read as all
ones, writes are dropped, and both are accounted to the pseudo device ``"unmapped"``.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from emulator.exits import CPU_DEVICE, REASON_MMIO, REASON_PIO, Exit, MmioExit, PioExit
from emulator.stats import ExitStats

UNMAPPED = "unmapped"


class BusDevice(Protocol):
    name: str

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def register_name(self, offset: int, is_write: bool) -> str: ...


class Device:
    """Convenience base: register names from two ``{offset: name}`` tables."""

    name = "device"
    read_registers: dict[int, str] = {}
    write_registers: dict[int, str] = {}

    def register_name(self, offset: int, is_write: bool) -> str:
        table = self.write_registers if is_write else self.read_registers
        return table.get(offset, f"{offset:#x}")

    def read(self, offset: int, size: int) -> int:  # pragma: no cover - overridden
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:  # pragma: no cover
        pass


@dataclass(frozen=True)
class Mapping:
    base: int
    length: int
    device: BusDevice
    offset: int = 0  # added to (addr - base) before calling the device

    @property
    def end(self) -> int:
        return self.base + self.length


@dataclass(frozen=True)
class IoEventFd:
    """A write of ``size`` bytes (0 = any, MMIO only) at ``addr``, optionally only of value
    ``datamatch``, signals eventfd ``fd`` instead of reaching the device (KVM_IOEVENTFD)."""

    addr: int
    size: int
    fd: int
    datamatch: int | None = None
    pio: bool = False

    def matches(self, pio: bool, addr: int, size: int, value: int) -> bool:
        return (
            pio == self.pio
            and addr == self.addr
            and (self.size == 0 or size == self.size)
            and (self.datamatch is None or value == self.datamatch)
        )


class BusConflict(ValueError):
    """Two devices were mapped over the same addresses."""


class AddressSpace:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._bases: list[int] = []
        self._maps: list[Mapping] = []

    def add(self, m: Mapping) -> None:
        if m.length <= 0:
            raise ValueError("mapping length must be positive")
        for other in self._maps:
            if m.base < other.end and other.base < m.end:
                raise BusConflict(
                    f"{self.kind} {m.base:#x}+{m.length:#x} ({m.device.name}) overlaps "
                    f"{other.base:#x}+{other.length:#x} ({other.device.name})"
                )
        i = bisect.bisect(self._bases, m.base)
        self._bases.insert(i, m.base)
        self._maps.insert(i, m)

    def remove(self, base: int) -> Mapping:
        """Unmap the window at ``base`` (e.g. a PCI BAR that moved)."""
        i = self._bases.index(base)
        del self._bases[i]
        return self._maps.pop(i)

    def find(self, addr: int, size: int = 1) -> Mapping | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            m = self._maps[i]
            if addr + size <= m.end:
                return m
        return None

    def __iter__(self):
        return iter(self._maps)


class Bus:
    """PIO and MMIO address spaces plus the exit counters."""

    def __init__(self) -> None:
        self.pio = AddressSpace("pio")
        self.mmio = AddressSpace("mmio")
        self.stats = ExitStats()
        self.ioeventfds: list[IoEventFd] = []
        # Called after every handled exit (e.g. to let the machine look at IRQ lines).
        self.after_exit: list[Callable[[], None]] = []
        self.last_exit_write = False  # the last PIO/MMIO exit was a write (snapshot points)

    def add_pio(self, base: int, length: int, device: BusDevice, offset: int = 0) -> None:
        self.pio.add(Mapping(base, length, device, offset))

    def add_mmio(self, base: int, length: int, device: BusDevice, offset: int = 0) -> None:
        self.mmio.add(Mapping(base, length, device, offset))

    def remove_mmio(self, base: int) -> None:
        self.mmio.remove(base)

    def add_ioeventfd(self, reg: IoEventFd) -> None:
        self.ioeventfds.append(reg)

    def remove_ioeventfd(self, reg: IoEventFd) -> None:
        self.ioeventfds.remove(reg)

    def try_ioeventfd(self, space: AddressSpace, addr: int, size: int, value: int) -> bool:
        """Signal a matching ioeventfd for a guest write; True if one took the write.

        Such writes never reach the VMM under KVM, so they are not exits: they are
        only tallied in ``stats.ioeventfd``.
        """
        pio = space is self.pio
        for reg in self.ioeventfds:
            if reg.matches(pio, addr, size, value):
                os.eventfd_write(reg.fd, 1)
                self.stats.ioeventfd += 1
                return True
        return False

    def devices(self) -> list[BusDevice]:
        seen: dict[int, BusDevice] = {}
        for m in [*self.pio, *self.mmio]:
            seen.setdefault(id(m.device), m.device)
        return list(seen.values())

    # -- single accesses (no accounting) ----------------------------------------------------
    def access(self, space: AddressSpace, addr: int, size: int, value: int | None) -> int:
        m = space.find(addr, size)
        self.stats.accesses += 1
        if m is None:
            return (1 << (8 * size)) - 1
        off = addr - m.base + m.offset
        if value is None:
            return m.device.read(off, size) & ((1 << (8 * size)) - 1)
        m.device.write(off, size, value & ((1 << (8 * size)) - 1))
        return 0

    def account(self, reason: str, space: AddressSpace, addr: int, size: int, is_write: bool):
        self.last_exit_write = is_write
        m = space.find(addr, size)
        if m is None:
            self.stats.count(reason, UNMAPPED, f"{space.kind}:{addr:#x}")
        else:
            reg = m.device.register_name(addr - m.base + m.offset, is_write)
            self.stats.count(reason, m.device.name, reg)

    # -- exits ------------------------------------------------------------------------------
    def handle_pio(self, port: int, size: int, is_write: bool, count: int, data: bytes) -> bytes:
        """One PIO exit of ``count`` accesses; returns the IN data (``count*size`` bytes)."""
        if (
            is_write
            and count == 1
            and self.ioeventfds
            and self.try_ioeventfd(self.pio, port, size, int.from_bytes(data, "little"))
        ):
            return b""
        self.account(REASON_PIO, self.pio, port, size, is_write)
        if is_write:
            for i in range(count):
                v = int.from_bytes(data[i * size : (i + 1) * size], "little")
                self.access(self.pio, port, size, v)
            out = b""
        else:
            out = b"".join(
                self.access(self.pio, port, size, None).to_bytes(size, "little")
                for _ in range(count)
            )
        self.exit_done()
        return out

    def handle_mmio(self, addr: int, size: int, is_write: bool, data: bytes) -> bytes:
        if (
            is_write
            and self.ioeventfds
            and self.try_ioeventfd(self.mmio, addr, size, int.from_bytes(data, "little"))
        ):
            return b""
        self.account(REASON_MMIO, self.mmio, addr, size, is_write)
        if is_write:
            self.access(self.mmio, addr, size, int.from_bytes(data, "little"))
            out = b""
        else:
            out = self.access(self.mmio, addr, size, None).to_bytes(size, "little")
        self.exit_done()
        return out

    def handle(self, exit_: Exit) -> bytes:
        """Dispatch a decoded PIO/MMIO exit; other reasons are only counted."""
        if isinstance(exit_, PioExit):
            return self.handle_pio(exit_.port, exit_.size, exit_.is_write, exit_.count, exit_.data)
        if isinstance(exit_, MmioExit):
            return self.handle_mmio(exit_.addr, exit_.size, exit_.is_write, exit_.data)
        self.stats.count(exit_.reason, CPU_DEVICE, exit_.reason.lower())
        return b""

    def exit_done(self) -> None:
        for cb in self.after_exit:
            cb()
