"""Stream bytes in and out of a descriptor chain's buffers (virtio 1.4 §2.7.4).

The device must not assume any particular arrangement of descriptors
(``devicenormative:Basic Facilities of a Virtio Device / Message Framing``), so
devices read headers and write status bytes through these streams, never
through individual descriptors.  A ``ChainWriter`` writes only device-writable
buffers and logs the pages it dirties when migration logging is on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtio.errors import DescriptorChainError

if TYPE_CHECKING:
    from virtio.queues.chain import DescriptorChain


class ChainReader:
    """Sequential reader over the device-readable part of a chain."""

    def __init__(self, chain: DescriptorChain) -> None:
        self._views = chain.readable()
        self._seg = 0
        self._off = 0
        self.remaining = chain.readable_len

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
                section="2.7.4",
            )
        return self.read(n)

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` (as far as the chain goes); returns the bytes copied."""
        dst = memoryview(buf).cast("B")
        want = min(len(dst), self.remaining)
        pos = 0
        while pos < want:
            view = self._views[self._seg]
            n = min(want - pos, len(view) - self._off)
            dst[pos : pos + n] = view[self._off : self._off + n]
            pos += n
            self._off += n
            if self._off == len(view):
                self._seg += 1
                self._off = 0
        self.remaining -= pos
        return pos

    def skip(self, n: int) -> int:
        n = min(n, self.remaining)
        left = n
        while left:
            view = self._views[self._seg]
            k = min(left, len(view) - self._off)
            left -= k
            self._off += k
            if self._off == len(view):
                self._seg += 1
                self._off = 0
        self.remaining -= n
        return n

    def views(self, n: int) -> list[memoryview]:
        """Consume ``n`` bytes and return them as host views (zero copy)."""
        n = min(n, self.remaining)
        out = []
        left = n
        while left:
            view = self._views[self._seg]
            k = min(left, len(view) - self._off)
            out.append(view[self._off : self._off + k])
            left -= k
            self._off += k
            if self._off == len(view):
                self._seg += 1
                self._off = 0
        self.remaining -= n
        return out


class ChainWriter:
    """Sequential writer over the device-writable part of a chain.

    ``written`` counts the bytes written, the ``len`` to report in ``add_used``
    (§2.7.8: the device writes at least ``len`` bytes before updating used idx).
    """

    def __init__(self, chain: DescriptorChain) -> None:
        self._chain = chain
        self._segs = chain.segments[chain.nreadable :]
        self._views = chain.writable()
        self._seg = 0
        self._off = 0
        self.remaining = chain.writable_len
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write as much of ``data`` as fits; returns the bytes written."""
        src = memoryview(data).cast("B")
        want = min(len(src), self.remaining)
        pos = 0
        mem = self._chain.queue.memory
        logging = mem.logging
        while pos < want:
            view = self._views[self._seg]
            n = min(want - pos, len(view) - self._off)
            view[self._off : self._off + n] = src[pos : pos + n]
            if logging:
                mem.log_dirty(self._segs[self._seg].addr + self._off, n)
            pos += n
            self._off += n
            if self._off == len(view):
                self._seg += 1
                self._off = 0
        self.remaining -= pos
        self.written += pos
        return pos

    def write_exact(self, data: bytes | bytearray | memoryview, what: str = "data") -> None:
        if len(data) > self.remaining:
            raise DescriptorChainError(
                f"device-writable part too short for {what}: need {len(data)}, "
                f"have {self.remaining}",
                section="2.7.4",
            )
        self.write(data)

    def views(self, n: int) -> list[memoryview]:
        """Reserve ``n`` bytes and return host views to fill in place (zero copy).

        The bytes count as written; with dirty logging on they are logged now.
        """
        n = min(n, self.remaining)
        out = []
        left = n
        mem = self._chain.queue.memory
        while left:
            view = self._views[self._seg]
            k = min(left, len(view) - self._off)
            out.append(view[self._off : self._off + k])
            mem.log_dirty(self._segs[self._seg].addr + self._off, k)
            left -= k
            self._off += k
            if self._off == len(view):
                self._seg += 1
                self._off = 0
        self.remaining -= n
        self.written += n
        return out

    def seek_end(self, tail: int) -> None:
        """Position the writer ``tail`` bytes before the end of the writable part
        (for trailing status bytes such as virtio-blk's ``status``)."""
        if tail > self._chain.writable_len:
            raise DescriptorChainError(
                f"device-writable part shorter than its {tail}-byte trailer", section="2.7.4"
            )
        target = self._chain.writable_len - tail
        self._seg = 0
        self._off = 0
        self.remaining = self._chain.writable_len
        done = 0
        while done < target:
            view = self._views[self._seg]
            k = min(target - done, len(view))
            done += k
            if k == len(view):
                self._seg += 1
            else:
                self._off = k
        self.remaining -= target
        self.written = max(self.written, target)
