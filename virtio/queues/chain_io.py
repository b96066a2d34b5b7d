"""Stream bytes in and out of a descriptor chain's buffers (virtio 1.4 §2.7.4).

The device must not assume any particular arrangement of descriptors
(``devicenormative:Basic Facilities of a Virtio Device / Message Framing``), so
devices read headers and write status bytes through these streams, never
through individual descriptors.  A ``ChainWriter`` writes only device-writable
buffers and logs the pages it dirties when migration logging is on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from virtio.errors import DescriptorChainError
from virtio.spec.sections import S_2_7_4

if TYPE_CHECKING:
    from virtio.queues.chain import DescriptorChain, Segment


class _Cursor:
    """A position in a list of buffers; ``_take(n)`` consumes up to ``n`` bytes."""

    def __init__(self, views: list[memoryview], segments: list[Segment], total: int) -> None:
        self._views = views
        self._segs = segments
        self._seg = 0
        self._off = 0
        self.remaining = total

    def _take(self, n: int) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(guest address, host view)`` pieces covering the next ``n`` bytes."""
        n = min(n, self.remaining)
        self.remaining -= n
        while n:
            view = self._views[self._seg]
            k = min(n, len(view) - self._off)
            yield self._segs[self._seg].addr + self._off, view[self._off : self._off + k]
            n -= k
            self._off += k
            if self._off == len(view):
                self._seg += 1
                self._off = 0

    def skip(self, n: int) -> int:
        before = self.remaining
        for _ in self._take(n):
            pass
        return before - self.remaining


class ChainReader(_Cursor):
    """Sequential reader over the device-readable part of a chain."""

    def __init__(self, chain: DescriptorChain) -> None:
        super().__init__(chain.readable(), chain.segments[: chain.nreadable], chain.readable_len)

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that remain when ``n < 0``)."""
        if n < 0 or n > self.remaining:
            n = self.remaining
        out = bytearray(n)
        self.readinto(out)
        return bytes(out)

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

    def __init__(self, chain: DescriptorChain) -> None:
        super().__init__(chain.writable(), chain.segments[chain.nreadable :], chain.writable_len)
        self._chain = chain
        self._memory = chain.queue.memory
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write as much of ``data`` as fits; returns the bytes written."""
        src = memoryview(data).cast("B")
        pos = 0
        log = self._memory.log_dirty if self._memory.logging else None
        for addr, view in self._take(len(src)):
            view[:] = src[pos : pos + len(view)]
            if log is not None:
                log(addr, len(view))
            pos += len(view)
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
        self._seg = 0
        self._off = 0
        self.remaining = total
        self.skip(total - tail)
        self.written = max(self.written, total - tail)
