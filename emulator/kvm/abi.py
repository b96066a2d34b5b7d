"""KVM userspace ABI: ioctl numbers, struct layouts and exit-reason codes.

Everything here mirrors ``<linux/kvm.h>`` for x86-64.  Structures are packed and
unpacked with :mod:`struct` (no ctypes structures); each :class:`CStruct` names the
C struct (or member) and fields it covers, and :mod:`emulator.kvm.abi_check`
compiles a cffi module against the installed ``<linux/kvm.h>`` that checks every
``KVM_*`` number, ``sizeof`` and ``offsetof`` declared here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

# --- ioctl number encoding (asm-generic/ioctl.h) --------------------------------------------
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# --- struct layouts --------------------------------------------------------------------------
class CStruct(struct.Struct):
    """A little-endian, unpadded ``struct.Struct`` over (part of) a C struct.

    ``fields`` are ``(C field name, struct code)`` in order (``x`` codes are padding:
    no value in pack/unpack).  ``member``: the layout is that of this member of
    ``c_type`` (a union arm of ``struct kvm_run``, say); ``offset``: where the first
    field lies in ``c_type``; ``whole``: the layout covers all of it (else a prefix).
    """

    def __init__(
        self,
        c_type: str,
        fields: Sequence[tuple[str, str]],
        *,
        member: str = "",
        offset: int = 0,
        whole: bool = True,
    ) -> None:
        super().__init__("=" + "".join(code for _, code in fields))
        self.c_type = c_type
        self.member = member
        self.offset = offset
        self.whole = whole
        self.fields: dict[str, int] = {}
        """C field name -> offset from the first field."""
        at = 0
        for name, code in fields:
            self.fields[name] = at
            at += struct.calcsize("=" + code)


USER_MEMORY_REGION = CStruct(
    "struct kvm_userspace_memory_region",
    [("slot", "I"), ("flags", "I"), ("guest_phys_addr", "Q"), ("memory_size", "Q"),
     ("userspace_addr", "Q")],
)  # fmt: skip
REG_NAMES = [
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rsp",
    "rbp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rip",
    "rflags",
]
REGS = CStruct("struct kvm_regs", [(name, "Q") for name in REG_NAMES])
SEGMENT = CStruct(
    "struct kvm_segment",
    [("base", "Q"), ("limit", "I"), ("selector", "H"), ("type", "B"), ("present", "B"),
     ("dpl", "B"), ("db", "B"), ("s", "B"), ("l", "B"), ("g", "B"), ("avl", "B"),
     ("unusable", "B"), ("padding", "B")],
)  # fmt: skip
DTABLE = CStruct("struct kvm_dtable", [("base", "Q"), ("limit", "H"), ("padding", "3H")])
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
DTABLE_NAMES = ("gdt", "idt")
# kvm_sregs: 8 segments, gdt, idt, then the control registers and interrupt_bitmap[4]
SREGS_CTRL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
SREGS_CTRL = CStruct(
    "struct kvm_sregs",
    [(name, "Q") for name in SREGS_CTRL_NAMES],
    offset=len(SEGMENT_NAMES) * SEGMENT.size + len(DTABLE_NAMES) * DTABLE.size,
    whole=False,
)
SREGS_INTERRUPT_BITMAP_SIZE = 4 * 8
SREGS_SIZE = SREGS_CTRL.offset + SREGS_CTRL.size + SREGS_INTERRUPT_BITMAP_SIZE
# struct kvm_cpuid2 { u32 nent, padding; struct kvm_cpuid_entry2 entries[]; }
CPUID2_HEADER = CStruct("struct kvm_cpuid2", [("nent", "I"), ("padding", "I")])
CPUID_ENTRY2 = CStruct(
    "struct kvm_cpuid_entry2",
    [("function", "I"), ("index", "I"), ("flags", "I"), ("eax", "I"), ("ebx", "I"),
     ("ecx", "I"), ("edx", "I"), ("padding", "3I")],
)  # fmt: skip
IRQ_LEVEL = CStruct("struct kvm_irq_level", [("irq", "I"), ("level", "I")])
IRQFD = CStruct(
    "struct kvm_irqfd",
    [("fd", "I"), ("gsi", "I"), ("flags", "I"), ("resamplefd", "I"), ("pad", "16x")],
)
IOEVENTFD = CStruct(
    "struct kvm_ioeventfd",
    [("datamatch", "Q"), ("addr", "Q"), ("len", "I"), ("fd", "i"), ("flags", "I"),
     ("pad", "36x")],
)  # fmt: skip
INTERRUPT = CStruct("struct kvm_interrupt", [("irq", "I")])
PIT_CONFIG = CStruct("struct kvm_pit_config", [("flags", "I"), ("pad", "60x")])

# --- ioctls ----------------------------------------------------------------------------------
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, CPUID2_HEADER.size)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, USER_MEMORY_REGION.size)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, IRQ_LEVEL.size)
KVM_IRQFD = _iow(0x76, IRQFD.size)
KVM_CREATE_PIT2 = _iow(0x77, PIT_CONFIG.size)
KVM_IOEVENTFD = _iow(0x79, IOEVENTFD.size)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, REGS.size)
KVM_SET_REGS = _iow(0x82, REGS.size)
KVM_GET_SREGS = _ior(0x83, SREGS_SIZE)
KVM_SET_SREGS = _iow(0x84, SREGS_SIZE)
KVM_INTERRUPT = _iow(0x86, INTERRUPT.size)
KVM_SET_CPUID2 = _iow(0x90, CPUID2_HEADER.size)

KVM_API_VERSION = 12

# --- capabilities ----------------------------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_PIT = 11
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IOEVENTFD = 36

# --- ioeventfd / irqfd flags -----------------------------------------------------------------
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0

# --- kvm_run ---------------------------------------------------------------------------------
RUN_HEADER = CStruct(
    "struct kvm_run",
    [("request_interrupt_window", "B"), ("immediate_exit", "B"), ("padding1", "6x"),
     ("exit_reason", "I"), ("ready_for_interrupt_injection", "B"), ("if_flag", "B"),
     ("flags", "H"), ("cr8", "Q"), ("apic_base", "Q")],
    whole=False,
)  # fmt: skip
RUN_REQUEST_INTERRUPT_WINDOW = RUN_HEADER.fields["request_interrupt_window"]
RUN_IMMEDIATE_EXIT = RUN_HEADER.fields["immediate_exit"]
RUN_EXIT_REASON = RUN_HEADER.fields["exit_reason"]
RUN_READY_FOR_INJECTION = RUN_HEADER.fields["ready_for_interrupt_injection"]
RUN_IF_FLAG = RUN_HEADER.fields["if_flag"]
RUN_UNION = RUN_HEADER.size
"""The exit-reason union (``io``, ``mmio``, ...) follows the header."""


def _run_arm(member: str, fields: Sequence[tuple[str, str]], *, whole: bool) -> CStruct:
    return CStruct("struct kvm_run", fields, member=member, offset=RUN_UNION, whole=whole)


RUN_IO = _run_arm(
    "io",
    [("direction", "B"), ("size", "B"), ("port", "H"), ("count", "I"), ("data_offset", "Q")],
    whole=True,
)
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
RUN_MMIO = _run_arm(
    "mmio", [("phys_addr", "Q"), ("data", "8s"), ("len", "I"), ("is_write", "B")], whole=False
)
RUN_FAIL_ENTRY = _run_arm(
    "fail_entry", [("hardware_entry_failure_reason", "Q"), ("cpu", "I")], whole=False
)
RUN_INTERNAL = _run_arm("internal", [("suberror", "I"), ("ndata", "I")], whole=False)
RUN_SYSTEM_EVENT = _run_arm("system_event", [("type", "I"), ("ndata", "I")], whole=False)
RUN_EXCEPTION = _run_arm("ex", [("exception", "I"), ("error_code", "I")], whole=True)

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_REASON_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN",
    KVM_EXIT_EXCEPTION: "EXCEPTION",
    KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL",
    KVM_EXIT_DEBUG: "DEBUG",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
    KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
}
