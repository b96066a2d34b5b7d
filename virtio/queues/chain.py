"""Descriptor chains as the device sees them (virtio 1.4 §2.7.5, §2.8.6).

A ``DescriptorChain`` is what ``Virtqueue.pop`` returns: the validated buffers of
one chain (indirect tables already expanded), device-readable ones first.  The
device reads the readable part, writes the writable part and returns the chain
with ``Virtqueue.add_used(chain, written)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from virtio.queues.chain_io import ChainReader, ChainWriter
    from virtio.queues.virtqueue import Virtqueue


class Segment(NamedTuple):
    """One guest buffer (or the part of one that lies in a single memory region)."""

    addr: int
    length: int
    writable: bool
    region: int
    offset: int


class DescriptorChain:
    """A popped descriptor chain.

    ``head`` is the split ring's head descriptor index or the packed ring's buffer
    ID; ``ndesc`` the ring descriptors it occupies; ``segments`` its buffers,
    the first ``nreadable`` device-readable.
    """

    __slots__ = ("head", "ndesc", "nreadable", "queue", "readable_len", "segments", "writable_len")

    def __init__(
        self,
        queue: Virtqueue,
        head: int,
        ndesc: int,
        segments: list[Segment],
        nreadable: int,
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.queue = queue
        self.head = head
        self.ndesc = ndesc
        self.segments = segments
        self.nreadable = nreadable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def __repr__(self) -> str:
        return (
            f"<DescriptorChain head={self.head} ndesc={self.ndesc} "
            f"readable={self.readable_len} writable={self.writable_len}>"
        )

    def _view(self, seg: Segment) -> memoryview:
        buf = self.queue.memory.regions[seg.region].buffer
        return buf[seg.offset : seg.offset + seg.length]

    def readable(self) -> list[memoryview]:
        """Host views of the device-readable buffers (read them, never write them)."""
        return [self._view(s) for s in self.segments[: self.nreadable]]

    def writable(self) -> list[memoryview]:
        """Host views of the device-writable buffers."""
        return [self._view(s) for s in self.segments[self.nreadable :]]

    def reader(self) -> ChainReader:
        from virtio.queues.chain_io import ChainReader

        return ChainReader(self)

    def writer(self) -> ChainWriter:
        from virtio.queues.chain_io import ChainWriter

        return ChainWriter(self)
