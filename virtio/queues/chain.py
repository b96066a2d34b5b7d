"""Descriptor chains as the device sees them (virtio 1.4 §2.7.5, §2.8.6).

A ``DescriptorChain`` is what ``Virtqueue.pop`` returns: the validated buffers of
one chain (indirect tables already expanded), device-readable ones first.  The
device reads the readable part, writes the writable part and returns the chain
with ``Virtqueue.add_used(chain, written)``.

A chain popped from the native core keeps its segments as the core's packed
``struct vq_seg`` records and decodes them only when asked (``segments``), so the
per-chain path builds no Python object per segment unless a device wants one.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, NamedTuple

from virtio.queues.chain_io import ChainReader, ChainWriter

if TYPE_CHECKING:
    from virtio.queues.virtqueue import Virtqueue

SEG_RECORD = struct.Struct("<QQIHH")
"""``struct vq_seg``: guest address, offset in its region, length, region, writable."""

Record = tuple[int, int, int, int, int]
"""A decoded ``struct vq_seg``: (guest address, region offset, length, region, writable)."""


class Segment(NamedTuple):
    """One guest buffer (or the part of one that lies in a single memory region)."""

    addr: int
    length: int
    writable: bool
    region: int
    offset: int


_make_segment = Segment._make
_unpack_record = SEG_RECORD.unpack_from
_RECORD_SIZE = SEG_RECORD.size


class DescriptorChain:
    """A popped descriptor chain.

    ``head`` is the split ring's head descriptor index or the packed ring's buffer
    ID; ``ndesc`` the ring descriptors it occupies; ``segments`` its buffers,
    the first ``nreadable`` device-readable.  ``segments`` may be given as a list
    of ``Segment``s or as the native ``struct vq_seg`` records (``bytes``).
    """

    __slots__ = (
        "_records",
        "_segments",
        "head",
        "ndesc",
        "nreadable",
        "queue",
        "readable_len",
        "writable_len",
    )

    def __init__(
        self,
        queue: Virtqueue,
        head: int,
        ndesc: int,
        segments: list[Segment] | bytes,
        nreadable: int,
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.queue = queue
        self.head = head
        self.ndesc = ndesc
        self._segments = segments
        self._records: list[Record] | None = None
        self.nreadable = nreadable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def __repr__(self) -> str:
        return (
            f"<DescriptorChain head={self.head} ndesc={self.ndesc} "
            f"readable={self.readable_len} writable={self.writable_len}>"
        )

    @property
    def segments(self) -> list[Segment]:
        """The chain's buffers, device-readable ones first."""
        segs = self._segments
        if segs.__class__ is bytes:
            segs = self._segments = [
                _make_segment((addr, length, writable != 0, region, offset))
                for addr, offset, length, region, writable in self.records()
            ]
        return segs  # type: ignore[return-value]

    def records(self) -> list[Record]:
        """The segments as plain tuples ``(addr, region offset, length, region, writable)``
        (cheaper than ``segments`` on hot paths)."""
        recs = self._records
        if recs is None:
            segs = self._segments
            if segs.__class__ is bytes:
                if len(segs) == _RECORD_SIZE:  # the common one-segment chain
                    recs = [_unpack_record(segs)]  # type: ignore[arg-type]
                else:
                    recs = list(SEG_RECORD.iter_unpack(segs))  # type: ignore[arg-type]
            else:
                recs = [(s.addr, s.offset, s.length, s.region, int(s.writable)) for s in segs]
            self._records = recs
        return recs

    def _views(self, recs: list[Record]) -> list[memoryview]:
        bufs = self.queue.memory.buffers
        return [bufs[r][o : o + n] for _, o, n, r, _ in recs]

    def readable(self) -> list[memoryview]:
        """Host views of the device-readable buffers (read them, never write them)."""
        return self._views(self.records()[: self.nreadable])

    def writable(self) -> list[memoryview]:
        """Host views of the device-writable buffers."""
        return self._views(self.records()[self.nreadable :])

    def reader(self) -> ChainReader:
        return ChainReader(self)

    def writer(self) -> ChainWriter:
        return ChainWriter(self)
