"""Guest RAM (memfd-backed) and the fixed low-memory layout the VMM builds for the guest.

Layout of guest-physical memory (all identity-mapped):

====================  =====================================================
``0x0000``            unused (null page)
``GDT_ADDR``          GDT: null, 64-bit code (``CODE_SELECTOR``), data (``DATA_SELECTOR``)
``IDT_ADDR``          reserved for the guest's IDT
``PARAMS_ADDR``       parameter block written by the VMM (see :mod:`emulator.params`)
``PML4_ADDR``..       PML4, one PDPT, four PDs: 4 GiB identity map with 2 MiB pages
``STACK_TOP``         initial RSP (grows down, below 0x80000)
``LOAD_ADDR``         the guest ELF is linked here (0x100000)
====================  =====================================================
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct

GDT_ADDR = 0x1000
IDT_ADDR = 0x2000
PARAMS_ADDR = 0x3000
PML4_ADDR = 0x8000
PDPT_ADDR = 0x9000
PD_ADDR = 0xA000  # four page directories: 0xA000..0xDFFF
STACK_TOP = 0x80000
LOAD_ADDR = 0x100000
IDENTITY_MAP_GIB = 4

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10

# Page-table entry bits.
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_PS = 1 << 7

# GDT descriptors (flat): 64-bit code (L=1, P, DPL0, type=exec/read) and data (RW).
GDT_CODE64 = 0x00AF_9A00_0000_FFFF
GDT_DATA = 0x00CF_9200_0000_FFFF

# Control register / EFER bits.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

LONG_MODE_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
LONG_MODE_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
LONG_MODE_EFER = EFER_LME | EFER_LMA

_Q = struct.Struct("<Q")


class GuestRam:
    """Guest RAM at guest-physical 0: a memfd, mmap'd shared (hand-off-able to vhost-user)."""

    def __init__(self, size: int, name: str = "pyvirtio-guest-ram") -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"RAM size {size:#x} must be a positive multiple of the page size")
        if size < 2 * LOAD_ADDR:
            raise ValueError(f"RAM size {size:#x} too small (need at least {2 * LOAD_ADDR:#x})")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._mm)
        # Host virtual address of the mapping (for KVM_SET_USER_MEMORY_REGION / unicorn).
        anchor = ctypes.c_char.from_buffer(self._mm)
        self.host_addr = ctypes.addressof(anchor)
        del anchor  # the export is released when the ctypes object dies

    def contains(self, addr: int, length: int) -> bool:
        return addr >= 0 and length >= 0 and addr + length <= self.size

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view[addr : addr + length])

    def write(self, addr: int, data: bytes) -> None:
        self.view[addr : addr + len(data)] = data

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(BufferError):  # someone still holds a view: GC unmaps
                self.view.release()
                self._mm.close()
            os.close(self.fd)
            self.fd = -1


def build_long_mode_tables(ram: memoryview) -> None:
    """Write the GDT and identity-mapping page tables (2 MiB pages, 4 GiB) into ``ram``."""
    _Q.pack_into(ram, GDT_ADDR, 0)
    _Q.pack_into(ram, GDT_ADDR + CODE_SELECTOR, GDT_CODE64)
    _Q.pack_into(ram, GDT_ADDR + DATA_SELECTOR, GDT_DATA)
    ram[PML4_ADDR : PD_ADDR + IDENTITY_MAP_GIB * 0x1000] = bytes(
        PD_ADDR + IDENTITY_MAP_GIB * 0x1000 - PML4_ADDR
    )
    _Q.pack_into(ram, PML4_ADDR, PDPT_ADDR | PTE_P | PTE_RW)
    ram_size = len(ram)
    for gib in range(IDENTITY_MAP_GIB):
        pd = PD_ADDR + gib * 0x1000
        _Q.pack_into(ram, PDPT_ADDR + 8 * gib, pd | PTE_P | PTE_RW)
        for i in range(512):
            phys = (gib << 30) | (i << 21)
            flags = PTE_P | PTE_RW | PTE_PS
            if phys >= ram_size:  # device space: uncached
                flags |= PTE_PCD | PTE_PWT
            _Q.pack_into(ram, pd + 8 * i, phys | flags)


def gdt_limit() -> int:
    return DATA_SELECTOR + 8 - 1


def long_mode_segments() -> dict:
    """Segment registers (kvm_segment dicts) for flat 64-bit ring-0 execution."""
    code = {
        "base": 0, "limit": 0xFFFFFFFF, "selector": CODE_SELECTOR, "type": 0xB, "present": 1,
        "dpl": 0, "db": 0, "s": 1, "l": 1, "g": 1, "avl": 0, "unusable": 0,
    }  # fmt: skip
    data = {
        "base": 0, "limit": 0xFFFFFFFF, "selector": DATA_SELECTOR, "type": 0x3, "present": 1,
        "dpl": 0, "db": 1, "s": 1, "l": 0, "g": 1, "avl": 0, "unusable": 0,
    }  # fmt: skip
    tr = {
        "base": 0, "limit": 0x67, "selector": 0, "type": 0xB, "present": 1,
        "dpl": 0, "db": 0, "s": 0, "l": 0, "g": 0, "avl": 0, "unusable": 0,
    }  # fmt: skip
    ldt = {
        "base": 0, "limit": 0xFFFF, "selector": 0, "type": 0x2, "present": 1,
        "dpl": 0, "db": 0, "s": 0, "l": 0, "g": 0, "avl": 0, "unusable": 0,
    }  # fmt: skip
    segs = {"cs": code, "tr": tr, "ldt": ldt}
    for name in ("ds", "es", "fs", "gs", "ss"):
        segs[name] = dict(data)
    return segs
