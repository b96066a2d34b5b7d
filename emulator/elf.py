"""Minimal ELF64 loader (little-endian x86-64 executables, PT_LOAD segments only)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
SHT_SYMTAB = 2

EHDR = struct.Struct("<4sBBBBB7xHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")


class ElfError(ValueError):
    """The file is not a loadable ELF64 x86-64 executable, or does not fit in RAM."""


@dataclass(frozen=True)
class Segment:
    paddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    entry: int
    segments: tuple[Segment, ...]
    symbols: dict[str, tuple[int, int]]  # name -> (address, size)

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def parse_elf(blob: bytes) -> ElfImage:
    if len(blob) < EHDR.size:
        raise ElfError("file too short for an ELF header")
    hdr = EHDR.unpack_from(blob)
    magic, cls, data, etype, machine, entry, phoff, shoff = (
        hdr[0], hdr[1], hdr[2], hdr[6], hdr[7], hdr[9], hdr[10], hdr[11]
    )  # fmt: skip
    phentsize, phnum, shentsize, shnum = hdr[14], hdr[15], hdr[16], hdr[17]
    if magic != ELF_MAGIC:
        raise ElfError("bad ELF magic")
    if cls != ELFCLASS64 or data != ELFDATA2LSB:
        raise ElfError("not a little-endian ELF64 file")
    if etype != ET_EXEC:
        raise ElfError(f"ELF type {etype} is not ET_EXEC (static, non-PIE executable needed)")
    if machine != EM_X86_64:
        raise ElfError(f"ELF machine {machine} is not x86-64")
    if phnum and phentsize < PHDR.size:
        raise ElfError("program header entries too small")
    segments = []
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + PHDR.size > len(blob):
            raise ElfError(f"program header {i} beyond end of file")
        ptype, _pflags, p_offset, _vaddr, paddr, filesz, memsz, _align = PHDR.unpack_from(blob, off)
        if ptype != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise ElfError(f"segment {i}: p_filesz > p_memsz")
        if p_offset + filesz > len(blob):
            raise ElfError(f"segment {i}: file data beyond end of file")
        segments.append(Segment(paddr, blob[p_offset : p_offset + filesz], memsz))
    if not segments:
        raise ElfError("no PT_LOAD segments")
    symbols: dict[str, tuple[int, int]] = {}
    if shoff and shentsize >= SHDR.size and shoff + shnum * shentsize <= len(blob):
        shdrs = [SHDR.unpack_from(blob, shoff + i * shentsize) for i in range(shnum)]
        for sh in shdrs:
            if sh[1] != SHT_SYMTAB or sh[6] >= len(shdrs):
                continue
            stroff = shdrs[sh[6]][4]
            for j in range(sh[5] // SYM.size):
                name_off, _info, _other, _shndx, value, size = SYM.unpack_from(
                    blob, sh[4] + j * SYM.size
                )
                end = blob.find(b"\0", stroff + name_off)
                name = blob[stroff + name_off : end].decode("ascii", "replace")
                if name:
                    symbols[name] = (value, size)
    return ElfImage(entry, tuple(segments), symbols)


def load_elf(image: ElfImage, ram: memoryview, min_addr: int = 0) -> None:
    """Copy segments into ``ram`` (guest-physical = index) and zero their BSS parts."""
    for seg in image.segments:
        if seg.paddr < min_addr or seg.paddr + seg.memsz > len(ram):
            raise ElfError(
                f"segment {seg.paddr:#x}+{seg.memsz:#x} outside loadable RAM "
                f"[{min_addr:#x}, {len(ram):#x})"
            )
        ram[seg.paddr : seg.paddr + len(seg.data)] = seg.data
        ram[seg.paddr + len(seg.data) : seg.paddr + seg.memsz] = bytes(seg.memsz - len(seg.data))
    if not any(s.paddr <= image.entry < s.paddr + s.memsz for s in image.segments):
        raise ElfError(f"entry point {image.entry:#x} is not inside a loaded segment")
