"""The device side of a virtqueue: split (virtio 1.4 §2.7) and packed (§2.8) rings.

One ``Virtqueue`` class serves both layouts; the ring walking, validation and
notification-suppression logic is in the native core (``virtio.native``), so
popping and completing chains costs a few hundred nanoseconds.  Usage follows
the spec's device loop (§2.7.10, vm-virtio's ``Queue`` example)::

    while True:
        q.disable_notification()
        while (chain := q.pop()) is not None:
            q.add_used(chain, handle(chain))
        if q.needs_notification():
            interrupt()
        if not q.enable_notification():   # re-check: buffers may have raced in
            break

A driver error (a malformed chain, an impossible index) raises a ``DriverError``
subclass naming the spec clause; the queue is then *broken*: later calls raise
``QueueBrokenError`` until the device is reset (status DEVICE_NEEDS_RESET, §2.1).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from virtio.errors import (
    DescriptorChainError,
    DeviceUsageError,
    DriverError,
    GuestMemoryError,
    InvalidAvailIdx,
    QueueBrokenError,
    QueueConfigError,
)
from virtio.memory import GuestMemory
from virtio.native import ffi, lib
from virtio.queues.chain import SEG_RECORD, DescriptorChain
from virtio.queues.state import QueueState
from virtio.spec import sections as sec
from virtio.spec._base import Section
from virtio.spec.ring import (
    VRING_AVAIL_ALIGN,
    VRING_DESC_ALIGN,
    VRING_PACKED_DESC_ALIGN,
    VRING_PACKED_DESC_EVENT_SIZE,
    VRING_PACKED_EVENT_ALIGN,
    VRING_USED_ALIGN,
    split_ring_sizes,
)

_CHAIN = struct.Struct("<HHIIIII")  # struct vq_chain
_SEG = SEG_RECORD  # struct vq_seg
assert _CHAIN.size == ffi.sizeof("struct vq_chain") and _SEG.size == ffi.sizeof("struct vq_seg")
_unpack_chain = _CHAIN.unpack_from
_CHAIN_SIZE = _CHAIN.size
_SEG_SIZE = _SEG.size
_new = object.__new__
# Native entry points of the per-chain path, looked up once.
_vq_pop_batch = lib.vq_pop_batch
_vq_add_used1 = lib.vq_add_used1
_VQ_E_BROKEN = lib.VQ_E_BROKEN


# Native error code -> (exception class, split-ring section, packed-ring section,
# message template).  The template sees the native error's detail words a, b, c.
# Normative clauses where the spec has one; otherwise the informative section that
# describes the structure (the error then says no normative clause names the fault).
_ERRORS: dict[int, tuple[type[DriverError], Section, Section, str]] = {
    lib.VQ_E_HEAD_RANGE: (
        DescriptorChainError,
        sec.S_2_7_6,
        sec.S_2_8_13,
        "available ring names head descriptor {a}, outside the queue of size {b}",
    ),
    lib.VQ_E_NEXT_RANGE: (
        DescriptorChainError,
        sec.S_2_7_5,
        sec.S_2_8_7,
        "descriptor next index {a} outside the table of {b} descriptors",
    ),
    lib.VQ_E_LOOP: (
        DescriptorChainError,
        sec.S_2_7_5_2,  # "loops in the descriptor chain are forbidden"
        sec.S_2_8_17,  # "longer than the Queue Size ... loops ... are forbidden"
        "descriptor chain from {a} longer than the queue size {b}: a loop",
    ),
    lib.VQ_E_INDIRECT_LOOP: (
        DescriptorChainError,
        sec.S_2_7_5_2,
        sec.S_2_8_17,  # packed tables are sequential: cannot happen
        "indirect table at {a:#x} chains more than its {b} descriptors: a loop",
    ),
    lib.VQ_E_INDIRECT_NESTED: (
        DescriptorChainError,
        sec.S_2_7_5_3_1,
        sec.S_2_8_19,
        "VIRTQ_DESC_F_INDIRECT set within an indirect table (entry {a})",
    ),
    lib.VQ_E_INDIRECT_NEXT: (
        DescriptorChainError,
        sec.S_2_7_5_3_1,
        sec.S_2_8_19,
        "descriptor {a} combines VIRTQ_DESC_F_INDIRECT with VIRTQ_DESC_F_NEXT chaining",
    ),
    lib.VQ_E_INDIRECT_LEN: (
        DescriptorChainError,
        sec.S_2_7_5_3,
        sec.S_2_8_7,
        "indirect table at {a:#x} has length {b}: not a non-zero multiple of 16"
        " (at most 65536 entries)",
    ),
    lib.VQ_E_INDIRECT_NOTNEG: (
        DescriptorChainError,
        sec.S_2_7_5_3_1,
        sec.S_2_8_19,
        "VIRTQ_DESC_F_INDIRECT used but VIRTIO_F_INDIRECT_DESC was not negotiated",
    ),
    lib.VQ_E_MEMORY: (
        DescriptorChainError,
        sec.S_2_7_5,
        sec.S_2_8_4,
        "buffer [{a:#x}, +{b:#x}) is not inside guest memory",
    ),
    lib.VQ_E_INDIRECT_MEMORY: (
        DescriptorChainError,
        sec.S_2_7_5_3,
        sec.S_2_8_7,
        "indirect table [{a:#x}, +{b:#x}) is not inside guest memory",
    ),
    lib.VQ_E_ORDER: (
        DescriptorChainError,
        sec.S_2_7_4_2,
        sec.S_2_8_17,
        "device-readable descriptor [{a:#x}, +{b:#x}) after a device-writable one",
    ),
    lib.VQ_E_TOO_BIG: (
        DescriptorChainError,
        sec.S_2_7_5_2,
        sec.S_2_8_17,  # "longer than allowed by the device": used len is 32 bits
        "descriptor chain longer than 2^32 bytes in total ({a} bytes)",
    ),
    lib.VQ_E_PACKED_AVAIL: (
        DescriptorChainError,
        sec.S_2_8_17,
        sec.S_2_8_17,  # first descriptor available before the rest of the list
        "packed chain continues into descriptor {a} that is not available",
    ),
}


def _raise_native(q, code: int) -> None:
    if code == lib.VQ_E_AVAIL_IDX:
        a, b = int(q.err_a), int(q.err_b)
        raise InvalidAvailIdx(int(q.size), (a - b) & 0xFFFF, a, b)
    try:
        cls, split_section, packed_section, template = _ERRORS[code]
    except KeyError:
        raise DeviceUsageError(f"native virtqueue core returned {code}") from None
    section = packed_section if q.packed else split_section
    message = template.format(a=int(q.err_a), b=int(q.err_b), c=int(q.err_c))
    raise cls(message, section=section)


class InflightTracker(Protocol):
    """Observer of chains entering and leaving the device (vhost-user inflight
    tracking: a restarted backend resubmits what was popped but never used)."""

    def on_pop(self, chains: Sequence[DescriptorChain]) -> None: ...

    def on_used(self, chains: Sequence[DescriptorChain], used_idx: int) -> None: ...


@dataclass(frozen=True)
class QueueStatistics:
    popped: int
    used: int
    broken: bool


class Virtqueue:
    """A running virtqueue over ``memory``.  Build it with ``QueueConfig.activate``
    or ``Virtqueue.restore``."""

    BATCH = 64

    def __init__(self, memory: GuestMemory, state: QueueState, name: str = "") -> None:
        state.validate()
        self.memory = memory
        self.name = name
        self._error: DriverError | None = None
        q = self._q = ffi.new("struct vq *")
        q.mem = memory.c_mem
        q.size = state.size
        q.packed = state.packed
        q.event_idx = state.event_idx
        q.indirect = state.indirect
        q.desc_gpa, q.driver_gpa, q.device_gpa = (
            state.desc_addr,
            state.driver_addr,
            state.device_addr,
        )
        if state.packed:
            desc_size = 16 * state.size
            driver_size = device_size = VRING_PACKED_DESC_EVENT_SIZE
            aligns = (VRING_PACKED_DESC_ALIGN, VRING_PACKED_EVENT_ALIGN, VRING_PACKED_EVENT_ALIGN)
            section = sec.S_2_8_11  # alignment table of §2.8.10.1
        else:
            desc_size, driver_size, device_size = split_ring_sizes(state.size, state.event_idx)
            aligns = (VRING_DESC_ALIGN, VRING_AVAIL_ALIGN, VRING_USED_ALIGN)
            section = sec.S_2_7_1
        ptrs = []
        for part, addr, size, align in zip(
            ("descriptor area", "driver area", "device area"),
            (state.desc_addr, state.driver_addr, state.device_addr),
            (desc_size, driver_size, device_size),
            aligns,
            strict=True,
        ):
            if addr % align:
                raise QueueConfigError(
                    f"{part} at {addr:#x} is not {align}-byte aligned", section=section
                )
            p = lib.vm_translate(memory.c_mem, addr, size, ffi.NULL)
            if p == ffi.NULL:
                raise QueueConfigError(
                    f"{part} [{addr:#x}, +{size:#x}) is not inside one guest memory region",
                    section=sec.S_2_6,
                )
            ptrs.append(p)
        q.desc, q.driver, q.device = ptrs
        q.last_avail_idx = state.last_avail_idx
        q.used_idx = state.used_idx
        q.next_avail = state.next_avail
        q.next_used = state.next_used
        q.avail_wrap = state.avail_wrap
        q.used_wrap = state.used_wrap
        q.signalled_used = state.signalled_used
        q.signalled_used_valid = state.signalled_used_valid
        q.notify_enabled = 1
        self._cap_chains = self.BATCH
        self._cap_segs = 1024
        self._chains = ffi.new("struct vq_chain[]", self._cap_chains)
        self._chain_buf = ffi.buffer(self._chains)
        self._alloc_segs(self._cap_segs)
        self._ids = ffi.new("uint16_t[]", self._cap_chains)
        self._lens = ffi.new("uint32_t[]", self._cap_chains)
        self._ndescs = ffi.new("uint16_t[]", self._cap_chains)
        self._raw_count = 0
        self.inflight: InflightTracker | None = None
        # Read-ahead of the per-chain path (``pop``): chains validated by one native
        # batch call but not handed out yet, as copies of their native records.
        # Anything that observes or moves the ring position first gives them back
        # (``_unpop``); a queue shared with a data-plane thread reads no ahead.
        self._ahead = True
        self._pf_chains = b""
        self._pf_segs = b""
        self._pf_next = 0
        self._pf_count = 0
        self._pf_pos = (0, 0)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def restore(cls, memory: GuestMemory, state: QueueState, name: str = "") -> Virtqueue:
        """Rebuild a queue from saved (untrusted) state."""
        return cls(memory, state, name)

    def state(self) -> QueueState:
        self._unpop()
        q = self._q
        return QueueState(
            size=q.size,
            desc_addr=q.desc_gpa,
            driver_addr=q.driver_gpa,
            device_addr=q.device_gpa,
            packed=bool(q.packed),
            event_idx=bool(q.event_idx),
            indirect=bool(q.indirect),
            last_avail_idx=q.last_avail_idx,
            used_idx=q.used_idx,
            next_avail=q.next_avail,
            next_used=q.next_used,
            avail_wrap=bool(q.avail_wrap),
            used_wrap=bool(q.used_wrap),
            signalled_used=q.signalled_used,
            signalled_used_valid=bool(q.signalled_used_valid),
        )

    # -- properties -----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._q.size

    @property
    def packed(self) -> bool:
        return bool(self._q.packed)

    @property
    def event_idx(self) -> bool:
        return bool(self._q.event_idx)

    @property
    def broken(self) -> bool:
        return bool(self._q.broken)

    @property
    def error(self) -> DriverError | None:
        """The driver error that broke this queue, if any."""
        return self._error

    # -- a ring started asynchronously to its driver ------------------------------------
    def start_unproven(self) -> None:
        """Mark a split ring as not proven to be one yet (a transport that starts rings
        asynchronously to the driver: vhost-user).  Until the ring shows a valid avail
        idx, or the driver kicks after the device's first look (``kicked``), an
        impossible avail idx (§2.7.6) is taken for memory that is not a ring -- firmware
        (SeaBIOS) leaves a device running when it boots the OS, which reuses the ring's
        memory before its own driver resets the device -- and the ring is neither
        failed nor written to.  A packed ring has no avail idx to judge: unchanged."""
        if not self._q.packed:
            self._q.unproven = 1

    def kicked(self) -> None:
        """The driver notified this queue (§2.3) after the device looked at it: an
        unproven ring that looked stale is the driver's now, its avail idx judged."""
        lib.vq_kicked(self._q)

    @property
    def stale_avail(self) -> int | None:
        """The impossible avail idx an unproven ring shows (``start_unproven``), or
        ``None``."""
        return int(self._q.stale_avail) if self._q.stale else None

    def stale_note(self) -> str | None:
        """One line for the log while the ring is stale (``stale_avail``), or None."""
        stale = self.stale_avail
        if stale is None:
            return None
        return (
            f"avail idx {stale:#06x} is impossible (the device's next is "
            f"{self.next_avail:#06x}) on a ring the driver has not used or kicked since "
            "it started: taken for memory that is not a ring (firmware that left the "
            "device running?), left alone until the driver kicks"
        )

    @property
    def next_avail(self) -> int:
        """Split: the free-running index of the next available entry; packed: ring position."""
        self._unpop()
        return self._q.next_avail if self._q.packed else self._q.last_avail_idx

    @property
    def next_used(self) -> int:
        return self._q.next_used if self._q.packed else self._q.used_idx

    @property
    def native(self):
        """The native ``struct vq *`` (for data-plane threads; see ``set_locking``)."""
        self._unpop()
        return self._q

    def set_locking(self, on: bool) -> None:
        """Serialise every native ring operation on a mutex, so that a data-plane
        thread and Python can both pop and complete chains of this queue."""
        self._unpop()
        self._ahead = not on
        if lib.vq_set_locking(self._q, int(on)):
            raise MemoryError("cannot allocate the virtqueue lock")

    def attach_stats(self, stats) -> None:
        """Count into the native ``struct vq_stats *`` ``stats`` (``virtio.stats``; the
        owner keeps it alive) from now on."""
        self._stats = stats
        self._q.stats = stats

    def statistics(self) -> QueueStatistics:
        ahead = self._pf_count - self._pf_next
        return QueueStatistics(int(self._q.popped) - ahead, int(self._q.used), self.broken)

    # -- popping --------------------------------------------------------------------------
    def _check(self) -> None:
        if self._q.broken:
            raise QueueBrokenError(self._error)
        if self.memory._closed:
            raise DeviceUsageError("the guest memory of this queue was closed")

    def _fail(self, code: int) -> None:
        try:
            _raise_native(self._q, code)
        except DriverError as exc:
            self._error = exc
            raise

    def _alloc_segs(self, n: int) -> None:
        self._cap_segs = n
        self._segs = ffi.new("struct vq_seg[]", n)
        self._seg_buf = ffi.buffer(self._segs)

    def _pop_native(self, max_chains: int) -> int:
        self._check()
        while True:
            n = lib.vq_pop_batch(
                self._q, self._chains, min(max_chains, self._cap_chains), self._segs, self._cap_segs
            )
            if n != lib.VQ_E_SEGS:
                break
            self._alloc_segs(self._cap_segs * 4)  # one chain needs more room than we had
        if n < 0:
            self._fail(n)
        return n

    def _chain(self, i: int) -> DescriptorChain:
        head, ndesc, nsegs, nreadable, rlen, wlen, start = _unpack_chain(
            self._chain_buf, i * _CHAIN.size
        )
        raw = self._seg_buf[start * _SEG_SIZE : (start + nsegs) * _SEG_SIZE]
        return DescriptorChain(self, head, ndesc, raw, nreadable, rlen, wlen)

    def chain_from_native(self, chain, segs) -> DescriptorChain:
        """A ``DescriptorChain`` from a native ``struct vq_chain *`` whose segments are
        in the ``struct vq_seg`` array ``segs`` (chains a data-plane thread popped)."""
        # Decode the native records with struct: far cheaper than cffi field access.
        head, ndesc, nsegs, nreadable, rlen, wlen, start = _CHAIN.unpack(
            ffi.buffer(chain, _CHAIN.size)
        )
        raw = ffi.buffer(segs + start, nsegs * _SEG_SIZE)[:]
        return DescriptorChain(self, head, ndesc, raw, nreadable, rlen, wlen)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or ``None`` when the driver offered nothing new."""
        # The per-chain path every device's handle sees.  One native call validates
        # up to BATCH chains; each pop then costs one struct unpack, one bytes copy
        # of the chain's segment records (decoded only if asked) and the object.
        i = self._pf_next
        if i >= self._pf_count:
            return self._pop_refill()
        if self.memory._closed:
            raise DeviceUsageError("the guest memory of this queue was closed")
        self._pf_next = i + 1
        head, ndesc, nsegs, nreadable, rlen, wlen, start = _unpack_chain(
            self._pf_chains, i * _CHAIN_SIZE
        )
        chain = _new(DescriptorChain)
        chain.queue = self
        chain.head = head
        chain.ndesc = ndesc
        chain._segments = self._pf_segs[start * _SEG_SIZE : (start + nsegs) * _SEG_SIZE]
        chain._records = None
        chain.nreadable = nreadable
        chain.readable_len = rlen
        chain.writable_len = wlen
        if self.inflight is not None:
            self.inflight.on_pop((chain,))
        return chain

    def _pop_refill(self) -> DescriptorChain | None:
        """``pop`` once the read-ahead is used up: one native batch call."""
        if self.memory._closed:
            raise DeviceUsageError("the guest memory of this queue was closed")
        q = self._q
        if q.broken:
            raise QueueBrokenError(self._error)
        self._pf_pos = (q.next_avail, q.avail_wrap) if q.packed else (q.last_avail_idx, 0)
        n = self._pop_native(self.BATCH if self._ahead else 1)
        if n == 0:
            return None
        if n > 1:
            *_, nsegs, _, _, _, start = _unpack_chain(self._chain_buf, (n - 1) * _CHAIN_SIZE)
            self._pf_chains = self._chain_buf[: n * _CHAIN_SIZE]
            self._pf_segs = self._seg_buf[: (start + nsegs) * _SEG_SIZE]
            self._pf_count = n
            self._pf_next = 0
            return self.pop()
        chain = self._chain(0)
        if self.inflight is not None:
            self.inflight.on_pop((chain,))
        return chain

    def _unpop(self) -> None:
        """Give the read-ahead chains back to the ring: the next pop validates them
        again.  (The driver may not touch them: they are available, not used.)"""
        ahead = self._pf_count - self._pf_next
        if ahead:
            q = self._q
            if q.packed:
                pos, wrap = self._pf_pos
                for i in range(self._pf_next):
                    pos += _unpack_chain(self._pf_chains, i * _CHAIN_SIZE)[1]
                    if pos >= q.size:
                        pos -= q.size
                        wrap ^= 1
                q.next_avail, q.avail_wrap = pos, wrap
            else:
                q.last_avail_idx = (q.last_avail_idx - ahead) & 0xFFFF
            q.popped -= ahead
        self._pf_count = self._pf_next = 0
        self._pf_chains = self._pf_segs = b""

    def give_back(self, chains: Sequence[DescriptorChain]) -> None:
        """Return the most recently popped ``chains`` (in pop order) to the ring
        unused: the next pop hands them out again.  A buffer-filling device (net
        receive) that popped buffers for data that did not fit gives them back
        instead of holding them (the driver may not touch them: they are still
        available, §2.7.13 / §2.8.21), so a ring stop never waits on them."""
        if not chains:
            return
        self._check()
        self._unpop()
        q = self._q
        n = len(chains)
        if q.packed:
            back = sum(chain.ndesc for chain in chains)
            pos, wrap = q.next_avail - back, q.avail_wrap
            while pos < 0:
                pos += q.size
                wrap ^= 1
            q.next_avail, q.avail_wrap = pos, wrap
        else:
            q.last_avail_idx = (q.last_avail_idx - n) & 0xFFFF
        q.popped -= n
        unpop = getattr(self.inflight, "on_give_back", None)
        if unpop is not None:
            unpop(chains, self.next_used)

    def pop_batch(self, max_chains: int = BATCH) -> list[DescriptorChain]:
        """Up to ``max_chains`` available chains (fewer if fewer are available)."""
        self._unpop()
        n = self._pop_native(max_chains)
        chains = [self._chain(i) for i in range(n)]
        if chains and self.inflight is not None:
            self.inflight.on_pop(chains)
        return chains

    def chain_at(self, head: int) -> DescriptorChain:
        """Split rings: the chain starting at descriptor ``head``, without touching the
        available ring (resubmission of in-flight requests after a reconnect)."""
        self._check()
        if self.packed or not 0 <= head < self.size:
            raise DeviceUsageError(f"chain_at({head}) needs a split queue and a head in range")
        while True:
            rc = lib.vq_chain_at(self._q, head, self._chains, self._segs, self._cap_segs)
            if rc != lib.VQ_E_SEGS:
                break
            self._alloc_segs(self._cap_segs * 4)
        if rc < 0:
            self._fail(rc)
        return self._chain(0)

    def packed_chain_recorded(self, descs: bytes) -> DescriptorChain:
        """Packed rings: the chain made of ``descs``, 16-byte ring descriptors as they
        were when it was popped (resubmission from the vhost-user inflight area after a
        restart: the ring slots may hold used elements by now).  Validated as a pop."""
        self._check()
        n = len(descs) // 16
        if not self.packed or len(descs) % 16 or not 0 < n <= self.size:
            raise DeviceUsageError(f"{len(descs)} bytes of packed descriptors for this queue")
        while True:
            rc = lib.vq_packed_chain_recorded(
                self._q, descs, n, self._chains, self._segs, self._cap_segs
            )
            if rc != lib.VQ_E_SEGS:
                break
            self._alloc_segs(self._cap_segs * 4)
        if rc < 0:
            self._fail(rc)
        return self._chain(0)

    def __iter__(self):
        while (chain := self.pop()) is not None:
            yield chain

    def has_available(self) -> bool:
        """Whether the driver made buffers available that were not popped yet."""
        self._check()
        if self._pf_next < self._pf_count:
            return True
        n = lib.vq_avail_count(self._q)
        if not self._q.packed and n > self._q.size:
            self._fail(lib.vq_pop_batch(self._q, self._chains, 1, self._segs, self._cap_segs))
        return n != 0

    def available_chains(self, limit: int) -> int:
        """How many chains (up to ``limit``) the driver made available that were not
        popped yet, without popping any: a device that delivers a group of buffers at
        once (virtio-input, §5.8.6) waits until the whole group fits.  Chains are
        validated when popped, not here."""
        self._check()
        ahead = self._pf_count - self._pf_next
        if ahead >= limit:
            return limit
        return ahead + int(lib.vq_avail_chains(self._q, limit - ahead))

    # -- completing -----------------------------------------------------------------------
    def add_used(self, chain: DescriptorChain, length: int) -> None:
        """Return ``chain`` to the driver with ``length`` bytes written (§2.7.8, §2.8.7)."""
        memory = self.memory
        if memory._closed:
            self._check()
        if chain.queue is not self:
            raise DeviceUsageError("chain belongs to another queue")
        if not 0 <= length <= chain.writable_len:
            raise DeviceUsageError(
                f"used length {length} exceeds the chain's {chain.writable_len} writable bytes"
            )
        if memory._dirty_log is not None:
            self._log_written(chain, length)
        if _vq_add_used1(self._q, chain.head, length, chain.ndesc) < 0:
            self._check()  # a data-plane thread broke the queue meanwhile
        if self.inflight is not None:
            self.inflight.on_used((chain,), self.next_used)

    def add_used_batch(self, completions: Iterable[tuple[DescriptorChain, int]]) -> None:
        """Return several chains at once (one used-index update)."""
        self._check()
        items = list(completions)
        if len(items) > self._cap_chains:
            self._grow(len(items))
        for i, (chain, length) in enumerate(items):
            if chain.queue is not self or not 0 <= length <= chain.writable_len:
                raise DeviceUsageError(f"bad completion {chain!r} length {length}")
            self._ids[i] = chain.head
            self._lens[i] = length
            self._ndescs[i] = chain.ndesc
            if self.memory._dirty_log is not None:
                self._log_written(chain, length)
        lib.vq_add_used_batch(self._q, self._ids, self._lens, self._ndescs, len(items))
        if self.inflight is not None:
            self.inflight.on_used([c for c, _ in items], self.next_used)

    def _log_written(self, chain: DescriptorChain, length: int) -> None:
        """Migration dirty log: the first ``length`` writable bytes were written (§2.7.8.2),
        whichever way the device filled them; logged before the used index moves."""
        for addr, _, seg_len, _, _ in chain.records()[chain.nreadable :]:
            if length <= 0:
                break
            n = min(length, seg_len)
            self.memory.log_dirty(addr, n)
            length -= n

    def _grow(self, n: int) -> None:
        self._unpop()
        self._cap_chains = n
        self._chains = ffi.new("struct vq_chain[]", n)
        self._chain_buf = ffi.buffer(self._chains)
        self._ids = ffi.new("uint16_t[]", n)
        self._lens = ffi.new("uint32_t[]", n)
        self._ndescs = ffi.new("uint16_t[]", n)

    # -- raw batch path (hot loops; no Python objects per chain) ----------------------------
    def pop_raw(self, max_chains: int) -> int:
        """Pop up to ``max_chains`` chains into the native arrays ``raw_chains``/``raw_segs``.

        Returns how many.  Complete them with ``add_used_raw``.
        """
        if self._pf_count:
            self._unpop()
        if max_chains > self._cap_chains:
            self._grow(max_chains)
        n = self._pop_native(max_chains)
        self._raw_count = n
        return n

    @property
    def raw_chains(self):
        return self._chains

    @property
    def raw_segs(self):
        return self._segs

    def add_used_raw(self, lengths: Sequence[int] | None = None) -> int:
        """Complete every chain of the last ``pop_raw`` in order: ``lengths[i]`` bytes
        written (default: each chain's whole writable length)."""
        self._check()
        n = self._raw_count
        self._raw_count = 0
        return lib.vq_add_used_chains(
            self._q,
            self._chains,
            n,
            ffi.NULL if lengths is None else ffi.new("uint32_t[]", list(lengths)),
        )

    # -- notifications ----------------------------------------------------------------------
    def needs_notification(self) -> bool:
        """After ``add_used``: must the device notify the driver now? (§2.7.7, §2.8.10)"""
        self._check()
        return bool(lib.vq_needs_notification(self._q))

    def enable_notification(self) -> bool:
        """Ask the driver for available-buffer notifications again (§2.7.10, §2.8.10).

        Returns ``True`` if buffers became available meanwhile: process them.
        """
        self._check()
        self._unpop()  # the driver's event index must name the first chain not handed out
        return bool(lib.vq_enable_notification(self._q))

    def enable_notification_after(self, skip: int) -> bool:
        """``enable_notification``, but with EVENT_IDX the driver is asked to notify
        only when it makes a chain available beyond the first ``skip`` not popped yet
        (a device waiting for ``skip + 1`` or more buffers, ``available_chains``).
        Returns ``True`` if any chain is available (the caller counts again)."""
        self._check()
        self._unpop()
        return bool(lib.vq_enable_notification_after(self._q, skip))

    def disable_notification(self) -> None:
        """Tell the driver that notifications are not needed for now."""
        self._check()
        lib.vq_disable_notification(self._q)


@dataclass
class QueueConfig:
    """The queue registers a transport exposes to the driver (``queue_size``,
    ``queue_desc``, ``queue_driver``, ``queue_device``, ``queue_enable``: §4.1.4.3,
    §4.2.2), before the queue runs."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc_addr: int = 0
    driver_addr: int = 0
    device_addr: int = 0

    def __post_init__(self) -> None:
        if not self.size:
            self.size = self.max_size

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.driver_addr = self.device_addr = 0

    def activate(
        self,
        memory: GuestMemory,
        *,
        packed: bool = False,
        event_idx: bool = False,
        indirect: bool = False,
        name: str = "",
    ) -> Virtqueue:
        """Validate the configuration against ``memory`` and start the queue."""
        if not 0 < self.size <= self.max_size:
            raise QueueConfigError(
                f"queue size {self.size} outside 1..{self.max_size} (the device maximum)",
                section=sec.S_4_2_2_2,
            )
        try:
            return Virtqueue(
                memory,
                QueueState(
                    size=self.size,
                    desc_addr=self.desc_addr,
                    driver_addr=self.driver_addr,
                    device_addr=self.device_addr,
                    packed=packed,
                    event_idx=event_idx,
                    indirect=indirect,
                    # A fresh queue has signalled nothing yet: notification decisions
                    # start exact instead of with one unconditional notification.
                    signalled_used_valid=True,
                ),
                name,
            )
        except GuestMemoryError as exc:
            raise QueueConfigError(str(exc), section=sec.S_2_6) from exc
