"""KVM userspace ABI: ioctl numbers, struct layouts and exit-reason codes.

Everything here mirrors ``<linux/kvm.h>`` for x86-64.  Structures are packed and
unpacked with :mod:`struct` (no ctypes structures, no build step).
"""

from __future__ import annotations

import struct

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
# struct kvm_userspace_memory_region { u32 slot, flags; u64 guest_phys_addr, memory_size,
# userspace_addr; }
USER_MEMORY_REGION = struct.Struct("=IIQQQ")
# struct kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
REGS = struct.Struct("=18Q")
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
# struct kvm_segment { u64 base; u32 limit; u16 selector; u8 type, present, dpl, db, s, l, g,
# avl, unusable, padding; }
SEGMENT = struct.Struct("=QIH10B")
# struct kvm_dtable { u64 base; u16 limit; u16 padding[3]; }
DTABLE = struct.Struct("=QH3H")
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
# kvm_sregs: 8 segments, gdt, idt, cr0 cr2 cr3 cr4 cr8 efer apic_base, interrupt_bitmap[4]
SREGS_SIZE = 8 * SEGMENT.size + 2 * DTABLE.size + 7 * 8 + 4 * 8
SREGS_CTRL = struct.Struct("=7Q")
SREGS_CTRL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
# struct kvm_cpuid2 { u32 nent, padding; struct kvm_cpuid_entry2 entries[]; }
CPUID2_HEADER = struct.Struct("=II")
# struct kvm_cpuid_entry2 { u32 function, index, flags, eax, ebx, ecx, edx, padding[3]; }
CPUID_ENTRY2 = struct.Struct("=10I")
# struct kvm_irq_level { u32 irq; u32 level; }
IRQ_LEVEL = struct.Struct("=II")
# struct kvm_irqfd { u32 fd, gsi, flags, resamplefd; u8 pad[16]; }
IRQFD = struct.Struct("=IIII16x")
# struct kvm_ioeventfd { u64 datamatch, addr; u32 len; s32 fd; u32 flags; u8 pad[36]; }
IOEVENTFD = struct.Struct("=QQIiI36x")
# struct kvm_interrupt { u32 irq; }
INTERRUPT = struct.Struct("=I")
# struct kvm_pit_config { u32 flags; u32 pad[15]; }
PIT_CONFIG = struct.Struct("=I60x")

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
# struct kvm_run { u8 request_interrupt_window; u8 immediate_exit; u8 padding1[6];
#   u32 exit_reason; u8 ready_for_interrupt_injection; u8 if_flag; u16 flags;
#   u64 cr8; u64 apic_base; union {...} at offset 32; }
RUN_HEADER = struct.Struct("=BB6xIBBHQQ")
RUN_REQUEST_INTERRUPT_WINDOW = 0
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_READY_FOR_INJECTION = 12
RUN_IF_FLAG = 13
RUN_UNION = 32
# io: u8 direction; u8 size; u16 port; u32 count; u64 data_offset;
RUN_IO = struct.Struct("=BBHIQ")
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
# mmio: u64 phys_addr; u8 data[8]; u32 len; u8 is_write;
RUN_MMIO = struct.Struct("=Q8sIB")
# fail_entry: u64 hardware_entry_failure_reason; u32 cpu;
RUN_FAIL_ENTRY = struct.Struct("=QI")
# internal: u32 suberror; u32 ndata; u64 data[16];
RUN_INTERNAL = struct.Struct("=II")
# system_event: u32 type; u32 ndata; u64 data[16];
RUN_SYSTEM_EVENT = struct.Struct("=II")
# ex: u32 exception; u32 error_code;
RUN_EXCEPTION = struct.Struct("=II")

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
