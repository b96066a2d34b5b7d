"""MMIO accesses of any width and alignment are reported the same on both CPU backends:
one access of the guest's size at the guest's address (as ``KVM_EXIT_MMIO`` has it), so
a device (and ``MmioTransport``'s §4.2.2.2 access rules) sees identical traffic."""

from __future__ import annotations

import struct

import pytest
from emu_asm import HLT, outb

from emulator import memory
from emulator.bus import Device
from emulator.machine import Machine
from virtio.memory import FdRegion, MmapGuestMemory
from virtio.spec.mmio import MmioReg
from virtio.testing.vhost_user_frontend import EchoDevice
from virtio.transport.mmio import MmioAccessError, MmioTransport

BASE = 0xD000_0000


def _rbx(addr: int) -> bytes:
    return b"\x48\xbb" + struct.pack("<Q", addr)  # mov rbx, addr


def read64(addr: int) -> bytes:
    return _rbx(addr) + b"\x48\x8b\x03"  # mov rax, [rbx]


def read32(addr: int) -> bytes:
    return _rbx(addr) + b"\x8b\x03"  # mov eax, [rbx]


def write64(addr: int, value: int) -> bytes:
    return _rbx(addr) + b"\x48\xb8" + struct.pack("<Q", value) + b"\x48\x89\x03"  # mov [rbx], rax


def mov_rcx_rax() -> bytes:
    return b"\x48\x89\xc1"


def mov_rsi_rax() -> bytes:
    return b"\x48\x89\xc6"


class Recorder(Device):
    """Records every access; reads return the offset's bytes 0x10 + offset, upwards."""

    name = "rec"

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return int.from_bytes(bytes((0x10 + offset + i) & 0xFF for i in range(size)), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


def _run(cpu: str, code: bytes, device, length: int = 0x2000) -> Machine:
    m = Machine(ram_size=8 << 20, cpu=cpu)
    m.idle_hlt_stops = True
    m.bus.add_mmio(BASE, length, device)
    m.memory.write(memory.LOAD_ADDR, code + outb(0xE9, ord(".")) + HLT)
    m.start(memory.LOAD_ADDR)
    try:
        m.run(max_exits=1000, timeout=30)
    except BaseException:
        m.close()
        raise
    return m


def test_wide_and_unaligned_accesses_are_one_exit(cpu):
    dev = Recorder()
    code = (
        read64(BASE + 0x10)
        + mov_rcx_rax()
        + write64(BASE + 0x20, 0xAABBCCDD11223344)
        + read32(BASE + 0x32)  # unaligned: one 4-byte access at 0x32, not 0x30 + 0x34
        + read64(BASE + 0xFFC)  # crosses a page: one access per page
        + mov_rsi_rax()
    )
    with _run(cpu, code, dev) as m:
        assert dev.log == [
            ("r", 0x10, 8),
            ("w", 0x20, 8, 0xAABBCCDD11223344),
            ("r", 0x32, 4),
            ("r", 0xFFC, 4),
            ("r", 0x1000, 4),
        ]
        assert m.cpu.regs()["rcx"] == 0x2726252423222120  # the 8 bytes from 0x10
        assert m.cpu.regs()["rsi"] == 0x13121110_0F0E0D0C  # 4 + 4 bytes across the page
        assert m.bus.stats.by_reason["MMIO"] == 5


def test_64bit_register_access_is_the_same_driver_error(cpu):
    """A 64-bit access to virtio-mmio registers: one exit, and the transport refuses it
    the same way on both backends (§4.2.2.2: control registers are 32-bit only)."""
    transports: list[MmioTransport] = []

    def make(m: Machine) -> MmioTransport:
        mem = MmapGuestMemory([FdRegion(0, m.ram_size, m.ram_fd)])
        m.closers.append(mem.close)
        t = MmioTransport(EchoDevice(), mem, m.irq_line(5), name="virtio")
        transports.append(t)
        return t

    m = Machine(ram_size=8 << 20, cpu=cpu)
    m.idle_hlt_stops = True
    t = make(m)
    m.bus.add_mmio(BASE, 0x200, t)
    code = (
        write64(BASE + int(MmioReg.VIRTIO_MMIO_QUEUE_DESC_LOW), 0x1234_0000_5678_0000)
        + read64(BASE + int(MmioReg.VIRTIO_MMIO_STATUS))
        + mov_rcx_rax()
        + outb(0xE9, ord("."))
        + HLT
    )
    m.memory.write(memory.LOAD_ADDR, code)
    m.start(memory.LOAD_ADDR)
    with m:
        m.run(max_exits=1000, timeout=30)
        assert m.cpu.regs()["rcx"] == 0
        assert [type(e) for e in t.errors] == [MmioAccessError, MmioAccessError]
        assert [e.message for e in t.errors] == [
            "8-byte access at 0x80: control registers take only 32-bit wide and aligned accesses",
            "8-byte access at 0x70: control registers take only 32-bit wide and aligned accesses",
        ]
        assert m.bus.stats.by_register == {
            "virtio.queue_desc_low": 1,
            "virtio.status": 1,
            "debug.char": 1,
            "cpu.hlt": 1,
        }


@pytest.mark.usefixtures("need_soft")
def test_unmapped_wide_read_is_one_exit():
    """A page past RAM that nothing maps is mapped on first touch: still one access."""
    with _run("soft", read64(0xE000_0000) + mov_rcx_rax(), Recorder()) as m:
        assert m.cpu.regs()["rcx"] == 0xFFFF_FFFF_FFFF_FFFF
        assert m.bus.stats.by_device.get("unmapped") == 1
