"""Inflight I/O tracking in shared memory (vhost-user "Inflight I/O tracking").

A back-end that completes requests out of order cannot tell, after a crash, which
available-ring entries it had popped but not used: the avail ring says what was
offered, the used ring what was returned, but not what was in between.  So the
back-end records every popped chain in a memfd it hands to the front-end
(``GET_INFLIGHT_FD``); the front-end keeps it and gives it back to the next
back-end process (``SET_INFLIGHT_FD``), which resubmits what was in flight.

Layout (ours to choose, since only back-ends read it; we follow the spec's split
and packed layouts), defined once as C structs in ``virtio/native/inflight.h``.
The buffer is ``num_queues`` regions of equal size (``queue_region_size``: room for
either layout; an area handed back to us has ``mmap_size / num_queues``).  Split
rings are marked by the same C functions (``vu_inflight_pop`` / ``vu_inflight_used``)
from Python and from the native data plane; split regions look like::

    QueueRegionSplit {                       offset
        u64 features;        // 0            0
        u16 version;         // 1, 0 = uninitialised        8
        u16 desc_num;        // the queue size              10
        u16 last_batch_head;                                12
        u16 used_idx;        // used idx when last updated  14
        DescStateSplit desc[desc_num];                      16
    }
    DescStateSplit { u8 inflight; u8 padding[5]; u16 next; u64 counter; }   16 bytes

Packed rings (``PackedInflightQueue``): the used elements overwrite ring slots, so
the region keeps a copy of every ring descriptor of each chain in flight
(``QueueRegionPacked`` / ``DescStatePacked``), marked by the queue core itself
while it pops and publishes (``inflight.c``, under the queue's lock, so Python and
a data-plane thread share it safely).  Recovery follows the spec's procedure:
a used batch interrupted by the crash is committed if the ring slot at
``old_used_idx`` no longer holds the available descriptor, else rolled back; the
chains still in flight are resubmitted in counter order from their recorded
descriptors, and the next available position is ``used_idx`` plus their descriptor
count (the ring shows it nowhere, and QEMU's SET_VRING_BASE after a crash is stale).

Crash consistency.  ``Virtqueue`` calls the tracker right *after* it has popped
(``on_pop``) or published used entries (``on_used``), so a crash can fall between
the ring update and the region update:

* popped, not yet marked: the chain is not counted in flight, so the restarted
  back-end's ``last_avail_idx = used idx + in-flight count`` points at it again and
  it is popped from the avail ring a second time (correct: it was never started);
* used, not yet unmarked: ``used_idx`` in the region lags the ring's used idx.  The
  spec walks the ``last_batch_head`` list to clear that batch; we read the heads of
  the lagging entries straight from the used ring instead (the driver never writes
  it), which also covers a crash before the list was written.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from virtio.native import ffi, lib
from virtio.queues.chain import DescriptorChain
from virtio.spec.features import TransportFeature as TF

from .errors import InvalidMessage, request_section

INFLIGHT_VERSION = 1
QUEUE_HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC_STATE = struct.Struct("<B5xHQ")  # inflight, padding, next, counter
ALIGNMENT = 64
_HDR = "struct vu_inflight_split_hdr"
_DESC = "struct vu_inflight_desc_split"
_PHDR = "struct vu_inflight_packed_hdr"
_PDESC = "struct vu_inflight_desc_packed"
# The struct formats above read what inflight.h defines: they must agree.
assert QUEUE_HEADER.size == ffi.sizeof(_HDR) and DESC_STATE.size == ffi.sizeof(_DESC)
_USED_IDX = ffi.offsetof(_HDR, "used_idx")
_COUNTER = ffi.offsetof(_DESC, "counter")
PACKED_LAYOUT = TF.VIRTIO_F_RING_PACKED.mask
"""``features`` of a packed region (ours: tells the two layouts apart)."""
_NONE = 0xFFFF
_AVAIL, _USED = 1 << 7, 1 << 15  # VRING_PACKED_DESC_F_AVAIL / _USED (§2.8.1)


def split_region_size(queue_size: int) -> int:
    """Bytes of a split region (header + one DescStateSplit per descriptor), 64-aligned."""
    raw = QUEUE_HEADER.size + DESC_STATE.size * queue_size
    return (raw + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def packed_region_size(queue_size: int) -> int:
    """Bytes of a packed region (header + one DescStatePacked per descriptor), 64-aligned."""
    raw = ffi.sizeof(_PHDR) + ffi.sizeof(_PDESC) * queue_size
    return (raw + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region in an area we create: room for either layout (the
    ring layout is not known yet when QEMU asks for the area)."""
    return max(split_region_size(queue_size), packed_region_size(queue_size))


@dataclass
class InflightStatistics:
    in_flight: int
    counter: int


class SplitInflightQueue:
    """One queue's region; an ``InflightTracker`` for ``Virtqueue.inflight``.

    ``region`` is a writable memoryview of ``queue_region_size(desc_num)`` bytes.
    """

    def __init__(self, region: memoryview, desc_num: int) -> None:
        self.region = region
        self.desc_num = desc_num
        self.counter = 0
        self._c = ffi.from_buffer("uint8_t[]", region, require_writable=True)
        self._cnt = ffi.new("uint64_t *")

    # -- header fields ---------------------------------------------------------------
    def _header(self) -> tuple[int, int, int, int, int]:
        return QUEUE_HEADER.unpack_from(self.region, 0)

    @property
    def version(self) -> int:
        """The region's version; 0 (fresh) also for a region in the packed layout."""
        features, version, *_ = self._header()
        return 0 if features else version

    @property
    def used_idx(self) -> int:
        return self._header()[4]

    def _set_u16(self, offset: int, value: int) -> None:
        struct.pack_into("<H", self.region, offset, value & 0xFFFF)

    def _desc_off(self, head: int) -> int:
        return QUEUE_HEADER.size + DESC_STATE.size * head

    def is_inflight(self, head: int) -> bool:
        return self.region[self._desc_off(head)] == 1

    def in_flight(self) -> list[int]:
        """Heads marked in flight, in the order they were popped (their counters)."""
        heads = []
        for head in range(self.desc_num):
            off = self._desc_off(head)
            if self.region[off] == 1:
                heads.append((struct.unpack_from("<Q", self.region, off + _COUNTER)[0], head))
        return [h for _, h in sorted(heads)]

    # -- lifecycle ---------------------------------------------------------------------
    def initialize(self, used_idx: int) -> None:
        """Start a fresh region (version 0 = never used)."""
        self.region[:] = bytes(len(self.region))
        QUEUE_HEADER.pack_into(self.region, 0, 0, INFLIGHT_VERSION, self.desc_num, 0, used_idx)
        self.counter = 0

    def recover(self, ring_used_idx: int, used_head_at: Callable[[int], int]) -> list[int]:
        """After a reconnect: fix the last batch, return the heads to resubmit (in order).

        ``used_head_at(i)`` returns the head id in used ring entry ``i`` (free-running
        index).  Raises ``InvalidMessage`` for a region we cannot trust.
        """
        features, version, desc_num, _, used_idx = self._header()
        if version != INFLIGHT_VERSION or desc_num != self.desc_num or features:
            raise InvalidMessage(
                f"inflight region version {version} / desc_num {desc_num} / features "
                f"{features:#x}, expected {INFLIGHT_VERSION} / {self.desc_num} / 0 (split)",
                section=request_section("SET_INFLIGHT_FD"),
            )
        lag = (ring_used_idx - used_idx) & 0xFFFF
        if lag > self.desc_num:
            raise InvalidMessage(
                f"inflight used_idx {used_idx} is {lag} entries behind the used ring's "
                f"{ring_used_idx}: more than the queue size",
                section=request_section("SET_INFLIGHT_FD"),
            )
        for i in range(lag):
            head = used_head_at(used_idx + i)
            if 0 <= head < self.desc_num:
                self.region[self._desc_off(head)] = 0
        self._set_u16(_USED_IDX, ring_used_idx)
        heads = self.in_flight()
        self.counter = 0
        for head in heads:
            counter = struct.unpack_from("<Q", self.region, self._desc_off(head) + _COUNTER)[0]
            self.counter = max(self.counter, counter + 1)
        return heads

    # -- InflightTracker -----------------------------------------------------------------
    def on_pop(self, chains: Sequence[DescriptorChain]) -> None:
        heads = [chain.head for chain in chains]
        self._cnt[0] = self.counter
        lib.vu_inflight_pop(self._c, self.desc_num, heads, len(heads), self._cnt)
        self.counter = int(self._cnt[0])

    def on_used(self, chains: Sequence[DescriptorChain], used_idx: int) -> None:
        heads = [chain.head for chain in chains]
        lib.vu_inflight_used(self._c, self.desc_num, heads, len(heads), used_idx & 0xFFFF)

    def statistics(self) -> InflightStatistics:
        return InflightStatistics(len(self.in_flight()), self.counter)


@dataclass
class PackedRecovery:
    """What a packed region says after a restart: the device's next used position,
    the next available one, and the chains to resubmit (buffer id, their recorded
    16-byte ring descriptors), oldest first."""

    used_idx: int
    used_wrap: bool
    next_avail: int
    avail_wrap: bool
    chains: list[tuple[int, bytes]]


class PackedInflightQueue:
    """One queue's region in the packed layout (``QueueRegionPacked``).

    ``attach(queue)`` makes the queue core mark every pop and used batch in it;
    ``recover`` reads it after a restart.  ``region`` is a writable memoryview of at
    least ``packed_region_size(desc_num)`` bytes.
    """

    def __init__(self, region: memoryview, desc_num: int) -> None:
        self.region = region
        self.desc_num = desc_num
        self._c = ffi.from_buffer("uint8_t[]", region, require_writable=True)
        self.hdr = ffi.cast(f"{_PHDR} *", self._c)
        self.descs = ffi.cast(f"{_PDESC} *", self._c + ffi.sizeof(_PHDR))
        self._head_of = ffi.new("uint16_t[]", [_NONE] * desc_num)
        self.ctx = ffi.new("struct vu_inflight_packed *")
        self.ctx.region = self._c
        self.ctx.desc_num = desc_num
        self.ctx.head_of = self._head_of

    @property
    def version(self) -> int:
        """The region's version; 0 (fresh) also for a region in the split layout."""
        return int(self.hdr.version) if self.hdr.features == PACKED_LAYOUT else 0

    @property
    def untracked(self) -> int:
        """Chains popped but not recorded (buffer id >= queue size, or more descriptors
        outstanding than the ring has: a misbehaving driver)."""
        return int(self.ctx.untracked)

    def initialize(self, used_idx: int, used_wrap: bool) -> None:
        """A fresh region: nothing in flight, the device's next used position."""
        lib.vu_inflight_packed_init(self._c, self.desc_num, used_idx, int(used_wrap))
        for i in range(self.desc_num):
            self._head_of[i] = _NONE
        self.ctx.counter = 0

    def attach(self, queue) -> None:
        """Mark ``queue``'s pops and used batches here (``queue`` is a packed
        ``Virtqueue``; its read-ahead is turned off: every pop is a real one)."""
        queue._ahead = False
        lib.vq_set_inflight(queue.native, self.ctx)

    @staticmethod
    def detach(queue) -> None:
        lib.vq_set_inflight(queue.native, ffi.NULL)

    def recover(self, slot_flags: Callable[[int], int]) -> PackedRecovery:
        """After a restart: finish or undo the interrupted batch, rebuild the free
        list, return what to resubmit.  ``slot_flags(i)`` reads the flags of ring
        descriptor ``i``.  Raises ``InvalidMessage`` for a region we cannot trust."""
        h, n = self.hdr, self.desc_num
        section = request_section("SET_INFLIGHT_FD")

        def bad(message: str) -> InvalidMessage:
            return InvalidMessage(f"packed inflight region: {message}", section=section)

        if h.version != INFLIGHT_VERSION or h.desc_num != n or h.features != PACKED_LAYOUT:
            raise bad(f"version {h.version} / desc_num {h.desc_num}, expected 1 / {n}")
        if h.old_used_idx >= n or h.used_idx >= n:
            raise bad(f"used index {h.used_idx} / {h.old_used_idx} outside the ring of {n}")
        if (h.used_idx, h.used_wrap_counter) != (h.old_used_idx, h.old_used_wrap_counter):
            # A batch was being published.  Its first element's flags are written
            # last: if the slot still holds the driver's available descriptor (for the
            # old wrap counter), the ring never showed the batch: roll back.
            wrap = bool(h.old_used_wrap_counter)
            avail_flags = _AVAIL if wrap else _USED
            if slot_flags(h.old_used_idx) & (_AVAIL | _USED) != avail_flags:
                h.old_free_head = h.free_head
                h.old_used_idx = h.used_idx
                h.old_used_wrap_counter = h.used_wrap_counter
        used_idx, used_wrap = int(h.old_used_idx), bool(h.old_used_wrap_counter)
        h.free_head, h.used_idx, h.used_wrap_counter = h.old_free_head, used_idx, used_wrap
        owner = [-1] * n  # entry -> head entry of its chain, -2: free
        entry, steps = int(h.free_head), 0
        while entry < n and owner[entry] == -1 and steps < n:
            owner[entry] = -2
            self.descs[entry].inflight = 0  # a pop cut short, or a chain just used
            entry = int(self.descs[entry].next)
            steps += 1
        chains: list[tuple[int, int, int, bytes]] = []  # counter, id, head entry, descs
        seen_ids: set[int] = set()
        for head in range(n):
            e = self.descs[head]
            if owner[head] != -1 or e.inflight != 1:
                continue
            num = int(e.num)
            if not 1 <= num <= n:
                raise bad(f"entry {head}: chain of {num} descriptors")
            raw = bytearray()
            cur = head
            for i in range(num):
                if not 0 <= cur < n or owner[cur] != -1:
                    raise bad(f"entry {head}: chain runs into entry {cur} (free or shared)")
                owner[cur] = head
                d = self.descs[cur]
                raw += struct.pack("<QIHH", d.addr, d.len, d.id, d.flags)
                last = cur
                if i + 1 < num:
                    cur = int(d.next)
            if e.last != last:
                raise bad(f"entry {head}: last entry {e.last}, the chain ends at {last}")
            buffer_id = int(self.descs[last].id)
            if buffer_id >= n or buffer_id in seen_ids:
                raise bad(f"entry {head}: buffer id {buffer_id} out of range or repeated")
            seen_ids.add(buffer_id)
            chains.append((int(e.counter), buffer_id, head, bytes(raw)))
        chains.sort()
        # Everything not in flight is free again (entries a crash left unlinked too).
        free = [i for i in range(n) if owner[i] < 0]
        for a, b in zip(free, [*free[1:], n], strict=True):
            self.descs[a].next = b
            self.descs[a].inflight = 0
        h.free_head = h.old_free_head = free[0] if free else n
        for i in range(n):
            self._head_of[i] = _NONE
        for _, buffer_id, head, _ in chains:
            self._head_of[buffer_id] = head
        self.ctx.counter = chains[-1][0] + 1 if chains else 0
        total = sum(len(raw) // 16 for *_, raw in chains)
        avail, avail_wrap = used_idx + total, used_wrap
        while avail >= n:
            avail -= n
            avail_wrap = not avail_wrap
        return PackedRecovery(
            used_idx, used_wrap, avail, avail_wrap, [(bid, raw) for _, bid, _, raw in chains]
        )

    def in_flight(self) -> list[int]:
        """Buffer ids marked in flight (statistics, tests)."""
        return [i for i in range(self.desc_num) if self._head_of[i] != _NONE]

    def release(self) -> None:
        ffi.release(self._c)
        self.region.release()


class InflightArea:
    """The whole shared buffer: ``num_queues`` regions for queues of ``queue_size``."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, qsize: int):
        self.fd = fd
        self.num_queues = num_queues
        self.queue_size = qsize
        section = request_section("SET_INFLIGHT_FD")
        if num_queues == 0 or qsize == 0:
            raise InvalidMessage(
                f"inflight area for {num_queues} queues of {qsize}", section=section
            )
        # Regions fill the area evenly (ours: queue_region_size; an older back-end's
        # split-only areas are smaller, and still readable).
        self.region_size = mmap_size // num_queues // ALIGNMENT * ALIGNMENT
        need = split_region_size(qsize) * num_queues
        if mmap_size < need:
            raise InvalidMessage(
                f"inflight area of {mmap_size} bytes, {num_queues} queues of {qsize} need {need}",
                section=section,
            )
        if mmap_offset % mmap.PAGESIZE:
            raise InvalidMessage(
                f"inflight mmap offset {mmap_offset:#x} not page aligned", section=section
            )
        try:
            file_size = os.fstat(fd).st_size
        except OSError as exc:
            raise InvalidMessage(f"inflight fd unusable: {exc}", section=section) from exc
        if mmap_offset + mmap_size > file_size:
            raise InvalidMessage(
                f"inflight area [{mmap_offset:#x}, +{mmap_size:#x}) beyond the fd's "
                f"{file_size:#x} bytes",
                section=section,
            )
        try:
            self._map = mmap.mmap(
                fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset
            )
        except (OSError, ValueError) as exc:
            raise InvalidMessage(f"inflight area cannot be mapped: {exc}", section=section) from exc
        self._view = memoryview(self._map)
        self._queues: dict[int, SplitInflightQueue] = {}
        self._packed: dict[int, PackedInflightQueue] = {}

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightArea:
        """A fresh zeroed memfd area (GET_INFLIGHT_FD)."""
        size = queue_region_size(queue_size) * num_queues
        fd = os.memfd_create("vhost-user-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, 0, num_queues, queue_size)
        except BaseException:
            os.close(fd)
            raise

    @property
    def mmap_size(self) -> int:
        return len(self._view)

    def queue(self, index: int) -> SplitInflightQueue:
        if not 0 <= index < self.num_queues:
            raise IndexError(index)
        q = self._queues.get(index)
        if q is None:
            start = index * self.region_size
            q = SplitInflightQueue(self._view[start : start + self.region_size], self.queue_size)
            self._queues[index] = q
        return q

    def packed_queue(self, index: int) -> PackedInflightQueue | None:
        """Queue ``index``'s region in the packed layout (None: the area is too small,
        an older back-end's split-only area)."""
        if not 0 <= index < self.num_queues:
            raise IndexError(index)
        if self.region_size < packed_region_size(self.queue_size):
            return None
        q = self._packed.get(index)
        if q is None:
            start = index * self.region_size
            q = PackedInflightQueue(self._view[start : start + self.region_size], self.queue_size)
            self._packed[index] = q
        return q

    def close(self) -> None:
        """Unmap and close the fd (the front-end keeps its own copy)."""
        for q in self._queues.values():
            ffi.release(q._c)
            q.region.release()
        self._queues.clear()
        for p in self._packed.values():
            p.release()
        self._packed.clear()
        self._view.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
