"""Pure parsing of virtio-blk requests (virtio 1.4 §5.2.6); no I/O here.

A request is one descriptor chain laid out as ``struct virtio_blk_req``::

    le32 type; le32 reserved; le64 sector;   device-readable header (virtio_blk_outhdr)
    u8 data[];                               readable (OUT, DISCARD, ...) or writable (IN, GET_ID)
    u8 status;                               the LAST device-writable byte

The device must not assume any particular arrangement of descriptors (§2.7.4
Message Framing), so the header is read through a ``ChainReader`` whatever the
descriptor boundaries, and the status is written with ``ChainWriter.seek_end(1)``.

A chain that cannot carry a request at all (a header shorter than 16 bytes, or no
device-writable byte for ``status``) is a driver error: the device cannot even
report a status, so it raises ``DescriptorChainError`` and the framework marks the
device NEEDS_RESET (§2.1.2), as QEMU does (``virtio_error`` "virtio-blk missing
headers" / "request outhdr too short").  Everything else - unknown types, bad
lengths, out-of-range sectors - is answered with a status byte by the device
(``virtio.devices.blk.device``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtio.errors import DescriptorChainError
from virtio.queues.chain import DescriptorChain
from virtio.queues.chain_io import ChainReader, ChainWriter
from virtio.spec.blk import (
    VIRTIO_BLK_ID_BYTES,
    BlkReqType,
    virtio_blk_discard_write_zeroes,
    virtio_blk_outhdr,
)
from virtio.spec.sections import S_5_2_6

_HEADER = struct.Struct("<IIQ")
"""``virtio_blk_outhdr`` (type, reserved, sector); a fast twin of the construct Struct."""
_SEGMENT = struct.Struct("<QII")
"""``virtio_blk_discard_write_zeroes`` (sector, num_sectors, flags)."""
assert _HEADER.size == virtio_blk_outhdr.sizeof()
assert _SEGMENT.size == virtio_blk_discard_write_zeroes.sizeof()

HEADER_SIZE = _HEADER.size
"""Bytes of the device-readable request header (16)."""
SEGMENT_SIZE = _SEGMENT.size
"""Bytes of one discard / write-zeroes segment (16)."""
STATUS_SIZE = 1
"""The trailing ``u8 status``."""

_SECTION = S_5_2_6
"""The request layout; the device must not assume descriptor boundaries (§2.7.4)."""

_IN = int(BlkReqType.VIRTIO_BLK_T_IN)
_GET_ID = int(BlkReqType.VIRTIO_BLK_T_GET_ID)
_DEVICE_WRITES_DATA = frozenset({_IN, _GET_ID})


@dataclass(frozen=True, slots=True)
class Segment:
    """One ``struct virtio_blk_discard_write_zeroes`` (§5.2.6): 512-byte units."""

    sector: int
    num_sectors: int
    flags: int


class BlkRequest:
    """One parsed request.

    ``type`` is the raw ``le32`` (unknown values are kept: the device answers them
    with VIRTIO_BLK_S_UNSUPP), ``kind`` the ``BlkReqType`` member or ``None``.
    ``data_len`` is the length of ``data[]``: for IN and GET_ID the writable part
    minus the status byte, for every other type the readable part after the header.
    """

    __slots__ = (
        "_data_views",
        "_reader",
        "_writer",
        "chain",
        "data_len",
        "data_written",
        "kind",
        "reserved",
        "sector",
        "type",
    )

    def __init__(
        self,
        chain: DescriptorChain,
        req_type: int,
        reserved: int,
        sector: int,
        data_len: int,
        reader: ChainReader,
    ) -> None:
        self.chain = chain
        self.type = req_type
        self.reserved = reserved
        self.sector = sector
        self.data_len = data_len
        self.data_written = 0
        try:
            self.kind: BlkReqType | None = BlkReqType(req_type)
        except ValueError:
            self.kind = None
        self._reader = reader
        self._writer: ChainWriter | None = None
        self._data_views: list[memoryview] = []

    @classmethod
    def parse(cls, chain: DescriptorChain) -> BlkRequest:
        """Read the header; raise ``DescriptorChainError`` if the chain has no room
        for the header or the status byte (§5.2.6 ``struct virtio_blk_req``)."""
        if chain.readable_len < HEADER_SIZE:
            raise DescriptorChainError(
                f"virtio-blk request header too short: {chain.readable_len} device-readable "
                f"bytes, need {HEADER_SIZE}",
                section=_SECTION,
            )
        if chain.writable_len < STATUS_SIZE:
            raise DescriptorChainError(
                "virtio-blk request has no device-writable byte for its status",
                section=_SECTION,
            )
        reader = chain.reader()
        type_, reserved, sector = _HEADER.unpack(reader.read(HEADER_SIZE))
        if type_ in _DEVICE_WRITES_DATA:
            data_len = chain.writable_len - STATUS_SIZE
        else:
            data_len = reader.remaining
        return cls(chain, type_, reserved, sector, data_len, reader)

    def __repr__(self) -> str:
        name = self.kind.name if self.kind is not None else f"type={self.type:#x}"
        return f"<BlkRequest {name} sector={self.sector} data_len={self.data_len}>"

    # -- data ---------------------------------------------------------------------------
    def _get_writer(self) -> ChainWriter:
        if self._writer is None:
            self._writer = self.chain.writer()
        return self._writer

    def readable_data(self) -> list[memoryview]:
        """Host views of ``data[]`` for OUT (zero copy; read them, never write)."""
        return self._reader.views(self.data_len)

    def writable_data(self) -> list[memoryview]:
        """Host views of ``data[]`` for IN (zero copy), never including the status
        byte; they count as written (``data_written``)."""
        views = self._get_writer().views(self.data_len)
        self.data_written = self.data_len
        self._data_views = views
        return views

    def zero_fill_data(self) -> None:
        """After a failed IN: zero the reserved ``data[]`` so that the ``data_written``
        bytes reported in the used ring really were written (§2.7.8.2)."""
        for v in self._data_views:
            v[:] = bytes(len(v))

    def log_data_dirty(self) -> None:
        """Log the pages of ``data[]`` dirty again once a zero-copy read has filled
        them: ``ChainWriter.views`` logs at reservation time, before the worker
        thread writes, and a migration pass in between would miss the data."""
        memory = self.chain.queue.memory
        if not memory.logging:
            return
        left = self.data_written
        for seg in self.chain.segments[self.chain.nreadable :]:
            if left <= 0:
                break
            n = min(left, seg.length)
            memory.log_dirty(seg.addr, n)
            left -= n

    def segments(self) -> list[Segment]:
        """Decode the DISCARD / WRITE_ZEROES segments (call after checking
        ``segment_count``; a trailing partial segment is ignored)."""
        raw = self._reader.read(self.segment_count * SEGMENT_SIZE)
        return [Segment(*t) for t in _SEGMENT.iter_unpack(raw)]

    @property
    def segment_count(self) -> int:
        return self.data_len // SEGMENT_SIZE

    def write_id(self, serial: bytes) -> None:
        """GET_ID: write the NUL-padded device ID string, at most
        ``VIRTIO_BLK_ID_BYTES`` (and never more than ``data[]``) bytes (§5.2.6)."""
        n = min(VIRTIO_BLK_ID_BYTES, self.data_len)
        data = serial[:n].ljust(n, b"\0")
        self.data_written = self._get_writer().write(data)

    # -- completion -----------------------------------------------------------------------
    def complete(self, status: int) -> int:
        """Write ``status`` into the last device-writable byte; return the used length
        (the ``data[]`` bytes the device produced plus the status byte, §2.7.8)."""
        writer = self._get_writer()
        writer.seek_end(STATUS_SIZE)
        writer.write(bytes((status,)))
        return self.data_written + STATUS_SIZE
