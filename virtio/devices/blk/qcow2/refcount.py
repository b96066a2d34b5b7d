"""Host cluster refcounts and allocation (qcow2.rst "Host cluster management").

Refcounts live in a two-level structure: the refcount table (contiguous, in
memory here) points to refcount blocks of one cluster each (cached in a
``TableCache``).  Entries are ``refcount_bits`` wide (1..64; sub-byte widths
count from the least significant bit).

Crash safety: a refcount is only ever *raised* before the L2 entry that uses
the cluster reaches the disk, and only *lowered* after the L2 entry that dropped
the cluster is durable (``image.py`` defers frees until its flush), so a crash
leaves at worst leaked clusters.  A new refcount block is written (and synced)
before the table entry that points to it; a grown refcount table is written with
its blocks and synced before the header switches to it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

from virtio.devices.blk.qcow2.cache import TableCache
from virtio.devices.blk.qcow2.header import (
    HOST_OFFSET_LIMIT,
    MAX_REFCOUNT_TABLE_BYTES,
    OFF_REFCOUNT_TABLE_OFFSET,
    Qcow2FormatError,
)

RT_RESERVED = 0x1FF


class HostFile(Protocol):
    def pread(self, offset: int, length: int) -> bytes: ...
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    def sync(self) -> None: ...


class RefcountOverflowError(Qcow2FormatError):
    """A refcount would exceed what ``refcount_bits`` can hold."""


class Refcounts:
    """Refcounts of one image, and the allocator of its host clusters."""

    def __init__(
        self,
        f: HostFile,
        *,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        file_size: int,
        cache_tables: int,
        write_header: Callable[[int, bytes], None],
    ) -> None:
        self.f = f
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.bits = 1 << refcount_order
        self.max_refcount = (1 << self.bits) - 1
        self.per_block = self.cs * 8 // self.bits
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = f.pread(table_offset, table_clusters * self.cs)
        if len(raw) != table_clusters * self.cs:
            raise Qcow2FormatError("refcount table runs past the end of the image")
        self.table = list(struct.unpack(f">{len(raw) // 8}Q", raw))
        for i, e in enumerate(self.table):
            if e & RT_RESERVED or e >= HOST_OFFSET_LIMIT:
                raise Qcow2FormatError(f"refcount table entry {i} ({e:#x}) is invalid")
        self._dirty_table: set[int] = set()
        first = table_offset >> cluster_bits
        self.metadata: set[int] = set(range(first, first + table_clusters))
        """Clusters of the refcount table and blocks (for overlap checks)."""
        self.metadata.update(e >> cluster_bits for e in self.table if e)
        self.end = -(-file_size // self.cs)
        """First cluster index past every allocated cluster (the file's end)."""
        self.free_hint = 0
        self._write_header = write_header
        self.cache = TableCache(cache_tables, self.cs, self._load, self._store, self.write_blocks)

    # -- blocks ------------------------------------------------------------------------
    def _load(self, offset: int) -> bytearray:
        data = self.f.pread(offset, self.cs)
        if len(data) != self.cs:
            raise Qcow2FormatError(f"refcount block at {offset:#x} runs past the end of the image")
        return bytearray(data)

    def _store(self, offset: int, block: bytearray) -> None:
        self.f.pwrite(offset, block)

    def _block_offset(self, t: int) -> int:
        off = self.table[t] if t < len(self.table) else 0
        if off and (off % self.cs or off >> self.cluster_bits == 0):
            raise Qcow2FormatError(f"refcount block offset {off:#x} is invalid")
        return off

    def _get_entry(self, block: bytearray, i: int) -> int:
        bits = self.bits
        if bits >= 8:
            n = bits // 8
            return int.from_bytes(block[i * n : i * n + n], "big")
        pos = i * bits
        return (block[pos >> 3] >> (pos & 7)) & self.max_refcount

    def _set_entry(self, block: bytearray, i: int, value: int) -> None:
        bits = self.bits
        if bits >= 8:
            n = bits // 8
            block[i * n : i * n + n] = value.to_bytes(n, "big")
            return
        pos = i * bits
        shift = pos & 7
        mask = self.max_refcount << shift
        block[pos >> 3] = (block[pos >> 3] & ~mask & 0xFF) | (value << shift)

    # -- queries -------------------------------------------------------------------------
    def get(self, cluster: int) -> int:
        off = self._block_offset(cluster // self.per_block)
        if not off:
            return 0
        return self._get_entry(self.cache.get(off), cluster % self.per_block)

    def find_free(self, n: int = 1, start: int | None = None) -> int:
        """Index of the first run of ``n`` free clusters at or after ``start``
        (default ``free_hint``); clusters no refcount block describes are free."""
        c = start = self.free_hint if start is None else start
        while c < start + n:
            t = c // self.per_block
            if not self._block_offset(t):
                c = min((t + 1) * self.per_block, start + n)
                continue
            if self.get(c):
                start = c + 1
            c += 1
        return start

    # -- updates -------------------------------------------------------------------------
    def update(self, cluster: int, delta: int) -> None:
        """Add ``delta`` to one cluster's refcount."""
        t = cluster // self.per_block
        off = self._ensure_block(t)
        block = self.cache.get(off)
        i = cluster % self.per_block
        value = self._get_entry(block, i) + delta
        if value < 0:
            raise Qcow2FormatError(f"refcount of cluster {cluster} would drop below zero")
        if value > self.max_refcount:
            raise RefcountOverflowError(f"refcount of cluster {cluster} would overflow")
        self._set_entry(block, i, value)
        self.cache.mark_dirty(off)
        if value == 0:
            self.free_hint = min(self.free_hint, cluster)
        else:
            self.end = max(self.end, cluster + 1)

    def allocate(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1); return the host offset."""
        while True:
            start = self.find_free(n)
            for c in range(start, start + n):
                self._ensure_block(c // self.per_block)
            if all(self.get(c) == 0 for c in range(start, start + n)):
                break  # making blocks may have used part of the run: look again
        for c in range(start, start + n):
            self.update(c, 1)
        self.free_hint = start + n
        if (start + n) << self.cluster_bits >= HOST_OFFSET_LIMIT:
            raise Qcow2FormatError("image would grow past the 56-bit host offset limit")
        return start << self.cluster_bits

    def _ensure_block(self, t: int) -> int:
        """The host offset of refcount block ``t``, allocating it if needed."""
        while True:
            off = self._block_offset(t)
            if off:
                return off
            if t >= len(self.table):
                self._grow_table(t + 1)
                continue
            b = self.find_free(1)
            bt = b // self.per_block
            if bt == t:  # the new block describes itself
                block = self.cache.new(b << self.cluster_bits)
                self._set_entry(block, b % self.per_block, 1)
                return self._install(t, b)
            self._ensure_block(bt)
            if self.get(b):
                continue
            self.update(b, 1)
            self.cache.new(b << self.cluster_bits)
            return self._install(t, b)

    def _install(self, t: int, cluster: int) -> int:
        off = cluster << self.cluster_bits
        self.table[t] = off
        self.metadata.add(cluster)
        self._dirty_table.add(t)
        self.end = max(self.end, cluster + 1)
        return off

    # -- growing the refcount table ------------------------------------------------------
    def _grow_table(self, min_entries: int) -> None:
        per_cluster = self.cs // 8
        entries = max(min_entries, len(self.table) * 3 // 2, len(self.table) + 1)
        start = self.find_free(1, self.end)
        while True:
            table_clusters = -(-entries // per_cluster)
            entries = table_clusters * per_cluster
            nblocks = 0
            while True:  # blocks needed to describe [start, start + blocks + table)
                last = start + nblocks + table_clusters - 1
                missing = [
                    t
                    for t in range(start // self.per_block, last // self.per_block + 1)
                    if not self._block_offset(t)
                ]
                if len(missing) <= nblocks:
                    break
                nblocks = len(missing)
            run = start + nblocks + table_clusters
            if self.find_free(run - start, start) != start:
                start = self.find_free(run - start, start)
                continue
            if max(missing, default=0) < entries:
                break
            entries = max(missing) + 1
        if table_clusters * self.cs > MAX_REFCOUNT_TABLE_BYTES:
            raise Qcow2FormatError("refcount table would exceed 8 MiB (image too large)")
        table = self.table + [0] * (entries - len(self.table))
        blocks = {}
        for i, t in enumerate(missing):
            table[t] = (start + i) << self.cluster_bits
            blocks[t] = bytearray(self.cs)
        area = range(start, start + nblocks + table_clusters)
        for c in area:
            t = c // self.per_block
            if t in blocks:
                i = c % self.per_block
                self._set_entry(blocks[t], i, self._get_entry(blocks[t], i) + 1)
        # Clusters of the area described by existing blocks: raise them in place.
        for c in area:
            if c // self.per_block not in blocks:
                self.update(c, 1)
        self.write_blocks()
        for t, block in blocks.items():
            self.f.pwrite(table[t], block)
        table_offset = (start + nblocks) << self.cluster_bits
        self.f.pwrite(table_offset, struct.pack(f">{entries}Q", *table))
        self.f.sync()
        self._write_header(
            OFF_REFCOUNT_TABLE_OFFSET, struct.pack(">QI", table_offset, table_clusters)
        )
        self.f.sync()
        old = range(
            self.table_offset >> self.cluster_bits,
            (self.table_offset >> self.cluster_bits) + self.table_clusters,
        )
        self.table = table
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.metadata.difference_update(old)
        self.metadata.update(area)
        self._dirty_table.clear()
        self.end = max(self.end, area.stop)
        for c in old:  # nothing points to the old table any more
            self.update(c, -1)

    # -- write-back ----------------------------------------------------------------------
    def write_blocks(self) -> None:
        """Write every dirty refcount block (always safe: see the module docstring)."""
        self.cache.write_all()

    def write_back(self) -> None:
        """Blocks, then (after a sync) the table entries that point to new blocks."""
        self.write_blocks()
        if self._dirty_table:
            self.f.sync()
            for t in sorted(self._dirty_table):
                self.f.pwrite(self.table_offset + t * 8, struct.pack(">Q", self.table[t]))
            self._dirty_table.clear()

    @property
    def dirty(self) -> bool:
        return self.cache.has_dirty or bool(self._dirty_table)
