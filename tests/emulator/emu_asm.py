"""A handful of x86-64 instruction encoders for raw test guests (no assembler needed)."""

from __future__ import annotations

import struct


def mov_dx(port: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port)


def outb(port: int, value: int) -> bytes:
    return mov_dx(port) + bytes([0xB0, value & 0xFF, 0xEE])


def outw(port: int, value: int) -> bytes:
    return mov_dx(port) + b"\x66\xb8" + struct.pack("<H", value) + b"\x66\xef"


def outl(port: int, value: int) -> bytes:
    return mov_dx(port) + b"\xb8" + struct.pack("<I", value) + b"\xef"


def inb(port: int) -> bytes:
    return mov_dx(port) + b"\xec"


def store_al(addr: int) -> bytes:
    """mov [addr32], al"""
    return b"\x88\x04\x25" + struct.pack("<I", addr)


def rep_insw(port: int, dest: int, count: int) -> bytes:
    return (
        b"\x48\xbf" + struct.pack("<Q", dest)  # mov rdi, dest
        + b"\xb9" + struct.pack("<I", count)  # mov ecx, count
        + mov_dx(port) + b"\xfc\xf3\x66\x6d"  # cld; rep insw
    )  # fmt: skip


def rep_outsw(port: int, src: int, count: int) -> bytes:
    return (
        b"\x48\xbe" + struct.pack("<Q", src)  # mov rsi, src
        + b"\xb9" + struct.pack("<I", count)
        + mov_dx(port) + b"\xfc\xf3\x66\x6f"
    )  # fmt: skip


def mmio_read32(addr: int) -> bytes:
    """mov rbx, addr; mov eax, [rbx]"""
    return b"\x48\xbb" + struct.pack("<Q", addr) + b"\x8b\x03"


def mmio_write32(addr: int, value: int) -> bytes:
    """mov rbx, addr; mov dword [rbx], value"""
    return b"\x48\xbb" + struct.pack("<Q", addr) + b"\xc7\x03" + struct.pack("<I", value)


HLT = b"\xf4"
UD2 = b"\x0f\x0b"
JMP_SELF = b"\xeb\xfe"


def loop_forever(body: bytes) -> bytes:
    """body; jmp back to the start of body"""
    n = len(body) + 2
    assert n <= 128
    return body + b"\xeb" + bytes([(-n) & 0xFF])
