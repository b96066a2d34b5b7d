"""Inflight I/O tracking in shared memory (vhost-user "Inflight I/O tracking").

A back-end that completes requests out of order cannot tell, after a crash, which
available-ring entries it had popped but not used: the avail ring says what was
offered, the used ring what was returned, but not what was in between.  So the
back-end records every popped chain in a memfd it hands to the front-end
(``GET_INFLIGHT_FD``); the front-end keeps it and gives it back to the next
back-end process (``SET_INFLIGHT_FD``), which resubmits what was in flight.

Layout (ours to choose, since only back-ends read it; we follow the spec's split
layout), defined once as C structs in ``virtio/native/dataplane.h`` and marked by
the same C functions (``vu_inflight_pop`` / ``vu_inflight_used``) from Python and
from the native data plane: the buffer is ``num_queues`` regions of
``queue_region_size(queue_size)`` bytes, each::

    QueueRegionSplit {                       offset
        u64 features;        // 0            0
        u16 version;         // 1, 0 = uninitialised        8
        u16 desc_num;        // the queue size              10
        u16 last_batch_head;                                12
        u16 used_idx;        // used idx when last updated  14
        DescStateSplit desc[desc_num];                      16
    }
    DescStateSplit { u8 inflight; u8 padding[5]; u16 next; u64 counter; }   16 bytes

Only split rings are tracked (packed rings are not: see ``SplitInflightQueue``).

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

from .errors import InvalidMessage, request_section

INFLIGHT_VERSION = 1
QUEUE_HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC_STATE = struct.Struct("<B5xHQ")  # inflight, padding, next, counter
ALIGNMENT = 64
_HDR = "struct vu_inflight_split_hdr"
_DESC = "struct vu_inflight_desc_split"
# The struct formats above read what dataplane.h defines: they must agree.
assert QUEUE_HEADER.size == ffi.sizeof(_HDR) and DESC_STATE.size == ffi.sizeof(_DESC)
_USED_IDX = ffi.offsetof(_HDR, "used_idx")
_COUNTER = ffi.offsetof(_DESC, "counter")


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region (header + one DescStateSplit per descriptor), 64-aligned."""
    raw = QUEUE_HEADER.size + DESC_STATE.size * queue_size
    return (raw + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


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
        return self._header()[1]

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
        self.region[: queue_region_size(self.desc_num)] = bytes(queue_region_size(self.desc_num))
        QUEUE_HEADER.pack_into(self.region, 0, 0, INFLIGHT_VERSION, self.desc_num, 0, used_idx)
        self.counter = 0

    def recover(self, ring_used_idx: int, used_head_at: Callable[[int], int]) -> list[int]:
        """After a reconnect: fix the last batch, return the heads to resubmit (in order).

        ``used_head_at(i)`` returns the head id in used ring entry ``i`` (free-running
        index).  Raises ``InvalidMessage`` for a region we cannot trust.
        """
        _, version, desc_num, _, used_idx = self._header()
        if version != INFLIGHT_VERSION or desc_num != self.desc_num:
            raise InvalidMessage(
                f"inflight region version {version} / desc_num {desc_num}, expected "
                f"{INFLIGHT_VERSION} / {self.desc_num}",
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


class InflightArea:
    """The whole shared buffer: ``num_queues`` regions for queues of ``queue_size``."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, qsize: int):
        self.fd = fd
        self.num_queues = num_queues
        self.queue_size = qsize
        self.region_size = queue_region_size(qsize)
        need = self.region_size * num_queues
        section = request_section("SET_INFLIGHT_FD")
        if num_queues == 0 or qsize == 0:
            raise InvalidMessage(
                f"inflight area for {num_queues} queues of {qsize}", section=section
            )
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

    def close(self) -> None:
        """Unmap and close the fd (the front-end keeps its own copy)."""
        for q in self._queues.values():
            ffi.release(q._c)
            q.region.release()
        self._queues.clear()
        self._view.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
