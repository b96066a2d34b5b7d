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

A cluster unallocated in the top image over a raw backing file (one level, not NBD)
is entered as the same offset in that file with ``BACKING`` (reads only) when the
back-end gave the data plane that file (``Qcow2Backend.backing_fd``).  Anything else
not in the map (zero, compressed, partly allocated subclusters, deeper or qcow2/NBD
backing chains) is deferred to the Python read path.
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
BACKING = lib.QCOW2_MAP_BACKING


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


def backing_value(gc: int, cluster_bits: int, backing_size: int) -> int:
    """The map's value for guest cluster ``gc`` unallocated in the top image over a raw
    backing file of ``backing_size`` bytes: the same offset there, with ``BACKING``,
    when the whole cluster lies inside that file (else 0: Python reads the part past
    its end as zeros)."""
    if (gc + 1) << cluster_bits > backing_size:
        return 0
    return gc << cluster_bits | BACKING


def fill_backing(native: NativeMap, image: Any, first_gc: int, count: int) -> None:
    """Enter guest clusters ``[first_gc, first_gc + count)`` of an L2 table the image
    does not have (all unallocated) as reads from the raw backing file."""
    size, cb = image.native_backing_size, image.cluster_bits
    last = min(first_gc + count, native.c.nclusters, size >> cb)
    gcs = list(range(first_gc, last))
    native.set_many(gcs, [gc << cb | BACKING for gc in gcs])


def fill_from_table(native: NativeMap, image: Any, first_gc: int, table: bytes | bytearray) -> None:
    """Enter the plain data clusters of one L2 table (guest clusters from
    ``first_gc``) that pass the checks a Python read makes, and (over a raw backing
    file served natively) its wholly unallocated ones; others stay 0."""
    backing_size = image.native_backing_size
    cb = image.cluster_bits
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
        if first_gc + i >= native.c.nclusters:
            continue
        if entry == 0 and bitmap == 0:  # unallocated as a whole: the backing file's
            value = backing_value(first_gc + i, cb, backing_size) if backing_size else 0
            if value:
                gcs.append(first_gc + i)
                hosts.append(value)
            continue
        if not value:
            continue
        try:
            check_l2_entry(entry, bitmap, extended=extended, cluster_size=image.cs)
            image._check_host(value & OFFSET_MASK, "data cluster", write=bool(value & IN_PLACE))
        except Qcow2FormatError:
            continue  # Python refuses it when the guest reads it
        gcs.append(first_gc + i)
        hosts.append(value)
    native.set_many(gcs, hosts)
