"""The qcow2 cluster map the native data plane reads through (``struct qcow2_map``,
``virtio/native/blk_dataplane.c``): guest cluster -> host offset of every cluster
that is plain allocated data in the top image, so that the read of such a cluster
never enters the interpreter (issue 9 §1: "the hot path of an allocated-cluster
read does not enter the Python interpreter").  A cluster the image owns (the COPIED
bit: refcount 1) is marked ``IN_PLACE``: a write there changes no metadata, so the
data plane writes it too (not write-through writes: those stay with the image's
sticky flush error in Python).

``Qcow2Image`` keeps the map true (``image.py``):

* an L2 table's plain data clusters are entered when the table is first used (the
  same validation as a Python read: ``check_l2_entry`` and ``_check_host``);
* an entry is cleared *before* its L2 entry changes, and set again afterwards if
  the new entry is plain data (written data is in the file before the L2 entry
  names it);
* before clusters an L2 entry stopped naming are given back to the allocator,
  ``synchronize`` waits for every native read that may still use them.

Anything not in the map (unallocated, zero, compressed, partly allocated
subclusters, the backing chain) is deferred to the Python read path.
"""

from __future__ import annotations

import struct
from typing import Any

from virtio.devices.blk.qcow2.header import Qcow2FormatError
from virtio.devices.blk.qcow2.mapping import (
    ALL_ALLOC,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    check_l2_entry,
)
from virtio.native import ffi, lib

IN_PLACE = lib.QCOW2_MAP_IN_PLACE


def plain_host(entry: int, bitmap: int, *, extended: bool, version: int) -> int:
    """The host offset of a cluster that is plain allocated data as a whole, else 0."""
    if entry & OFLAG_COMPRESSED:
        return 0
    if extended:
        if bitmap != ALL_ALLOC:  # every subcluster allocated, none zero
            return 0
    elif version >= 3 and entry & OFLAG_ZERO:
        return 0
    return entry & OFFSET_MASK


def map_value(entry: int, bitmap: int, *, extended: bool, version: int, writable: bool) -> int:
    """The map's value for an L2 entry: its plain host offset (0: not mapped), with
    ``IN_PLACE`` when the image is writable and owns the cluster."""
    host = plain_host(entry, bitmap, extended=extended, version=version)
    if host and writable and entry & OFLAG_COPIED:
        host |= IN_PLACE
    return host


class NativeMap:
    """One image's ``struct qcow2_map`` (owned here; freed by ``close``)."""

    def __init__(self, virtual_size: int, cluster_bits: int) -> None:
        self.c: Any = ffi.new("struct qcow2_map *")
        nclusters = -(-virtual_size >> cluster_bits) if virtual_size else 1
        rc = lib.qcow2_map_init(self.c, nclusters, cluster_bits)
        if rc < 0:
            raise OSError(-rc, "cannot set up the qcow2 cluster map")

    def set(self, gc: int, host: int) -> None:
        lib.qcow2_map_set(self.c, gc, host)

    def clear(self, gc: int) -> None:
        lib.qcow2_map_set(self.c, gc, 0)

    def set_many(self, gcs: list[int], hosts: list[int]) -> None:
        if gcs:
            lib.qcow2_map_set_many(self.c, gcs, hosts, len(gcs))

    def synchronize(self) -> None:
        """Return once no native read can still use an offset cleared before."""
        lib.qcow2_map_synchronize(self.c)

    def lookup(self, gc: int) -> int:
        """The entry for guest cluster ``gc`` (tests, statistics)."""
        return int(self.c.host[gc]) if gc < self.c.nclusters else 0

    def close(self) -> None:
        lib.qcow2_map_destroy(self.c)


def fill_from_table(native: NativeMap, image: Any, first_gc: int, table: bytes | bytearray) -> None:
    """Enter the plain data clusters of one L2 table (guest clusters from
    ``first_gc``) that pass the checks a Python read makes; others stay 0."""
    extended = image.extended
    writable = not image.read_only
    n = len(table) // (16 if extended else 8)
    words = struct.unpack(f">{n * 2 if extended else n}Q", table)
    gcs: list[int] = []
    hosts: list[int] = []
    for i in range(n):
        entry, bitmap = (words[2 * i], words[2 * i + 1]) if extended else (words[i], 0)
        value = map_value(
            entry, bitmap, extended=extended, version=image.version, writable=writable
        )
        if not value or first_gc + i >= native.c.nclusters:
            continue
        try:
            check_l2_entry(entry, bitmap, extended=extended, cluster_size=image.cs)
            image._check_host(value & OFFSET_MASK, "data cluster", write=bool(value & IN_PLACE))
        except Qcow2FormatError:
            continue  # Python refuses it when the guest reads it
        gcs.append(first_gc + i)
        hosts.append(value)
    native.set_many(gcs, hosts)
