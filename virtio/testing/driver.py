"""A driver-side virtqueue for tests, device authors and Python guest drivers.

``DriverQueue`` plays the driver's part of virtio 1.4 §2.7.12-2.7.13 (split) and
§2.8.20-2.8.22 (packed) over a ``GuestMemory``: it lays out the rings, offers
buffers (optionally through indirect tables), decides whether to notify the
device and collects used buffers.  It is the counterpart the engine's tests and
fuzzers use, written independently of the device-side native core.

Buffers come from a small allocator over a data area of guest memory.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from virtio.memory import GuestMemory
from virtio.queues.state import QueueState
from virtio.spec.ring import (
    PackedDescFlag,
    PackedEventFlag,
    VringAvailFlag,
    VringDescFlag,
    VringUsedFlag,
    split_ring_sizes,
)

NEXT = int(VringDescFlag.VRING_DESC_F_NEXT)
WRITE = int(VringDescFlag.VRING_DESC_F_WRITE)
INDIRECT = int(VringDescFlag.VRING_DESC_F_INDIRECT)
P_AVAIL = int(PackedDescFlag.VRING_PACKED_DESC_F_AVAIL)
P_USED = int(PackedDescFlag.VRING_PACKED_DESC_F_USED)
EV_ENABLE = int(PackedEventFlag.VRING_PACKED_EVENT_FLAG_ENABLE)
EV_DISABLE = int(PackedEventFlag.VRING_PACKED_EVENT_FLAG_DISABLE)
EV_DESC = int(PackedEventFlag.VRING_PACKED_EVENT_FLAG_DESC)

_DESC = struct.Struct("<QIHH")


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event (§2.7.7, §2.7.10): did the index pass ``event`` in (old, new]?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class QueueFull(Exception):
    """Not enough free descriptors (or data space) to add the buffer now."""


class Allocator:
    """First-fit allocator of guest memory in ``granule``-byte units."""

    def __init__(self, base: int, size: int, granule: int = 64) -> None:
        self.base = base
        self.granule = granule
        self.units = size // granule
        self._used = bytearray(self.units)
        self._hint = 0

    def alloc(self, size: int, align: int = 16) -> int:
        need = max(1, -(-size // self.granule))
        units = self.units
        for start in (self._hint, 0):
            i = start
            while i + need <= units:
                run = self._used.find(1, i, i + need)
                if run < 0:
                    self._used[i : i + need] = b"\x01" * need
                    self._hint = i + need
                    return self.base + i * self.granule
                i = run + 1
        raise QueueFull(f"no {size} bytes of buffer space left")

    def free(self, addr: int, size: int) -> None:
        i = (addr - self.base) // self.granule
        need = max(1, -(-size // self.granule))
        self._used[i : i + need] = bytes(need)


@dataclass
class UsedBuffer:
    """A buffer the device returned: ``id`` (token), bytes ``written`` (used len),
    and the contents of its device-writable part (``data``)."""

    id: int
    written: int
    data: bytes
    readable: list[bytes] = field(default_factory=list)


@dataclass
class _Inflight:
    descs: list[int]
    ndesc: int
    allocs: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    readable: list[bytes]


class DriverQueue:
    """The driver side of one virtqueue.

    ``memory`` must hold ``[base, base + footprint(size))`` for the rings and the
    data area ``data_size`` bytes after them.
    """

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        *,
        base: int = 0,
        packed: bool = False,
        event_idx: bool = False,
        indirect: bool = False,
        data_size: int = 1 << 20,
    ) -> None:
        self.mem = memory
        self.size = size
        self.packed = packed
        self.event_idx = event_idx
        self.indirect = indirect
        if packed:
            self.desc_addr = _align(base, 16)
            self.driver_addr = _align(self.desc_addr + 16 * size, 4)
            self.device_addr = self.driver_addr + 4
            end = self.device_addr + 4
        else:
            d, a, u = split_ring_sizes(size, event_idx)
            self.desc_addr = _align(base, 16)
            self.driver_addr = _align(self.desc_addr + d, 2)
            self.device_addr = _align(self.driver_addr + a, 4)
            end = self.device_addr + u
        self.data_addr = _align(end, 64)
        memory.write(self.desc_addr, bytes(end - self.desc_addr))
        self.alloc = Allocator(self.data_addr, data_size)
        self._inflight: dict[int, _Inflight] = {}
        self.kicks = 0
        if packed:
            self._next_avail = 0
            self._avail_wrap = 1
            self._next_used = 0
            self._used_wrap = 1
            self._free_ids = deque(range(size))
            self._free_count = size
            self._pending_first: list[tuple[int, int]] = []
            self._added = 0
        else:
            self._free = deque(range(size))
            self._avail_idx = 0
            self._pending = 0
            self._last_used = 0

    # -- what the device is told -----------------------------------------------------
    def state(self) -> QueueState:
        """The configuration a transport hands the device (addresses, size, features)."""
        return QueueState(
            size=self.size,
            desc_addr=self.desc_addr,
            driver_addr=self.driver_addr,
            device_addr=self.device_addr,
            packed=self.packed,
            event_idx=self.event_idx,
            indirect=self.indirect,
            signalled_used_valid=True,
        )

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # -- offering buffers ---------------------------------------------------------------
    def add(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        use_indirect: bool = False,
    ) -> int:
        """Offer a buffer made of device-readable byte strings then device-writable
        lengths; returns its token (split: head index; packed: buffer id).  The
        buffer is visible to the device after ``publish()``."""
        elems: list[tuple[int, int, int]] = []  # (addr, len, flags)
        allocs: list[tuple[int, int]] = []
        wr: list[tuple[int, int]] = []
        try:
            for data in readable:
                addr = self.alloc.alloc(len(data))
                allocs.append((addr, len(data)))
                self.mem.write(addr, data)
                elems.append((addr, len(data), 0))
            for length in writable:
                addr = self.alloc.alloc(length)
                allocs.append((addr, length))
                wr.append((addr, length))
                elems.append((addr, length, WRITE))
            if not elems:
                raise ValueError("a buffer needs at least one element")
            if use_indirect:
                if not self.indirect:
                    raise ValueError("VIRTIO_F_INDIRECT_DESC not negotiated")
                table = bytearray()
                for i, (addr, length, flags) in enumerate(elems):
                    if self.packed:
                        table += _DESC.pack(addr, length, 0, flags)
                    else:
                        more = NEXT if i + 1 < len(elems) else 0
                        table += _DESC.pack(addr, length, flags | more, i + 1 if more else 0)
                taddr = self.alloc.alloc(len(table))
                allocs.append((taddr, len(table)))
                self.mem.write(taddr, bytes(table))
                elems = [(taddr, len(table), INDIRECT)]
            return (
                self._add_split(elems, allocs, wr, readable)
                if not self.packed
                else (self._add_packed(elems, allocs, wr, readable))
            )
        except BaseException:
            for a, n in allocs:
                self.alloc.free(a, n)
            raise

    def _add_split(self, elems, allocs, wr, readable) -> int:
        if len(elems) > len(self._free):
            raise QueueFull(f"need {len(elems)} descriptors, {len(self._free)} free")
        descs = [self._free.popleft() for _ in elems]
        for i, (addr, length, flags) in enumerate(elems):
            more = NEXT if i + 1 < len(elems) else 0
            nxt = descs[i + 1] if more else 0
            self.mem.write(
                self.desc_addr + 16 * descs[i], _DESC.pack(addr, length, flags | more, nxt)
            )
        head = descs[0]
        slot = (self._avail_idx + self._pending) % self.size
        self.mem.write_u16(self.driver_addr + 4 + 2 * slot, head)
        self._pending += 1
        self._inflight[head] = _Inflight(descs, len(descs), allocs, wr, list(readable))
        return head

    def _add_packed(self, elems, allocs, wr, readable) -> int:
        if len(elems) > self._free_count:
            raise QueueFull(f"need {len(elems)} descriptors, {self._free_count} free")
        buf_id = self._free_ids.popleft()
        self._free_count -= len(elems)
        first_pos, first_flags = self._next_avail, 0
        for i, (addr, length, flags) in enumerate(elems):
            more = NEXT if i + 1 < len(elems) else 0
            wrapbits = P_AVAIL if self._avail_wrap else P_USED
            f = flags | more | wrapbits
            pos = self._next_avail
            self.mem.write(self.desc_addr + 16 * pos, _DESC.pack(addr, length, buf_id, 0)[:14])
            if i == 0:
                first_flags = f
            else:
                self.mem.write_u16(self.desc_addr + 16 * pos + 14, f)
            self._next_avail += 1
            if self._next_avail == self.size:
                self._next_avail = 0
                self._avail_wrap ^= 1
        self._pending_first.append((first_pos, first_flags))
        self._added += len(elems)
        self._inflight[buf_id] = _Inflight([], len(elems), allocs, wr, list(readable))
        return buf_id

    def publish(self) -> bool:
        """Make the added buffers visible; returns whether the device must be notified
        (available buffer notification suppression, §2.7.10 / §2.8.10)."""
        mem = self.mem
        if self.packed:
            if not self._pending_first:
                return False
            # First descriptors' flags are written last, after a release barrier.
            for pos, flags in self._pending_first:
                mem.store_release_u16(self.desc_addr + 16 * pos + 14, flags)
            self._pending_first.clear()
            mem.fence()
            added = self._added
            self._added = 0
            flags = mem.read_u16(self.device_addr + 2)
            if flags == EV_DISABLE:
                kick = False
            elif flags == EV_DESC and self.event_idx:
                off_wrap = mem.read_u16(self.device_addr)
                off = off_wrap & 0x7FFF
                if (off_wrap >> 15) != self._avail_wrap:
                    off -= self.size
                new = self._next_avail
                kick = (new - off - 1) & 0xFFFF < added & 0xFFFF
            else:
                kick = True
            self.kicks += kick
            return kick
        if not self._pending:
            return False
        old = self._avail_idx
        self._avail_idx = (self._avail_idx + self._pending) & 0xFFFF
        self._pending = 0
        mem.store_release_u16(self.driver_addr + 2, self._avail_idx)
        mem.fence()
        if self.event_idx:
            avail_event = mem.read_u16(self.device_addr + 4 + 8 * self.size)
            kick = need_event(avail_event, self._avail_idx, old)
        else:
            kick = not mem.read_u16(self.device_addr) & int(VringUsedFlag.VRING_USED_F_NO_NOTIFY)
        self.kicks += kick
        return kick

    # -- used buffers -------------------------------------------------------------------
    def get_used(self) -> list[UsedBuffer]:
        """Collect every buffer the device has returned since the last call."""
        out = []
        mem = self.mem
        if self.packed:
            while True:
                pos = self._next_used
                flags = mem.load_acquire_u16(self.desc_addr + 16 * pos + 14)
                avail, used = bool(flags & P_AVAIL), bool(flags & P_USED)
                if not (avail == used == bool(self._used_wrap)):
                    break
                _, length, buf_id, _ = _DESC.unpack(mem.read(self.desc_addr + 16 * pos, 16))
                inf = self._inflight.pop(buf_id)
                self._next_used += inf.ndesc
                if self._next_used >= self.size:
                    self._next_used -= self.size
                    self._used_wrap ^= 1
                self._free_count += inf.ndesc
                self._free_ids.append(buf_id)
                out.append(self._complete(buf_id, length, inf))
            return out
        used_idx = mem.load_acquire_u16(self.device_addr + 2)
        while self._last_used != used_idx:
            slot = self._last_used % self.size
            head, length = struct.unpack("<II", mem.read(self.device_addr + 4 + 8 * slot, 8))
            inf = self._inflight.pop(head)
            self._free.extend(inf.descs)
            self._last_used = (self._last_used + 1) & 0xFFFF
            out.append(self._complete(head, length, inf))
        return out

    def _complete(self, token: int, length: int, inf: _Inflight) -> UsedBuffer:
        data = b"".join(self.mem.read(a, n) for a, n in inf.writable)
        for a, n in inf.allocs:
            self.alloc.free(a, n)
        return UsedBuffer(token, length, data, inf.readable)

    # -- used buffer notification suppression (driver -> device advice) -------------------
    def set_interrupts(self, enabled: bool, *, event: int | None = None) -> None:
        """Enable/disable used buffer notifications; with EVENT_IDX, ``event`` sets
        ``used_event`` (split) or the DESC off_wrap (packed)."""
        mem = self.mem
        if self.packed:
            if not enabled:
                mem.write_u16(self.driver_addr + 2, EV_DISABLE)
            elif event is not None and self.event_idx:
                mem.write_u16(self.driver_addr, event)
                mem.write_u16(self.driver_addr + 2, EV_DESC)
            else:
                mem.write_u16(self.driver_addr + 2, EV_ENABLE)
        elif self.event_idx:
            if event is None:
                event = self._last_used if enabled else (self._last_used - 1) & 0xFFFF
            mem.write_u16(self.driver_addr + 4 + 2 * self.size, event)
        else:
            flag = int(VringAvailFlag.VRING_AVAIL_F_NO_INTERRUPT)
            mem.write_u16(self.driver_addr, 0 if enabled else flag)
        mem.fence()

    @property
    def used_event_index(self) -> int:
        """Where the driver is in the used ring (split: last used idx; packed: pos|wrap<<15)."""
        if self.packed:
            return self._next_used | (self._used_wrap << 15)
        return self._last_used

    # -- raw access for hostile-driver tests ----------------------------------------------
    def write_desc(
        self, index: int, addr: int, length: int, flags: int, next_or_id: int = 0
    ) -> None:
        self.mem.write(
            self.desc_addr + 16 * index,
            _DESC.pack(addr, length, next_or_id, flags)
            if self.packed
            else _DESC.pack(addr, length, flags, next_or_id),
        )

    def write_avail(self, slot: int, head: int) -> None:
        self.mem.write_u16(self.driver_addr + 4 + 2 * (slot % self.size), head)

    def set_avail_idx(self, idx: int) -> None:
        self.mem.store_release_u16(self.driver_addr + 2, idx & 0xFFFF)


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def footprint(size: int, *, packed: bool = False, event_idx: bool = True) -> int:
    """Bytes of guest memory the rings of a queue of ``size`` need (before the data area)."""
    if packed:
        return 16 * size + 8 + 64
    d, a, u = split_ring_sizes(size, event_idx)
    return d + a + u + 64
