"""The ELF64 loader: real guest builds and malformed files."""

from __future__ import annotations

import pytest

from emulator import guest_build, memory
from emulator.elf import EHDR, PHDR, ElfError, load_elf, parse_elf


def make_elf(
    segments: list[tuple[int, bytes, int]],
    entry: int = 0x100000,
    etype: int = 2,
    machine: int = 62,
    cls: int = 2,
) -> bytes:
    phoff = EHDR.size
    data_off = phoff + PHDR.size * len(segments)
    hdr = EHDR.pack(b"\x7fELF", cls, 1, 1, 0, 0, etype, machine, 1, entry, phoff, 0, 0,
                    EHDR.size, PHDR.size, len(segments), 64, 0, 0)  # fmt: skip
    phdrs, blobs = b"", b""
    for paddr, data, memsz in segments:
        phdrs += PHDR.pack(1, 7, data_off + len(blobs), paddr, paddr, len(data), memsz, 0x1000)
        blobs += data
    return hdr + phdrs + blobs


def test_synthetic_elf_loads_and_zeroes_bss():
    blob = make_elf([(0x100000, b"\x90\x90\xf4", 0x20), (0x200000, b"\x01", 4)])
    img = parse_elf(blob)
    assert img.entry == 0x100000 and len(img.segments) == 2 and img.end == 0x200004
    ram = memoryview(bytearray(b"\xcc" * (4 << 20)))
    load_elf(img, ram, min_addr=memory.LOAD_ADDR)
    assert bytes(ram[0x100000:0x100020]) == b"\x90\x90\xf4" + bytes(29)
    assert bytes(ram[0x200000:0x200005]) == b"\x01\x00\x00\x00\xcc"


@pytest.mark.parametrize(
    ("blob", "msg"),
    [
        (b"\x7fELF", "too short"),
        (b"\x7fELX" + bytes(60), "magic"),
        (make_elf([(0x100000, b"\xf4", 1)], cls=1), "ELF64"),
        (make_elf([(0x100000, b"\xf4", 1)], etype=3), "ET_EXEC"),
        (make_elf([(0x100000, b"\xf4", 1)], machine=40), "x86-64"),
        (make_elf([]), "no PT_LOAD"),
        (make_elf([(0x100000, b"\xf4\xf4", 1)]), "p_filesz > p_memsz"),
    ],
)
def test_malformed(blob, msg):
    with pytest.raises(ElfError, match=msg):
        parse_elf(blob)


def test_truncated_segment_data():
    blob = make_elf([(0x100000, b"\xf4" * 16, 16)])[:-8]
    with pytest.raises(ElfError, match="beyond end of file"):
        parse_elf(blob)


def test_load_outside_ram_or_bad_entry():
    ram = memoryview(bytearray(4 << 20))
    with pytest.raises(ElfError, match="outside loadable RAM"):
        load_elf(parse_elf(make_elf([(0x3FF000, b"", 0x2000)])), ram, memory.LOAD_ADDR)
    with pytest.raises(ElfError, match="outside loadable RAM"):
        load_elf(parse_elf(make_elf([(0x1000, b"\xf4", 1)], entry=0x1000)), ram, 0x100000)
    with pytest.raises(ElfError, match="entry point"):
        load_elf(parse_elf(make_elf([(0x100000, b"\xf4", 1)], entry=0x1234)), ram, 0)


def test_real_guest_build(need_gcc):
    path = guest_build.build("ide")
    assert guest_build.build("ide") == path  # cached
    img = parse_elf(path.read_bytes())
    assert img.entry == img.symbols["_start"][0] == memory.LOAD_ADDR
    assert "main" in img.symbols
    assert all(s.paddr >= memory.LOAD_ADDR for s in img.segments)
