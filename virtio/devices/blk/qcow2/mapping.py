"""Guest-to-host mapping: L1/L2 entries (qcow2.rst "Cluster mapping", "Extended L2
Entries").

An L2 entry (plus, with extended L2 entries, its 64-bit subcluster bitmap) says
for each (sub)cluster of guest data one of: ``DATA`` at a host offset,
``ZERO`` (reads as zeros), ``UNALLOCATED`` (reads from the backing file, or zeros)
or ``COMPRESSED``.  ``classify`` answers that for one subcluster; ``L2Table``
reads and writes entries of a cached table.
"""

from __future__ import annotations

import enum
import struct

from virtio.devices.blk.qcow2.header import Qcow2FormatError

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
"""Bits 9-55: host offset of an L2 table (L1 entry) or data cluster (L2 entry)."""
OFLAG_COPIED = 1 << 63
"""Refcount is exactly one: may be written in place."""
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
"""Standard cluster descriptor bit 0 (version 3 without extended L2)."""
L1E_RESERVED = 0x7F00_0000_0000_01FF
L2E_RESERVED = 0x3F00_0000_0000_01FE
SUBCLUSTERS = 32
"""Extended L2: every standard cluster has 32 subclusters."""
ALL_ALLOC = (1 << SUBCLUSTERS) - 1


class Kind(enum.Enum):
    UNALLOCATED = "unallocated"
    ZERO = "zero"
    DATA = "data"
    COMPRESSED = "compressed"


class L2Table:
    """Entry access on a cached L2 table (a bytearray of one cluster)."""

    __slots__ = ("buf", "extended")

    def __init__(self, buf: bytearray, extended: bool) -> None:
        self.buf = buf
        self.extended = extended

    def get(self, index: int) -> tuple[int, int]:
        """(entry, subcluster bitmap); the bitmap is 0 without extended L2."""
        if self.extended:
            return struct.unpack_from(">QQ", self.buf, index * 16)
        return struct.unpack_from(">Q", self.buf, index * 8)[0], 0

    def set(self, index: int, entry: int, bitmap: int = 0) -> None:
        if self.extended:
            struct.pack_into(">QQ", self.buf, index * 16, entry, bitmap)
        else:
            struct.pack_into(">Q", self.buf, index * 8, entry)


def classify(entry: int, bitmap: int, sub: int, *, extended: bool, version: int) -> Kind:
    """What subcluster ``sub`` (0 without extended L2) of an L2 entry holds."""
    if entry & OFLAG_COMPRESSED:
        return Kind.COMPRESSED
    if extended:
        if bitmap >> sub & 1:
            if not entry & OFFSET_MASK:
                raise Qcow2FormatError("allocated subcluster without a host offset")
            return Kind.DATA
        if bitmap >> (sub + SUBCLUSTERS) & 1:
            return Kind.ZERO
        return Kind.UNALLOCATED
    if version >= 3 and entry & OFLAG_ZERO:
        return Kind.ZERO
    if entry & OFFSET_MASK:
        return Kind.DATA
    return Kind.UNALLOCATED


def check_l2_entry(entry: int, bitmap: int, *, extended: bool, cluster_size: int) -> None:
    """Refuse an entry with reserved bits, a misaligned host offset, or (extended
    L2) a subcluster both allocated and zero."""
    if entry & OFLAG_COMPRESSED:
        if extended and bitmap:
            raise Qcow2FormatError("compressed cluster with a subcluster bitmap")
        return
    reserved = L2E_RESERVED | (OFLAG_ZERO if extended else 0)
    if entry & reserved:
        raise Qcow2FormatError(f"L2 entry {entry:#x} has reserved bits set")
    if (entry & OFFSET_MASK) % cluster_size:
        raise Qcow2FormatError(f"L2 entry {entry:#x}: host offset not cluster aligned")
    if extended and (bitmap & ALL_ALLOC) & (bitmap >> SUBCLUSTERS):
        raise Qcow2FormatError(f"subcluster bitmap {bitmap:#x}: allocated and zero at once")


def check_l1_entry(entry: int, cluster_size: int) -> int:
    """The L2 table offset an L1 entry names (0: none); refuses bad entries."""
    if entry & L1E_RESERVED:
        raise Qcow2FormatError(f"L1 entry {entry:#x} has reserved bits set")
    offset = entry & OFFSET_MASK
    if offset % cluster_size:
        raise Qcow2FormatError(f"L1 entry {entry:#x}: L2 table not cluster aligned")
    return offset
