"""A KVM vCPU: register access (struct-packed) and the KVM_RUN step."""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING

from emulator import exits
from emulator.kvm import abi, ioctl

if TYPE_CHECKING:
    from emulator.vm import Vm


def unpack_sregs(raw: bytes) -> dict:
    """``struct kvm_sregs`` -> dict (segments as dicts, dtables as (base, limit))."""
    out: dict = {}
    off = 0
    seg_fields = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g")
    for name in abi.SEGMENT_NAMES:
        vals = abi.SEGMENT.unpack_from(raw, off)
        seg = dict(zip(seg_fields, vals[:10], strict=True))
        seg["avl"], seg["unusable"] = vals[10], vals[11]
        out[name] = seg
        off += abi.SEGMENT.size
    for name in ("gdt", "idt"):
        base, limit, *_ = abi.DTABLE.unpack_from(raw, off)
        out[name] = (base, limit)
        off += abi.DTABLE.size
    out.update(zip(abi.SREGS_CTRL_NAMES, abi.SREGS_CTRL.unpack_from(raw, off), strict=True))
    off += abi.SREGS_CTRL.size
    out["interrupt_bitmap"] = raw[off : off + 32]
    return out


def pack_sregs(s: dict) -> bytes:
    parts = []
    for name in abi.SEGMENT_NAMES:
        g = s[name]
        parts.append(
            abi.SEGMENT.pack(
                g["base"], g["limit"], g["selector"], g["type"], g["present"], g["dpl"],
                g["db"], g["s"], g["l"], g["g"], g.get("avl", 0), g.get("unusable", 0), 0,
            )
        )  # fmt: skip
    for name in ("gdt", "idt"):
        base, limit = s[name]
        parts.append(abi.DTABLE.pack(base, limit, 0, 0, 0))
    parts.append(abi.SREGS_CTRL.pack(*(s[n] for n in abi.SREGS_CTRL_NAMES)))
    parts.append(bytes(s.get("interrupt_bitmap", bytes(32))))
    raw = b"".join(parts)
    assert len(raw) == abi.SREGS_SIZE
    return raw


class Vcpu:
    def __init__(self, vm: Vm, index: int = 0) -> None:
        self.vm = vm
        self.index = index
        self.fd = ioctl(vm.fd, abi.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        self._mm = mmap.mmap(
            self.fd, vm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self.run_page = memoryview(self._mm)

    # -- registers ---------------------------------------------------------------------------
    def get_regs(self) -> dict[str, int]:
        raw = ioctl(self.fd, abi.KVM_GET_REGS, bytes(abi.REGS.size), "KVM_GET_REGS")
        return dict(zip(abi.REG_NAMES, abi.REGS.unpack(raw), strict=True))

    def set_regs(self, regs: dict[str, int]) -> None:
        vals = [regs.get(n, 0) for n in abi.REG_NAMES]
        ioctl(self.fd, abi.KVM_SET_REGS, abi.REGS.pack(*vals), "KVM_SET_REGS")

    def get_sregs(self) -> dict:
        raw = ioctl(self.fd, abi.KVM_GET_SREGS, bytes(abi.SREGS_SIZE), "KVM_GET_SREGS")
        return unpack_sregs(raw)

    def set_sregs(self, sregs: dict) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, pack_sregs(sregs), "KVM_SET_SREGS")

    def set_cpuid2(self, cpuid2: bytes) -> None:
        ioctl(self.fd, abi.KVM_SET_CPUID2, bytearray(cpuid2), "KVM_SET_CPUID2")

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: queue an external interrupt (only without in-kernel irqchip)."""
        ioctl(self.fd, abi.KVM_INTERRUPT, abi.INTERRUPT.pack(vector), "KVM_INTERRUPT")

    # -- run ---------------------------------------------------------------------------------
    def run(self) -> exits.Exit:
        """KVM_RUN once.  A signal interrupting it yields ``OtherExit(KVM_EXIT_INTR)``."""
        try:
            ioctl(self.fd, abi.KVM_RUN, 0, "KVM_RUN", retry_eintr=False)
        except InterruptedError:
            return exits.OtherExit(abi.KVM_EXIT_INTR)
        return exits.decode(self.run_page)

    @property
    def ready_for_interrupt_injection(self) -> bool:
        return bool(self.run_page[abi.RUN_READY_FOR_INJECTION])

    @property
    def if_flag(self) -> bool:
        return bool(self.run_page[abi.RUN_IF_FLAG])

    def request_interrupt_window(self, on: bool) -> None:
        self.run_page[abi.RUN_REQUEST_INTERRUPT_WINDOW] = 1 if on else 0

    def complete_in(self, exit_: exits.PioExit, data: bytes) -> None:
        exits.complete_pio_in(self.run_page, exit_, data)

    def complete_mmio_read(self, exit_: exits.MmioExit, data: bytes) -> None:
        exits.complete_mmio_read(self.run_page, exit_, data)

    def close(self) -> None:
        if self.fd >= 0:
            self.run_page.release()
            self._mm.close()
            os.close(self.fd)
            self.fd = -1
