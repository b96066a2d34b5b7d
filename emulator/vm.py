"""A KVM virtual machine: memory slots, vCPUs, irqchip, ioeventfd and irqfd."""

from __future__ import annotations

import os

from emulator.kvm import KvmError, KvmUnavailable, abi, ioctl, open_kvm

# Where KVM may put its private TSS (3 pages) and identity map page on Intel: below 2 GiB
# (the ioctl argument is a C int), above any guest RAM we create, below the MMIO window.
TSS_ADDR = 0x7FFF_D000
IDENTITY_MAP_ADDR = 0x7FFF_C000


class Vm:
    """One VM fd.  ``Vm()`` opens /dev/kvm, checks the API version and creates the VM."""

    def __init__(self, kvm_path: str = "/dev/kvm") -> None:
        self.sys_fd = open_kvm(kvm_path)
        self.fd = -1
        try:
            for cap, name in ((abi.KVM_CAP_USER_MEMORY, "USER_MEMORY"),
                              (abi.KVM_CAP_EXT_CPUID, "EXT_CPUID")):  # fmt: skip
                if not ioctl(self.sys_fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION"):
                    raise KvmUnavailable(f"KVM lacks KVM_CAP_{name}")
            self.fd = ioctl(self.sys_fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
            self.vcpu_mmap_size = ioctl(
                self.sys_fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"
            )
            if self.check_extension(abi.KVM_CAP_SET_TSS_ADDR):
                ioctl(self.fd, abi.KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR")
            if self.check_extension(abi.KVM_CAP_SET_IDENTITY_MAP_ADDR):
                ioctl(
                    self.fd,
                    abi.KVM_SET_IDENTITY_MAP_ADDR,
                    IDENTITY_MAP_ADDR.to_bytes(8, "little"),
                    "KVM_SET_IDENTITY_MAP_ADDR",
                )
        except BaseException:
            self.close()
            raise
        self.irqchip = False
        self._slots = 0
        self.vcpus: list = []

    # -- capabilities ------------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        fd = self.fd if self.fd >= 0 else self.sys_fd
        return ioctl(fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def supported_cpuid(self, max_entries: int = 256) -> bytes:
        """KVM_GET_SUPPORTED_CPUID: the raw ``kvm_cpuid2`` blob (header + entries)."""
        buf = bytearray(abi.CPUID2_HEADER.size + max_entries * abi.CPUID_ENTRY2.size)
        abi.CPUID2_HEADER.pack_into(buf, 0, max_entries, 0)
        ioctl(self.sys_fd, abi.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
        (nent, _pad) = abi.CPUID2_HEADER.unpack_from(buf, 0)
        return bytes(buf[: abi.CPUID2_HEADER.size + nent * abi.CPUID_ENTRY2.size])

    # -- memory ------------------------------------------------------------------------------
    def set_user_memory_region(
        self, guest_phys_addr: int, size: int, userspace_addr: int, slot: int | None = None
    ) -> int:
        if slot is None:
            slot = self._slots
            self._slots += 1
        arg = abi.USER_MEMORY_REGION.pack(slot, 0, guest_phys_addr, size, userspace_addr)
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, arg, "KVM_SET_USER_MEMORY_REGION")
        return slot

    # -- interrupts --------------------------------------------------------------------------
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP (in-kernel PIC + IOAPIC + LAPIC); must precede vCPU creation."""
        ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        self.irqchip = True

    def set_irq_line(self, irq: int, level: int | bool) -> None:
        """KVM_IRQ_LINE on the in-kernel irqchip (GSI ``irq``)."""
        if not self.irqchip:
            raise KvmError(0, "KVM_IRQ_LINE needs the in-kernel irqchip (create_irqchip())")
        arg = abi.IRQ_LEVEL.pack(irq, 1 if level else 0)
        ioctl(self.fd, abi.KVM_IRQ_LINE, arg, "KVM_IRQ_LINE")

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """KVM_IRQFD: writing to eventfd ``fd`` raises (edge) GSI ``gsi`` in the guest."""
        flags = abi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        ioctl(self.fd, abi.KVM_IRQFD, abi.IRQFD.pack(fd, gsi, flags, 0), "KVM_IRQFD")

    def ioeventfd(
        self,
        addr: int,
        size: int,
        fd: int,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """KVM_IOEVENTFD: a guest write of ``size`` bytes at ``addr`` signals eventfd ``fd``
        inside the kernel instead of exiting to the VMM (``size`` 0 = any length, MMIO only)."""
        flags = 0
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= abi.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = abi.IOEVENTFD.pack(datamatch or 0, addr, size, fd, flags)
        ioctl(self.fd, abi.KVM_IOEVENTFD, arg, "KVM_IOEVENTFD")

    # -- vcpus -------------------------------------------------------------------------------
    def create_vcpu(self, index: int = 0):
        from emulator.vcpu import Vcpu

        vcpu = Vcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in getattr(self, "vcpus", []):
            vcpu.close()
        self.vcpus = []
        for attr in ("fd", "sys_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
