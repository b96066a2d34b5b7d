"""One qcow2 image, opened for reading (and writing), with its backing chain.

Blocking code, run by ``Qcow2Backend`` in one worker thread at a time.

Reads walk the L1/L2 mapping (``mapping.py``): data clusters are read from the
image, zero clusters are zeros, unallocated ones fall through to the backing
chain (zeros past its end), compressed ones are inflated (``compress.py``).

Writes go in place into clusters this image owns (refcount 1, the COPIED bit);
anything else gets a new cluster (``refcount.py``), filled with what the guest
saw there before (copy-on-write from the backing file, a compressed cluster or
zeros) -- per subcluster with extended L2 entries -- before the L2 entry points
to it.

Metadata ordering (what survives a SIGKILL at any point): ``write_metadata``
writes (1) refcount blocks, then (after a sync) refcount table entries naming new
blocks; sync -- data and refcounts are durable; (2) L2 tables; sync; (3) L1
entries naming new L2 tables; (4) only now are the clusters that L2 entries
dropped (discard, write-zeroes, COW of a compressed cluster) given back to the
allocator.  So an L2 entry on disk never points to a cluster without a durable
refcount or without its data, and a cluster is never reused while an on-disk L2
entry still points to it: a crash leaks clusters at worst (``qemu-img check``
reports leaks, not corruption), and ``flush`` is that sequence plus a final
``fdatasync``.  We never use lazy refcounts (the compatible bit allows it), so we
never set the dirty bit.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from virtio.devices.blk.nbd import NbdLayer, is_nbd_uri
from virtio.devices.blk.probe import probe
from virtio.devices.blk.qcow2.cache import (
    DEFAULT_REFCOUNT_CACHE_CLUSTERS,
    TableCache,
    default_l2_cache_bytes,
)
from virtio.devices.blk.qcow2.compress import compressed_extent, decompress
from virtio.devices.blk.qcow2.header import (
    HOST_OFFSET_LIMIT,
    MAX_CLUSTER_BITS,
    OFF_AUTOCLEAR,
    Header,
    Qcow2FormatError,
)
from virtio.devices.blk.qcow2.hostfile import HostFile, RawLayer, ViewCursor, zero_views
from virtio.devices.blk.qcow2.mapping import (
    ALL_ALLOC,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTERS,
    Kind,
    L2Table,
    check_l1_entry,
    check_l2_entry,
    classify,
)
from virtio.devices.blk.qcow2.native import NativeMap, fill_backing, fill_from_table, map_value
from virtio.devices.blk.qcow2.refcount import Refcounts
from virtio.errors import BackendIOError

MAX_CHAIN_DEPTH = 32


class SharedClusterError(BackendIOError):
    """A write reached a cluster shared with an internal snapshot (refcount > 1)."""


def _mask(first: int, last: int) -> int:
    """Bits ``first..last`` (inclusive)."""
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)


class Qcow2Image:
    """A qcow2 image file (``read``, ``write``, ``zero``, ``flush``, ``close``)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        lock: bool = True,
        l2_cache_size: int | None = None,
        refcount_cache_size: int | None = None,
        _seen: tuple[str, ...] = (),
    ) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self.f = HostFile(self.path, read_only=read_only, lock=lock)
        self.backing: Qcow2Image | RawLayer | NbdLayer | None = None
        try:
            self._open(lock, l2_cache_size, refcount_cache_size, _seen)
        except BaseException:
            self.close()
            raise

    def _open(self, lock, l2_cache_size, refcount_cache_size, seen) -> None:
        f = self.f
        head = f.pread(0, 1 << MAX_CLUSTER_BITS)
        hdr = self.header = Header.parse(head, path=self.path, file_size=f.size)
        self.cluster_bits = hdr.cluster_bits
        self.cs = cs = hdr.cluster_size
        self.size = hdr.size
        self.version = hdr.version
        self.extended = hdr.extended_l2
        self.l2_entries = cs // (16 if self.extended else 8)
        self.sub_size = cs // SUBCLUSTERS if self.extended else cs
        if not self.read_only:
            why = None
            if hdr.dirty:
                why = "is dirty (refcounts may be stale after an unclean shutdown)"
            elif hdr.corrupt:
                why = "is marked corrupt"
            elif hdr.nb_snapshots:
                why = "has internal snapshots (writing those is not supported)"
            if why:
                raise Qcow2FormatError(
                    f"{self.path} {why}: run 'qemu-img check -r all {self.path}' "
                    "(or serve it read-only)"
                )
        raw = f.pread(hdr.l1_table_offset, hdr.l1_size * 8)
        if len(raw) != hdr.l1_size * 8:
            raise Qcow2FormatError(f"{self.path}: L1 table runs past the end of the image")
        self.l1 = list(struct.unpack(f">{hdr.l1_size}Q", raw))
        for e in self.l1:
            check_l1_entry(e, cs)
        self._dirty_l1: set[int] = set()
        l1_first = hdr.l1_table_offset >> self.cluster_bits
        self._l1_clusters = set(range(l1_first, l1_first + -(-hdr.l1_size * 8 // cs)))
        self._l2_clusters = {(e & OFFSET_MASK) >> self.cluster_bits for e in self.l1}
        self._l2_clusters.discard(0)
        rc_bytes = refcount_cache_size or DEFAULT_REFCOUNT_CACHE_CLUSTERS * cs
        self.refcounts = Refcounts(
            f,
            cluster_bits=self.cluster_bits,
            refcount_order=hdr.refcount_order,
            table_offset=hdr.refcount_table_offset,
            table_clusters=hdr.refcount_table_clusters,
            file_size=f.size,
            cache_tables=rc_bytes // cs,
            write_header=self._write_header,
        )
        for c in self.refcounts.metadata:
            if c == 0 or c in self._l1_clusters or c in self._l2_clusters:
                raise Qcow2FormatError(
                    f"{self.path}: refcount structures overlap other metadata (cluster {c})"
                )
        entry_size = 16 if self.extended else 8
        l2_bytes = l2_cache_size or default_l2_cache_bytes(self.size, cs, entry_size)
        self.l2_cache = TableCache(
            l2_bytes // cs, cs, self._load_l2, self.f.pwrite, self.write_metadata
        )
        self._pending_free: list[tuple[int, int]] = []
        self.native: NativeMap | None = None
        """The cluster map of the native read path (``native.py``), once enabled."""
        self._native_l1: set[int] = set()
        self.native_backing_size = 0
        """Size of the raw backing file the native data plane reads unallocated
        clusters from (0: it does not; ``enable_native_reads``)."""
        self._compressed: tuple[int, bytes] | None = None
        if hdr.backing_file:
            self.backing = self._open_backing(hdr, lock, (*seen, os.path.realpath(self.path)))
        self.chain_depth = 1 + (self.backing.chain_depth if self.backing else 0)
        if not self.read_only and hdr.autoclear_features:
            # qcow2.rst: a writer must first clear the auto-clear bits it does not know.
            self._write_header(OFF_AUTOCLEAR, bytes(8))
            f.sync()

    def _open_backing(self, hdr: Header, lock: bool, seen: tuple[str, ...]):
        name = hdr.backing_file
        assert name is not None
        if is_nbd_uri(name):  # a remote base image: an NBD export (raw)
            if hdr.backing_format not in (None, "raw"):
                raise Qcow2FormatError(f"{self.path}: NBD backing files must be raw")
            return NbdLayer(name)
        if "://" in name or name.startswith(("json:", "nbd:")):
            raise Qcow2FormatError(f"{self.path}: backing file {name!r} is not supported")
        path = name if os.path.isabs(name) else os.path.join(os.path.dirname(self.path), name)
        real = os.path.realpath(path)
        if real in seen or real == os.path.realpath(self.path):
            raise Qcow2FormatError(f"{self.path}: backing chain loops back to {path}")
        if len(seen) >= MAX_CHAIN_DEPTH:
            raise Qcow2FormatError(f"{self.path}: backing chain deeper than {MAX_CHAIN_DEPTH}")
        fmt = hdr.backing_format
        if fmt is None:
            with open(path, "rb") as fh:
                fmt = probe(fh.read(512)) or "raw"
        if fmt == "qcow2":
            return Qcow2Image(path, read_only=True, lock=lock, _seen=seen)
        if fmt == "raw":
            return RawLayer(path, lock=lock)
        raise Qcow2FormatError(f"{self.path}: backing file format {fmt!r} is not supported")

    # -- metadata I/O --------------------------------------------------------------------
    def _write_header(self, offset: int, data: bytes) -> None:
        self.f.pwrite(offset, data)

    def _check_host(self, offset: int, what: str, *, write: bool = False) -> None:
        """Refuse a host offset (of data or an L2 table) that is misaligned, past
        the limits or, for data, past the image's end when written, or that lands
        on the image's own metadata: header, L1 table, refcount structures, L2
        tables (a hostile or corrupt image must not make us write over those)."""
        if offset % self.cs or offset >= HOST_OFFSET_LIMIT:
            raise Qcow2FormatError(f"{self.path}: invalid {what} offset {offset:#x}")
        c = offset >> self.cluster_bits
        is_l2 = what == "L2 table"
        if (
            c == 0
            or c in self._l1_clusters
            or c in self.refcounts.metadata
            or (not is_l2 and c in self._l2_clusters)
        ):
            raise Qcow2FormatError(
                f"{self.path}: {what} at {offset:#x} overlaps the image's own metadata"
            )
        if write and c >= self.refcounts.end:
            raise Qcow2FormatError(f"{self.path}: {what} at {offset:#x} is past the image's end")

    def _load_l2(self, offset: int) -> bytearray:
        data = self.f.pread(offset, self.cs)
        if len(data) != self.cs:
            raise Qcow2FormatError(f"{self.path}: L2 table at {offset:#x} is past the end")
        return bytearray(data)

    def enable_native_reads(self, *, backing: bool = False) -> NativeMap:
        """The cluster map for the native data plane (created on the first call;
        filled as L2 tables are used).  ``backing``: the data plane also reads
        unallocated clusters from the raw backing file (only if there is exactly
        that).  Call it outside the image's worker thread only before requests
        run, or between them."""
        if self.native is None:
            self.native = NativeMap(self.size, self.cluster_bits)
            if backing and isinstance(self.backing, RawLayer):
                self.native_backing_size = self.backing.size
        return self.native

    def _l2(self, l1i: int, *, create: bool = False) -> L2Table | None:
        entry = self.l1[l1i]
        off = entry & OFFSET_MASK
        if off:
            self._check_host(off, "L2 table")
            if create and not entry & OFLAG_COPIED:
                if self.refcounts.get(off >> self.cluster_bits) != 1:
                    raise SharedClusterError(f"{self.path}: L2 table shared with a snapshot")
                self.l1[l1i] = entry | OFLAG_COPIED
                self._dirty_l1.add(l1i)
            buf = self.l2_cache.get(off)
            if self.native is not None and l1i not in self._native_l1:
                fill_from_table(self.native, self, l1i * self.l2_entries, buf)
                self._native_l1.add(l1i)
            return L2Table(buf, self.extended)
        if self.native is not None and self.native_backing_size and l1i not in self._native_l1:
            fill_backing(self.native, self, l1i * self.l2_entries, self.l2_entries)
            self._native_l1.add(l1i)  # no table: every cluster is the backing file's
        if not create:
            return None
        off = self.refcounts.allocate(1)
        self._l2_clusters.add(off >> self.cluster_bits)
        table = L2Table(self.l2_cache.new(off), self.extended)
        self.l1[l1i] = off | OFLAG_COPIED
        self._dirty_l1.add(l1i)
        self._native_l1.add(l1i)  # all unallocated: nothing (more) to enter
        return table

    def _entry(self, gc: int) -> tuple[int, int]:
        l1i, l2i = divmod(gc, self.l2_entries)
        if l1i >= len(self.l1):
            raise Qcow2FormatError(f"{self.path}: guest cluster {gc} beyond the L1 table")
        table = self._l2(l1i)
        if table is None:
            return 0, 0
        entry, bitmap = table.get(l2i)
        check_l2_entry(entry, bitmap, extended=self.extended, cluster_size=self.cs)
        return entry, bitmap

    def _set_entry(self, gc: int, entry: int, bitmap: int = 0) -> None:
        l1i, l2i = divmod(gc, self.l2_entries)
        table = self._l2(l1i, create=True)
        assert table is not None
        native = self.native
        if native is not None:  # no native read may use the old mapping from now on
            native.clear(gc)
        table.set(l2i, entry, bitmap)
        self.l2_cache.mark_dirty(self.l1[l1i] & OFFSET_MASK)
        if native is not None and l1i in self._native_l1:
            # our writers put the data in place before the entry names it
            value = map_value(
                entry,
                bitmap,
                extended=self.extended,
                version=self.version,
                writable=not self.read_only,
            )
            if value:
                native.set(gc, value)

    def _free_later(self, entry: int) -> None:
        """The cluster(s) ``entry`` pointed to are no longer referenced by it: give
        them back once that is durable (``write_metadata`` step 4)."""
        if entry & OFLAG_COMPRESSED:
            off, length = compressed_extent(
                entry & ~(OFLAG_COMPRESSED | OFLAG_COPIED), self.cluster_bits
            )
            self._pending_free.append((off, length))
        elif entry & OFFSET_MASK:
            self._pending_free.append((entry & OFFSET_MASK, self.cs))

    def write_metadata(self) -> None:
        """Write dirty metadata in crash-safe order (module docstring)."""
        rc = self.refcounts
        if rc.dirty:
            rc.write_back()
        if self.l2_cache.has_dirty or self._dirty_l1:
            self.f.sync()
            if self.l2_cache.has_dirty:
                self.l2_cache.write_all()
            if self._dirty_l1:
                self.f.sync()
                l1_off = self.header.l1_table_offset
                for i in sorted(self._dirty_l1):
                    self.f.pwrite(l1_off + i * 8, struct.pack(">Q", self.l1[i]))
                self._dirty_l1.clear()
        if self._pending_free:
            frees, self._pending_free = self._pending_free, []
            if self.native is not None:  # native reads that looked these up are done
                self.native.synchronize()
            self.f.sync()
            for off, length in frees:
                first = off >> self.cluster_bits
                last = (off + length - 1) >> self.cluster_bits
                for c in range(first, last + 1):
                    rc.update(c, -1)

    def flush(self) -> None:
        if self.read_only:
            return
        self.write_metadata()
        if self.refcounts.dirty:  # the clusters step 4 gave back
            self.refcounts.write_back()
        self.f.sync()

    # -- reads -----------------------------------------------------------------------------
    def read(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` with the guest bytes at ``offset`` (zeros past ``size``)."""
        cur = ViewCursor(views)
        total = sum(len(v) for v in views)
        end = offset + total
        if end > self.size:
            inside = max(0, self.size - offset)
            if inside:
                self._read(offset, cur.take(inside))
            zero_views(cur.take(total - inside))
            return
        self._read(offset, cur.take(total))

    def _read(self, offset: int, views: list[memoryview]) -> None:
        cur = ViewCursor(views)
        end = offset + sum(len(v) for v in views)
        pos = offset
        while pos < end:
            gc, in_c = divmod(pos, self.cs)
            entry, bitmap = self._entry(gc)
            n = min(end - pos, self.cs - in_c)
            if entry & OFLAG_COMPRESSED:
                data = self._decompressed(entry)
                for v in cur.take(n):
                    v[:] = data[in_c : in_c + len(v)]
                    in_c += len(v)
                pos += n
                continue
            # Runs of subclusters of the same kind (one run without extended L2).
            while n:
                sub = in_c // self.sub_size
                kind = classify(entry, bitmap, sub, extended=self.extended, version=self.version)
                run_end = (sub + 1) * self.sub_size
                while run_end < min(self.cs, in_c + n) and kind is classify(
                    entry,
                    bitmap,
                    run_end // self.sub_size,
                    extended=self.extended,
                    version=self.version,
                ):
                    run_end += self.sub_size
                m = min(n, run_end - in_c)
                part = cur.take(m)
                if kind is Kind.DATA:
                    host = entry & OFFSET_MASK
                    self._check_host(host, "data cluster")
                    try:
                        self.f.preadv(host + in_c, part)
                    except BackendIOError:
                        raise Qcow2FormatError(
                            f"{self.path}: data cluster {host:#x} is past the end of the image"
                        ) from None
                elif kind is Kind.UNALLOCATED and self.backing is not None:
                    self.backing.read(pos, part)
                else:
                    zero_views(part)
                pos += m
                in_c += m
                n -= m

    def _decompressed(self, entry: int) -> bytes:
        desc = entry & ~(OFLAG_COMPRESSED | OFLAG_COPIED)
        if self._compressed is not None and self._compressed[0] == desc:
            return self._compressed[1]
        off, length = compressed_extent(desc, self.cluster_bits)
        if off >> self.cluster_bits == 0:
            raise Qcow2FormatError(f"{self.path}: compressed cluster inside the header")
        data = decompress(self.f.pread(off, length), self.cs, self.header.compression_type)
        self._compressed = (desc, data)
        return data

    def _guest_bytes(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        if length:
            self.read(offset, [memoryview(buf)])
        return buf

    # -- writes ----------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.read_only:
            raise BackendIOError(f"{self.path} is open read-only")

    def write(self, offset: int, views: Sequence[memoryview]) -> None:
        self._check_writable()
        cur = ViewCursor(views)
        end = offset + sum(len(v) for v in views)
        if end > self.size:
            raise BackendIOError(f"write beyond the end of {self.path}")
        pos = offset
        while pos < end:
            gc, in_c = divmod(pos, self.cs)
            n = min(end - pos, self.cs - in_c)
            self._write_cluster(gc, in_c, in_c + n, cur.take(n))
            pos += n

    def _owned(self, entry: int) -> bool:
        """Whether the standard cluster ``entry`` names may be written in place
        (refcount exactly one); sets a missing COPIED bit when it may."""
        if entry & OFLAG_COPIED:
            return True
        host = entry & OFFSET_MASK
        if self.refcounts.get(host >> self.cluster_bits) == 1:
            return True
        raise SharedClusterError(f"{self.path}: cluster {host:#x} is shared with a snapshot")

    def _write_cluster(self, gc: int, start: int, end: int, data: list[memoryview]) -> None:
        """Write ``data`` to bytes ``start..end`` of guest cluster ``gc``."""
        entry, bitmap = self._entry(gc)
        base = gc * self.cs
        host = entry & OFFSET_MASK
        compressed = bool(entry & OFLAG_COMPRESSED)
        if not self.extended:
            kind = classify(entry, 0, 0, extended=False, version=self.version)
            if kind is Kind.DATA and self._owned(entry):
                self._check_host(host, "data cluster", write=True)
                self.f.pwritev(host + start, data)
                if not entry & OFLAG_COPIED:
                    self._set_entry(gc, entry | OFLAG_COPIED)
                return
            if kind is Kind.ZERO and host and self._owned(entry):
                # A preallocated zero cluster: zeros around the new data, in place.
                self._check_host(host, "data cluster", write=True)
                pad = [memoryview(bytes(start)), *data, memoryview(bytes(self.cs - end))]
                self.f.pwritev(host, pad)
                self._set_entry(gc, host | OFLAG_COPIED)
                return
            new = self.refcounts.allocate(1)
            self._fill(new, base, 0, start, end, self.cs, data)
            self._set_entry(gc, new | OFLAG_COPIED)
            if compressed or host:
                self._free_later(entry)
            return
        # Extended L2: subclusters s0..s1 become allocated.
        ss = self.sub_size
        s0, s1 = start // ss, (end - 1) // ss
        if compressed:
            new = self.refcounts.allocate(1)
            self._fill(new, base, 0, start, end, self.cs, data)
            self._set_entry(gc, new | OFLAG_COPIED, ALL_ALLOC)
            self._free_later(entry)
            return
        if host and self._owned(entry):
            target = host
            self._check_host(host, "data cluster", write=True)
        else:
            target = self.refcounts.allocate(1)
        lo = s0 * ss if not bitmap >> s0 & 1 else start
        hi = (s1 + 1) * ss if not bitmap >> s1 & 1 else end
        self._fill(target, base, lo, start, end, hi, data)
        mask = _mask(s0, s1)
        bitmap = (bitmap | mask) & ~(mask << SUBCLUSTERS)
        self._set_entry(gc, target | OFLAG_COPIED, bitmap)

    def _fill(
        self, host: int, base: int, lo: int, start: int, end: int, hi: int, data: list[memoryview]
    ) -> None:
        """Write bytes ``lo..hi`` of the cluster at ``host``: ``data`` at
        ``start..end``, around it what the guest sees now at ``base + lo..``."""
        head = self._guest_bytes(base + lo, start - lo)
        tail = self._guest_bytes(base + end, hi - end)
        self.f.pwritev(host + lo, [memoryview(head), *data, memoryview(tail)])

    # -- discard and write-zeroes ------------------------------------------------------------
    def zero(self, offset: int, length: int, *, unmap: bool, discard: bool = False) -> None:
        """Make ``offset..+length`` read as zeros (``discard``: whole (sub)clusters
        only; a partial one is left as it is, which DISCARD allows)."""
        self._check_writable()
        end = offset + length
        if end > self.size:
            raise BackendIOError(f"zeroing beyond the end of {self.path}")
        pos = offset
        while pos < end:
            gc, in_c = divmod(pos, self.cs)
            n = min(end - pos, self.cs - in_c)
            self._zero_cluster(gc, in_c, in_c + n, unmap=unmap, discard=discard)
            pos += n

    def _zero_cluster(self, gc: int, start: int, end: int, *, unmap: bool, discard: bool) -> None:
        ss = self.sub_size
        first = -(-start // ss)
        last = end // ss  # whole (sub)clusters first..last-1
        if first >= last:
            if not discard:
                self._write_zeros(gc, start, end)
            return
        if not discard:
            if start < first * ss:
                self._write_zeros(gc, start, first * ss)
            if last * ss < end:
                self._write_zeros(gc, last * ss, end)
        entry, bitmap = self._entry(gc)
        host = entry & OFFSET_MASK
        backing = self.backing is not None
        if not self.extended:
            kind = classify(entry, 0, 0, extended=False, version=self.version)
            if self.version < 3:
                if backing:
                    if not discard:
                        self._write_zeros(gc, 0, self.cs)
                    return  # v2 over a backing file: discard leaves the data visible
                if kind is Kind.DATA and not unmap and not discard:
                    self._write_zeros(gc, 0, self.cs)
                    return
                if kind is not Kind.UNALLOCATED:
                    self._set_entry(gc, 0)
                    self._free_later(entry)
                return
            keep = not (unmap or discard)
            if kind is Kind.DATA and keep and self._owned(entry):
                new_entry, free = host | OFLAG_COPIED | OFLAG_ZERO, False  # preallocated zeros
            elif kind is Kind.ZERO and host and keep:
                return
            else:
                new_entry, free = (OFLAG_ZERO if backing else 0), bool(kind is not Kind.UNALLOCATED)
            if entry != new_entry:
                self._set_entry(gc, new_entry)
                if free and (host or entry & OFLAG_COMPRESSED):
                    self._free_later(entry)
            return
        # Extended L2.
        whole = first == 0 and last == SUBCLUSTERS
        if entry & OFLAG_COMPRESSED:
            if not whole:  # no subclusters in a compressed cluster: copy it out
                self._write_zeros(gc, first * ss, last * ss)
                return
            self._set_entry(gc, 0, 0 if discard and not backing else ALL_ALLOC << SUBCLUSTERS)
            self._free_later(entry)
            return
        mask = _mask(first, last - 1)
        new_bitmap = bitmap & ~mask
        if backing or not discard:
            new_bitmap |= mask << SUBCLUSTERS
        new_entry = entry
        drop = host and whole and (unmap or discard) and not new_bitmap & ALL_ALLOC
        if drop:
            new_entry = 0
        if (new_entry, new_bitmap) == (entry, bitmap):
            return
        self._set_entry(gc, new_entry, new_bitmap)
        if drop:
            self._free_later(entry)

    def _write_zeros(self, gc: int, start: int, end: int) -> None:
        self._write_cluster(gc, start, end, [memoryview(bytes(end - start))])

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush (writable images) and close the chain, releasing the locks."""
        try:
            if not self.read_only and self.f.fileno >= 0 and hasattr(self, "l2_cache"):
                self.flush()
        finally:
            self.f.close()
            native = getattr(self, "native", None)  # (an open that failed early: none)
            if native is not None:
                native.close()
                self.native = None
            if self.backing is not None:
                self.backing.close()
                self.backing = None
