"""Pure parsing of virtio-blk requests (virtio 1.4 §5.2.6): a table of chain shapes
to parsed requests, driven through real split/packed rings with no device running.
"""

from __future__ import annotations

import itertools
import struct

import pytest

from virtio.devices.blk.request import HEADER_SIZE, SEGMENT_SIZE, BlkRequest, Segment
from virtio.errors import DescriptorChainError
from virtio.memory import BytearrayGuestMemory
from virtio.queues.virtqueue import Virtqueue
from virtio.spec.blk import (
    VIRTIO_BLK_ID_BYTES,
    BlkDiscardFlag,
    BlkReqType,
    virtio_blk_discard_write_zeroes,
    virtio_blk_outhdr,
)
from virtio.testing.driver import DriverQueue

T = BlkReqType
UNMAP = int(BlkDiscardFlag.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)


def hdr(req_type: int, sector: int = 0, reserved: int = 0) -> bytes:
    return virtio_blk_outhdr.build({"type": req_type, "reserved": reserved, "sector": sector})


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return virtio_blk_discard_write_zeroes.build(
        {"sector": sector, "num_sectors": num, "flags": flags}
    )


class Ring:
    """One driver queue and its device side, sharing a bytearray guest memory."""

    def __init__(self, packed: bool = False) -> None:
        self.mem = BytearrayGuestMemory(1 << 20)
        self.dq = DriverQueue(self.mem, 16, packed=packed, indirect=True, data_size=1 << 19)
        self.vq = Virtqueue(self.mem, self.dq.state())

    def chain(self, readable, writable, *, use_indirect: bool = False):
        self.dq.add(readable, writable, use_indirect=use_indirect)
        self.dq.publish()
        chain = self.vq.pop()
        assert chain is not None
        return chain


@pytest.fixture(params=["split", "packed", "split-indirect", "packed-indirect"])
def make_chain(request):
    ring = Ring(packed=request.param.startswith("packed"))
    indirect = request.param.endswith("indirect")
    return lambda r, w: ring.chain(r, w, use_indirect=indirect)


def pieces(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


# (id, readable buffers, writable lengths) -> (type, kind, reserved, sector, data_len)
PARSE_TABLE = [
    ("in", [hdr(T.VIRTIO_BLK_T_IN, 7)], [1024, 1], (0, T.VIRTIO_BLK_T_IN, 0, 7, 1024)),
    ("in-status-shared", [hdr(T.VIRTIO_BLK_T_IN, 1)], [513], (0, T.VIRTIO_BLK_T_IN, 0, 1, 512)),
    ("in-odd-split", pieces(hdr(0, 9), 1, 5, 12), [3, 509, 1], (0, T.VIRTIO_BLK_T_IN, 0, 9, 512)),
    ("out", [hdr(1, 2**40), bytes(2048)], [1], (1, T.VIRTIO_BLK_T_OUT, 0, 2**40, 2048)),
    ("out-one-buffer", [hdr(1, 3) + bytes(512)], [1], (1, T.VIRTIO_BLK_T_OUT, 0, 3, 512)),
    ("out-reserved", [hdr(1, 0, 0xDEAD), bytes(512)], [1], (1, T.VIRTIO_BLK_T_OUT, 0xDEAD, 0, 512)),
    ("flush", [hdr(4)], [1], (4, T.VIRTIO_BLK_T_FLUSH, 0, 0, 0)),
    ("get-id", [hdr(8)], [20, 1], (8, T.VIRTIO_BLK_T_GET_ID, 0, 0, VIRTIO_BLK_ID_BYTES)),
    ("discard", [hdr(11), seg(1, 2) + seg(8, 8)], [1], (11, T.VIRTIO_BLK_T_DISCARD, 0, 0, 32)),
    ("write-zeroes", [hdr(13), seg(1, 2, 1)], [1], (13, T.VIRTIO_BLK_T_WRITE_ZEROES, 0, 0, 16)),
    ("unknown", [hdr(0x1234)], [1], (0x1234, None, 0, 0, 0)),
    ("barrier-bit", [hdr(0x80000001), bytes(512)], [1], (0x80000001, None, 0, 0, 512)),
    ("max-sector", [hdr(0, 2**64 - 1)], [1], (0, T.VIRTIO_BLK_T_IN, 0, 2**64 - 1, 0)),
]


@pytest.mark.parametrize(
    ("readable", "writable", "expected"),
    [pytest.param(r, w, e, id=i) for i, r, w, e in PARSE_TABLE],
)
def test_parse_table(make_chain, readable, writable, expected) -> None:
    req = BlkRequest.parse(make_chain(readable, writable))
    assert (req.type, req.kind, req.reserved, req.sector, req.data_len) == expected
    assert req.data_written == 0


def test_header_layout_matches_spec_struct() -> None:
    assert HEADER_SIZE == virtio_blk_outhdr.sizeof() == 16
    assert SEGMENT_SIZE == virtio_blk_discard_write_zeroes.sizeof() == 16
    raw = hdr(T.VIRTIO_BLK_T_OUT, 0x0102030405060708, 0x0A0B0C0D)
    assert struct.unpack("<IIQ", raw) == (1, 0x0A0B0C0D, 0x0102030405060708)


def test_segments_decoded_across_odd_boundaries(make_chain) -> None:
    data = seg(1, 2) + seg(100, 8, UNMAP) + seg(2**63, 0xFFFFFFFF, 0x80000000)
    req = BlkRequest.parse(make_chain(pieces(hdr(13) + data, 3, 17, 30, 47), [1]))
    assert req.segment_count == 3
    assert req.segments() == [
        Segment(1, 2, 0),
        Segment(100, 8, UNMAP),
        Segment(2**63, 0xFFFFFFFF, 0x80000000),
    ]


def test_partial_trailing_segment_is_counted_out(make_chain) -> None:
    req = BlkRequest.parse(make_chain([hdr(11), seg(1, 2) + b"\1" * 7], [1]))
    assert req.data_len == 23 and req.segment_count == 1
    assert req.segments() == [Segment(1, 2, 0)]


def test_out_data_views_are_zero_copy(make_chain) -> None:
    data = bytes(range(256)) * 4
    req = BlkRequest.parse(make_chain(pieces(hdr(1, 0) + data, 20, 300, 700), [1]))
    views = req.readable_data()
    assert b"".join(bytes(v) for v in views) == data
    assert all(isinstance(v, memoryview) for v in views)


def test_in_views_exclude_status_and_complete_writes_last_byte() -> None:
    ring = Ring()
    token = ring.dq.add([hdr(0, 0)], [100, 413])
    ring.dq.publish()
    req = BlkRequest.parse(ring.vq.pop())
    views = req.writable_data()
    assert sum(len(v) for v in views) == 512
    for v in views:
        v[:] = b"\x55" * len(v)
    assert req.complete(0) == 513
    ring.vq.add_used(req.chain, 513)
    [used] = ring.dq.get_used()
    assert used.id == token and used.data == b"\x55" * 512 + b"\0"


def test_complete_non_data_request_reports_one_byte() -> None:
    ring = Ring(packed=True)
    ring.dq.add([hdr(4)], [8])
    ring.dq.publish()
    req = BlkRequest.parse(ring.vq.pop())
    assert req.complete(2) == 1  # status only, in the last of the 8 bytes
    ring.vq.add_used(req.chain, 1)
    [used] = ring.dq.get_used()
    assert used.data == bytes(7) + b"\x02"


@pytest.mark.parametrize(
    ("serial", "space", "expected"),
    [
        (b"abc", 20, b"abc" + bytes(17)),
        (b"x" * 20, 20, b"x" * 20),
        (b"x" * 20, 5, b"x" * 5),
        (b"abc", 0, b""),
    ],
)
def test_write_id(serial: bytes, space: int, expected: bytes) -> None:
    ring = Ring()
    ring.dq.add([hdr(8)], [space + 1])
    ring.dq.publish()
    req = BlkRequest.parse(ring.vq.pop())
    req.write_id(serial)
    assert req.complete(0) == len(expected) + 1
    ring.vq.add_used(req.chain, len(expected) + 1)
    [used] = ring.dq.get_used()
    assert used.data[: len(expected)] == expected


HOSTILE = [
    pytest.param([hdr(0)], [], "no device-writable byte", id="no-status"),
    pytest.param([hdr(0)[:8]], [513], "header too short", id="header-8"),
    pytest.param(pieces(hdr(0)[:15], 4, 9), [513], "header too short", id="header-15-split"),
    pytest.param([], [513], "header too short", id="no-header"),
]


@pytest.mark.parametrize(("readable", "writable", "message"), HOSTILE)
def test_hostile_chains_raise_driver_error(make_chain, readable, writable, message) -> None:
    chain = make_chain(readable, writable)
    with pytest.raises(DescriptorChainError, match=message) as info:
        BlkRequest.parse(chain)
    assert info.value.section.startswith("5.2.6")
