"""Stream bytes in and out of a descriptor chain's buffers (virtio 1.4 §2.7.4).

The device must not assume any particular arrangement of descriptors
(``devicenormative:Basic Facilities of a Virtio Device / Message Framing``), so
devices read headers and write status bytes through these streams, never
through individual descriptors.  A ``ChainWriter`` writes only device-writable
buffers and logs the pages it dirties when migration logging is on.

Host views are cut from the guest memory's region buffers as the stream reaches
them; a read or write that stays inside one segment takes a single slice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtio.errors import DescriptorChainError
from virtio.spec.sections import S_2_7_4

if TYPE_CHECKING:
    from virtio.queues.chain import DescriptorChain, Record


class _Cursor:
    """A position in a list of segment records; ``_take(n)`` consumes up to ``n`` bytes."""

    __slots__ = ("_bufs", "_off", "_recs", "_seg", "remaining")

    _recs: list[Record]
    _bufs: list[memoryview]
    _seg: int
    _off: int
    remaining: int

    def _take(self, n: int) -> list[tuple[int, memoryview]]:
        """``(guest address, host view)`` pieces covering the next ``n`` bytes."""
        if n > self.remaining:
            n = self.remaining
        self.remaining -= n
        out = []
        recs, bufs = self._recs, self._bufs
        seg, off = self._seg, self._off
        while n:
            addr, roff, length, region, _ = recs[seg]
            k = length - off
            if k > n:
                k = n
            start = roff + off
            out.append((addr + off, bufs[region][start : start + k]))
            n -= k
            off += k
            if off == length:
                seg += 1
                off = 0
        self._seg, self._off = seg, off
        return out

    def skip(self, n: int) -> int:
        before = self.remaining
        self._take(n)
        return before - self.remaining


class ChainReader(_Cursor):
    """Sequential reader over the device-readable part of a chain."""

    __slots__ = ()

    def __init__(self, chain: DescriptorChain) -> None:
        # All records: ``remaining`` (readable_len) stops the cursor before the
        # device-writable ones.
        self._recs = chain._records or chain.records()
        self._bufs = chain.queue.memory.buffers
        self._seg = self._off = 0
        self.remaining = chain.readable_len

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that remain when ``n < 0``)."""
        remaining = self.remaining
        if n < 0 or n > remaining:
            n = remaining
        if n:
            _, roff, length, region, _ = self._recs[self._seg]
            off = self._off
            end = off + n
            if end <= length:  # inside the current segment: one slice
                if end == length:
                    self._seg += 1
                    end = 0
                self._off = end
                self.remaining = remaining - n
                start = roff + off
                return bytes(self._bufs[region][start : start + n])
        return b"".join([view for _, view in self._take(n)])

    def read_exact(self, n: int, what: str = "data") -> bytes:
        """Exactly ``n`` bytes, or ``DescriptorChainError`` if the chain is shorter."""
        if n > self.remaining:
            raise DescriptorChainError(
                f"device-readable part too short for {what}: need {n}, have {self.remaining}",
                section=S_2_7_4,
            )
        return self.read(n)

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` (as far as the chain goes); returns the bytes copied."""
        dst = memoryview(buf).cast("B")
        pos = 0
        for _, view in self._take(len(dst)):
            dst[pos : pos + len(view)] = view
            pos += len(view)
        return pos

    def views(self, n: int) -> list[memoryview]:
        """Consume ``n`` bytes and return them as host views (zero copy)."""
        return [view for _, view in self._take(n)]


class ChainWriter(_Cursor):
    """Sequential writer over the device-writable part of a chain.

    ``written`` counts the bytes written, the ``len`` to report in ``add_used``
    (§2.7.8: the device writes at least ``len`` bytes before updating used idx).
    """

    __slots__ = ("_chain", "_memory", "written")

    def __init__(self, chain: DescriptorChain) -> None:
        # All records, starting at the first device-writable one.
        self._recs = chain._records or chain.records()
        self._memory = memory = chain.queue.memory
        self._bufs = memory.buffers
        self._seg = chain.nreadable
        self._off = 0
        self.remaining = chain.writable_len
        self._chain = chain
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write as much of ``data`` as fits; returns the bytes written."""
        if data.__class__ is not bytes and data.__class__ is not bytearray:
            data = memoryview(data).cast("B")
        n = len(data)
        remaining = self.remaining
        if n and n <= remaining:
            addr, roff, length, region, _ = self._recs[self._seg]
            off = self._off
            end = off + n
            if end <= length:  # inside the current segment: one slice
                start = roff + off
                self._bufs[region][start : start + n] = data
                if end == length:
                    self._seg += 1
                    end = 0
                self._off = end
                self.remaining = remaining - n
                self.written += n
                if self._memory._dirty_log is not None:
                    self._memory.log_dirty(addr + off, n)
                return n
        src = memoryview(data)
        pos = 0
        log = self._memory.log_dirty if self._memory._dirty_log is not None else None
        for addr, view in self._take(n):
            k = len(view)
            view[:] = src[pos : pos + k]
            if log is not None:
                log(addr, k)
            pos += k
        self.written += pos
        return pos

    def write_exact(self, data: bytes | bytearray | memoryview, what: str = "data") -> None:
        if len(data) > self.remaining:
            raise DescriptorChainError(
                f"device-writable part too short for {what}: need {len(data)}, "
                f"have {self.remaining}",
                section=S_2_7_4,
            )
        self.write(data)

    def views(self, n: int) -> list[memoryview]:
        """Reserve ``n`` bytes and return host views to fill in place (zero copy).

        The bytes count as written; with dirty logging on they are logged now.
        """
        out = []
        for addr, view in self._take(n):
            self._memory.log_dirty(addr, len(view))
            out.append(view)
        self.written += sum(len(v) for v in out)
        return out

    def seek_end(self, tail: int) -> None:
        """Position the writer ``tail`` bytes before the end of the writable part
        (for trailing status bytes such as virtio-blk's ``status``)."""
        total = self._chain.writable_len
        if tail > total:
            raise DescriptorChainError(
                f"device-writable part shorter than its {tail}-byte trailer",
                section=S_2_7_4,
            )
        self._seg = self._chain.nreadable
        self._off = 0
        self.remaining = total
        self.skip(total - tail)
        self.written = max(self.written, total - tail)
