"""Pure decoding of kvm_run pages and KVM ABI layout checks."""

from __future__ import annotations

import struct

import pytest

from emulator import exits
from emulator.kvm import abi
from emulator.vcpu import pack_sregs, unpack_sregs


def run_page(reason: int, union: bytes = b"", extra: dict[int, bytes] | None = None) -> bytearray:
    page = bytearray(4096)
    abi.RUN_HEADER.pack_into(page, 0, 0, 0, reason, 1, 0, 0, 0, 0)
    page[abi.RUN_UNION : abi.RUN_UNION + len(union)] = union
    for off, data in (extra or {}).items():
        page[off : off + len(data)] = data
    return page


def test_ioctl_numbers_match_linux_headers():
    assert abi.KVM_GET_API_VERSION == 0xAE00
    assert abi.KVM_CREATE_VM == 0xAE01
    assert abi.KVM_GET_VCPU_MMAP_SIZE == 0xAE04
    assert abi.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert abi.KVM_CREATE_VCPU == 0xAE41
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert abi.KVM_CREATE_IRQCHIP == 0xAE60
    assert abi.KVM_IRQ_LINE == 0x4008AE61
    assert abi.KVM_IRQFD == 0x4020AE76
    assert abi.KVM_IOEVENTFD == 0x4040AE79
    assert abi.KVM_RUN == 0xAE80
    assert abi.KVM_GET_REGS == 0x8090AE81
    assert abi.KVM_SET_REGS == 0x4090AE82
    assert abi.KVM_GET_SREGS == 0x8138AE83
    assert abi.KVM_SET_SREGS == 0x4138AE84
    assert abi.KVM_INTERRUPT == 0x4004AE86
    assert abi.KVM_SET_CPUID2 == 0x4008AE90


def test_struct_sizes():
    assert abi.SREGS_SIZE == 312
    assert abi.REGS.size == 144
    assert abi.SEGMENT.size == 24
    assert abi.DTABLE.size == 16
    assert abi.CPUID_ENTRY2.size == 40
    assert abi.IOEVENTFD.size == 64
    assert abi.IRQFD.size == 32
    assert abi.RUN_HEADER.size == abi.RUN_UNION


def test_sregs_round_trip():
    raw = bytes(range(256)) + bytes(range(56))
    assert len(raw) == abi.SREGS_SIZE
    s = unpack_sregs(raw)
    # padding bytes of segments and dtables are not preserved; compare a re-pack instead
    assert unpack_sregs(pack_sregs(s)) == s
    s["cr0"] = 0x80050033
    s["cs"]["l"] = 1
    again = unpack_sregs(pack_sregs(s))
    assert again["cr0"] == 0x80050033 and again["cs"]["l"] == 1


def test_decode_pio_out_with_data():
    union = abi.RUN_IO.pack(abi.KVM_EXIT_IO_OUT, 2, 0x1F0, 3, 0x1000)
    page = run_page(abi.KVM_EXIT_IO, union, {0x1000: b"\x01\x02\x03\x04\x05\x06\x07"})
    e = exits.decode(page)
    assert e == exits.PioExit(0x1F0, 2, True, 3, b"\x01\x02\x03\x04\x05\x06", 0x1000)
    assert e.reason == exits.REASON_PIO


def test_decode_pio_in_and_complete():
    union = abi.RUN_IO.pack(abi.KVM_EXIT_IO_IN, 1, 0x1F7, 1, 0x1000)
    page = run_page(abi.KVM_EXIT_IO, union)
    e = exits.decode(page)
    assert isinstance(e, exits.PioExit) and not e.is_write and e.data == b""
    exits.complete_pio_in(page, e, b"\x58")
    assert page[0x1000] == 0x58
    with pytest.raises(ValueError):
        exits.complete_pio_in(page, e, b"\x00\x00")


def test_decode_mmio_write_and_read():
    union = abi.RUN_MMIO.pack(0xD000_0050, b"\x11\x22\x33\x44\xff\xff\xff\xff", 4, 1)
    e = exits.decode(run_page(abi.KVM_EXIT_MMIO, union))
    assert e == exits.MmioExit(0xD000_0050, 4, True, b"\x11\x22\x33\x44")
    union = abi.RUN_MMIO.pack(0xD000_0000, bytes(8), 2, 0)
    page = run_page(abi.KVM_EXIT_MMIO, union)
    e = exits.decode(page)
    assert e == exits.MmioExit(0xD000_0000, 2, False, b"")
    exits.complete_mmio_read(page, e, b"\xaa\xbb")
    assert page[abi.RUN_UNION + 8 : abi.RUN_UNION + 10] == b"\xaa\xbb"


@pytest.mark.parametrize(
    ("reason", "cls"),
    [
        (abi.KVM_EXIT_HLT, exits.HltExit),
        (abi.KVM_EXIT_SHUTDOWN, exits.ShutdownExit),
    ],
)
def test_decode_simple(reason, cls):
    assert isinstance(exits.decode(run_page(reason)), cls)


def test_decode_failures_and_other():
    e = exits.decode(run_page(abi.KVM_EXIT_FAIL_ENTRY, struct.pack("<QI", 0x21, 0)))
    assert e == exits.FailExit(abi.KVM_EXIT_FAIL_ENTRY, 0x21)
    e = exits.decode(run_page(abi.KVM_EXIT_INTERNAL_ERROR, struct.pack("<II", 1, 0)))
    assert e == exits.FailExit(abi.KVM_EXIT_INTERNAL_ERROR, 1)
    e = exits.decode(run_page(abi.KVM_EXIT_IRQ_WINDOW_OPEN))
    assert e.reason == "IRQ_WINDOW_OPEN"
    assert exits.decode(run_page(999)).reason == "KVM_EXIT_999"
