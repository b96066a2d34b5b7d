"""Pure decoding of kvm_run pages (the ABI itself: test_kvm_abi.py)."""

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
