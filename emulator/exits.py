"""Pure decoding of the ``struct kvm_run`` shared page into exit dataclasses.

:func:`decode` takes the bytes of a kvm_run mapping (any buffer) and returns one
of :class:`PioExit`, :class:`MmioExit`, :class:`HltExit`, :class:`ShutdownExit`,
:class:`FailExit` or :class:`OtherExit`.  It never touches a file descriptor, so
it is tested with hand-built byte strings.  The soft (unicorn) backend builds the
same dataclasses directly, so the bus and the accounting see one vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.kvm import abi

# Accounting names of exit reasons (shared by both CPU backends).
REASON_PIO = "PIO"
REASON_MMIO = "MMIO"
REASON_HLT = "HLT"
REASON_SHUTDOWN = "SHUTDOWN"
REASON_FAIL = "FAIL"
REASON_OTHER = "OTHER"
# Exits that involve no device (HLT, SHUTDOWN, ...) are accounted to this pseudo device,
# with the lower-cased reason as register: every exit has a device and a register.
CPU_DEVICE = "cpu"


@dataclass(frozen=True, slots=True)
class PioExit:
    """``KVM_EXIT_IO``: ``count`` accesses of ``size`` bytes to ``port``.

    For ``OUT`` ``data`` holds ``count * size`` bytes written by the guest; for
    ``IN`` it is empty and the VMM stores the result at ``data_offset`` of kvm_run.
    ``count`` > 1 only for string I/O (``rep ins/outs``).
    """

    port: int
    size: int
    is_write: bool
    count: int = 1
    data: bytes = b""
    data_offset: int = 0
    reason = REASON_PIO


@dataclass(frozen=True, slots=True)
class MmioExit:
    """``KVM_EXIT_MMIO``: one access of ``size`` (1..8) bytes at guest-physical ``addr``."""

    addr: int
    size: int
    is_write: bool
    data: bytes = b""
    reason = REASON_MMIO


@dataclass(frozen=True, slots=True)
class HltExit:
    """``KVM_EXIT_HLT``: the guest executed HLT (only without in-kernel irqchip)."""

    reason = REASON_HLT


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """``KVM_EXIT_SHUTDOWN``: triple fault (or an unrecoverable guest state)."""

    reason = REASON_SHUTDOWN


@dataclass(frozen=True, slots=True)
class FailExit:
    """``KVM_EXIT_FAIL_ENTRY`` / ``KVM_EXIT_INTERNAL_ERROR`` with their code."""

    kvm_reason: int
    code: int
    reason = REASON_FAIL


@dataclass(frozen=True, slots=True)
class OtherExit:
    """Any other exit reason (INTR, IRQ_WINDOW_OPEN, SYSTEM_EVENT, ...)."""

    kvm_reason: int

    @property
    def reason(self) -> str:
        return abi.EXIT_REASON_NAMES.get(self.kvm_reason, f"KVM_EXIT_{self.kvm_reason}")


Exit = PioExit | MmioExit | HltExit | ShutdownExit | FailExit | OtherExit


def decode(run: bytes | bytearray | memoryview) -> Exit:
    """Decode the exit described by a kvm_run page."""
    buf = memoryview(run)
    (reason,) = abi.RUN_HEADER.unpack_from(buf, 0)[2:3]
    union = abi.RUN_UNION
    if reason == abi.KVM_EXIT_IO:
        direction, size, port, count, data_offset = abi.RUN_IO.unpack_from(buf, union)
        is_write = direction == abi.KVM_EXIT_IO_OUT
        data = bytes(buf[data_offset : data_offset + size * count]) if is_write else b""
        return PioExit(port, size, is_write, count, data, data_offset)
    if reason == abi.KVM_EXIT_MMIO:
        addr, raw, length, is_write = abi.RUN_MMIO.unpack_from(buf, union)
        return MmioExit(addr, length, bool(is_write), raw[:length] if is_write else b"")
    if reason == abi.KVM_EXIT_HLT:
        return HltExit()
    if reason == abi.KVM_EXIT_SHUTDOWN:
        return ShutdownExit()
    if reason == abi.KVM_EXIT_FAIL_ENTRY:
        code, _cpu = abi.RUN_FAIL_ENTRY.unpack_from(buf, union)
        return FailExit(reason, code)
    if reason == abi.KVM_EXIT_INTERNAL_ERROR:
        suberror, _ndata = abi.RUN_INTERNAL.unpack_from(buf, union)
        return FailExit(reason, suberror)
    return OtherExit(reason)


def complete_pio_in(run: memoryview | bytearray, exit_: PioExit, data: bytes) -> None:
    """Store the result of an ``IN`` exit where KVM expects it."""
    need = exit_.size * exit_.count
    if len(data) != need:
        raise ValueError(f"PIO IN needs {need} bytes, got {len(data)}")
    run[exit_.data_offset : exit_.data_offset + need] = data


def complete_mmio_read(run: memoryview | bytearray, exit_: MmioExit, data: bytes) -> None:
    """Store the result of an MMIO read in ``kvm_run.mmio.data``."""
    if len(data) != exit_.size:
        raise ValueError(f"MMIO read needs {exit_.size} bytes, got {len(data)}")
    off = abi.RUN_UNION + 8
    run[off : off + exit_.size] = data
