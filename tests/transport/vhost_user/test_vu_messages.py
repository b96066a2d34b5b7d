"""The vhost-user message table: every front-end request, encoded and decoded (h11 style).

Each case is fed to a ``BackendConnection`` whole, in chunks of every awkward size (one byte
at a time included), and concatenated with the other cases plus trailing partial data.
Chunking follows Linux AF_UNIX stream semantics: a ``recvmsg`` glues the bytes of
consecutive writes but ends right after the write that carried fds.

Then each payload on its own: against bytes written by hand from the spec's field tables,
Hypothesis round trips, truncated / oversized input and out-of-range fields (typed errors).
"""

from __future__ import annotations

import os
import struct
import sys
import uuid
from collections import deque
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio.testing.fds import is_open, make_fds
from virtio.transport.vhost_user import messages as m
from virtio.transport.vhost_user.errors import PayloadSizeMismatch
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.messages import ProtocolFeature as PF
from virtio.transport.vhost_user.protocol import (
    NEED_DATA,
    BackendConnection,
    Reply,
    Request,
)

ALL_FEATURES = m.protocol_feature_mask(*(f for f in PF if f is not PF.XEN_MMAP))


def negotiated(protocol_features: int = ALL_FEATURES, **kwargs: object) -> BackendConnection:
    """A connection after GET_FEATURES / GET_ / SET_PROTOCOL_FEATURES."""
    conn = BackendConnection(**kwargs)  # type: ignore[arg-type]
    for request, payload, reply in (
        (R.GET_FEATURES, None, 1 << m.VHOST_USER_F_PROTOCOL_FEATURES | 1 << 32),
        (R.GET_PROTOCOL_FEATURES, None, protocol_features),
        (R.SET_PROTOCOL_FEATURES, protocol_features, None),
    ):
        conn.receive_data(m.encode_request(request, payload))
        event = conn.next_event()
        assert isinstance(event, Request), event
        if reply is not None:
            conn.send_reply(event, reply)
    assert conn.next_event() is NEED_DATA
    return conn


@dataclass(frozen=True)
class Case:
    request: R
    payload: object  # the expected decoded payload (None: no payload)
    fds: int = 0
    wire: bytes | None = None  # the payload bytes, when not payload.pack()
    reply: Reply = Reply.NONE

    def encode(self) -> bytes:
        data = self.wire if self.wire is not None else m.payload_bytes(self.payload)  # type: ignore[arg-type]
        return m.encode_message(self.request, m.VHOST_USER_VERSION, data)


REGION_A = m.MemoryRegion(0x0, 0x8000_0000, 0x7F00_0000_0000, 0)
REGION_B = m.MemoryRegion(0x1_0000_0000, 0x4000_0000, 0x7F80_0000_0000, 0x1000)
UUID = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")

CASES = [
    Case(R.GET_FEATURES, None, reply=Reply.EXPLICIT),
    Case(R.SET_FEATURES, m.U64(1 << 32 | 1 << 30 | 1 << 28)),
    Case(R.SET_OWNER, None),
    Case(R.RESET_OWNER, None),
    Case(R.SET_MEM_TABLE, m.MemoryTable((REGION_A, REGION_B)), fds=2),
    Case(R.SET_LOG_BASE, m.LogDescription(0x10_0000, 0), fds=1, reply=Reply.EXPLICIT),
    Case(R.SET_LOG_FD, None, fds=1),
    Case(R.SET_VRING_NUM, m.VringState(1, 256)),
    Case(
        R.SET_VRING_ADDR,
        m.VringAddr(1, 1, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0x3000),
    ),
    Case(R.SET_VRING_BASE, m.VringState(0, 17)),
    Case(R.GET_VRING_BASE, m.VringState(1, 0), reply=Reply.EXPLICIT),
    Case(R.SET_VRING_KICK, m.VringFd(1), fds=1),
    Case(R.SET_VRING_CALL, m.VringFd(0, no_fd=True)),
    Case(R.SET_VRING_ERR, m.VringFd(1), fds=1),
    Case(R.GET_PROTOCOL_FEATURES, None, reply=Reply.EXPLICIT),
    Case(R.SET_PROTOCOL_FEATURES, m.U64(ALL_FEATURES)),
    Case(R.GET_QUEUE_NUM, None, reply=Reply.EXPLICIT),
    Case(R.SET_VRING_ENABLE, m.VringState(1, 1)),
    Case(R.SEND_RARP, m.MacAddress(bytes.fromhex("525400123456"))),
    Case(R.NET_SET_MTU, m.U64(1500)),
    Case(R.SET_BACKEND_REQ_FD, None, fds=1),
    Case(
        R.IOTLB_MSG,
        m.IotlbMessage(0x1000, 0x2000, 0x7F00_0000_0000, 3, m.IotlbType.UPDATE),
        reply=Reply.EXPLICIT,
    ),
    Case(R.SET_VRING_ENDIAN, m.VringState(0, 1)),
    Case(R.GET_CONFIG, m.ConfigSpace(0, 0, bytes(8)), reply=Reply.EXPLICIT),
    Case(R.SET_CONFIG, m.ConfigSpace(4, 1, b"\x01\x02")),
    Case(R.CREATE_CRYPTO_SESSION, m.Opaque(bytes(range(64))), reply=Reply.EXPLICIT),
    Case(R.CLOSE_CRYPTO_SESSION, m.U64(3)),
    Case(R.POSTCOPY_ADVISE, None, reply=Reply.EXPLICIT),
    Case(R.POSTCOPY_END, None, reply=Reply.EXPLICIT),
    Case(R.GET_INFLIGHT_FD, m.InflightDescription(0, 0, 2, 256), reply=Reply.EXPLICIT),
    Case(R.SET_INFLIGHT_FD, m.InflightDescription(0x2000, 0, 2, 256), fds=1),
    Case(R.GPU_SET_SOCKET, None, fds=1),
    Case(R.RESET_DEVICE, None),
    Case(R.VRING_KICK, m.VringState(1, 0)),
    Case(R.GET_MAX_MEM_SLOTS, None, reply=Reply.EXPLICIT),
    Case(R.ADD_MEM_REG, m.SingleMemoryRegion(REGION_B), fds=1),
    Case(R.REM_MEM_REG, m.SingleMemoryRegion(REGION_B)),
    Case(R.SET_STATUS, m.U64(0xF)),
    Case(R.GET_STATUS, None, reply=Reply.EXPLICIT),
    Case(R.GET_SHARED_OBJECT, m.SharedObject(UUID), reply=Reply.EXPLICIT),
    Case(
        R.SET_DEVICE_STATE_FD,
        m.DeviceStateTransfer(m.TransferDirection.SAVE, m.MigrationPhase.STOPPED),
        fds=1,
        reply=Reply.EXPLICIT,
    ),
    Case(R.CHECK_DEVICE_STATE, None, reply=Reply.EXPLICIT),
    Case(R.GET_SHMEM_CONFIG, None, reply=Reply.EXPLICIT),
    # Last: it switches the connection into postcopy mode.
    Case(R.POSTCOPY_LISTEN, None),
]


def test_cases_cover_every_request() -> None:
    assert {case.request for case in CASES} == set(R)


def linux_chunks(
    messages: list[tuple[bytes, list[int]]], bufsize: int
) -> list[tuple[bytes, list[int]]]:
    """What successive ``recvmsg(bufsize)`` calls return for these writes (one write per
    message): bytes of consecutive writes are glued, a read stops after a write with fds."""
    writes = deque([bytearray(data), list(fds)] for data, fds in messages)
    chunks = []
    while writes:
        data, fds = bytearray(), []
        while writes and len(data) < bufsize:
            write = writes[0]
            take = min(bufsize - len(data), len(write[0]))
            data += write[0][:take]
            del write[0][:take]
            carried = write[1]
            if carried:
                fds, write[1] = carried, []
            if not write[0]:
                writes.popleft()
            if carried:
                break
        chunks.append((bytes(data), fds))
    return chunks


def drain(conn: BackendConnection) -> list[object]:
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def check_events(events: list[object], cases: list[Case], fds: list[list[int]]) -> None:
    assert len(events) == len(cases)
    for event, case, case_fds in zip(events, cases, fds, strict=True):
        assert isinstance(event, Request), event
        assert event.request is case.request
        assert event.payload == case.payload
        assert list(event.fds) == case_fds
        assert event.reply is case.reply
        assert event.flags == m.VHOST_USER_VERSION


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.request.name)
@pytest.mark.parametrize("bufsize", [1, 5, 12, 13, 4096])
def test_each_request_decodes(case: Case, bufsize: int) -> None:
    conn = negotiated(max_queues=2)
    fds = make_fds(case.fds)
    for data, chunk_fds in linux_chunks([(case.encode(), fds)], bufsize):
        assert conn.next_event() is NEED_DATA
        conn.receive_data(data, chunk_fds)
    check_events(drain(conn), [case], [fds])
    for fd in fds:
        assert is_open(fd)  # delivered: now ours
        os.close(fd)


@pytest.mark.parametrize("bufsize", [1, 3, 12, 20, 100, 4096])
def test_all_requests_concatenated_with_trailing_partial(bufsize: int) -> None:
    conn = negotiated(max_queues=2)
    all_fds = [make_fds(case.fds) for case in CASES]
    stream = [(case.encode(), fds) for case, fds in zip(CASES, all_fds, strict=True)]
    trailing = m.encode_request(R.SET_VRING_NUM, m.VringState(0, 64))
    events = []
    for data, fds in linux_chunks([*stream, (trailing[:7], [])], bufsize):
        conn.receive_data(data, fds)
        events += drain(conn)
    check_events(events, CASES, all_fds)
    conn.receive_data(trailing[7:])
    (last,) = drain(conn)
    assert isinstance(last, Request) and last.payload == m.VringState(0, 64)
    for fd in (fd for fds in all_fds for fd in fds):
        os.close(fd)


def test_one_chunk_holding_many_messages() -> None:
    """h11 style: several whole messages and a partial one in a single receive_data()."""
    conn = negotiated()
    msgs = [m.encode_request(R.SET_VRING_NUM, m.VringState(i, 8 << i)) for i in range(4)]
    blob = b"".join(msgs)
    conn.receive_data(blob[:-3])
    events = drain(conn)
    assert [e.payload for e in events] == [m.VringState(i, 8 << i) for i in range(3)]
    conn.receive_data(blob[-3:])
    (event,) = drain(conn)
    assert event.payload == m.VringState(3, 64)


def test_xen_mmap_regions_are_40_bytes() -> None:
    features = ALL_FEATURES | PF.XEN_MMAP.mask
    conn = negotiated(features)
    region = m.MemoryRegion(0, 0x1000, 0x7000_0000, 0, xen_mmap_flags=1, domid=7)
    table = m.MemoryTable((region,))
    assert len(table.pack()) == 8 + 40
    fds = make_fds(2)
    conn.receive_data(m.encode_request(R.SET_MEM_TABLE, table), fds[:1])
    conn.receive_data(m.encode_request(R.ADD_MEM_REG, m.SingleMemoryRegion(region)), fds[1:])
    first, second = drain(conn)
    assert first.payload == table and first.fds == (fds[0],)
    assert second.payload == m.SingleMemoryRegion(region)
    for fd in fds:
        os.close(fd)


# ---------------------------------------------------------------- payload layouts
# Each payload against bytes written by hand from the spec's field tables ("Message
# Specification / Payload"), little endian (the spec's numbers are in native byte order).

LAYOUTS = [
    (m.Header(5, 9, 40), "05000000 09000000 28000000"),
    (m.U64(0x0102_0304_0506_0708), "0807060504030201"),
    (m.Status(1), "0100000000000000"),
    (m.Empty(), ""),
    (m.VringState(3, 256), "03000000 00010000"),
    (
        m.VringAddr(1, 1, 0x1000, 0x3000, 0x2000, 0x4000),
        "01000000 01000000 0010000000000000 0030000000000000 0020000000000000 0040000000000000",
    ),
    # u64: vring index in bits 0-7, bit 8 "no fd".
    (m.VringFd(5, no_fd=True), "0501000000000000"),
    (m.VringFd(1), "0100000000000000"),
    (
        m.MemoryRegion(0x1000, 0x2000, 0x7F00_0000_0000, 0x10),
        "0010000000000000 0020000000000000 00000000007f0000 1000000000000000",
    ),
    # XEN_MMAP: xen mmap flags and domid (u32 each) after the four u64.
    (
        m.MemoryRegion(0x1000, 0x2000, 0x7F00_0000_0000, 0x10, xen_mmap_flags=1, domid=7),
        "0010000000000000 0020000000000000 00000000007f0000 1000000000000000 01000000 07000000",
    ),
    # num regions (u32), padding (u32), the regions.
    (
        m.MemoryTable((m.MemoryRegion(0x1000, 0x2000, 0x7F00_0000_0000, 0x10),)),
        "01000000 00000000 0010000000000000 0020000000000000 00000000007f0000 1000000000000000",
    ),
    (m.MemoryTable(()), "00000000 00000000"),
    # padding (u64), the region.
    (
        m.SingleMemoryRegion(m.MemoryRegion(0x1000, 0x2000, 0x7F00_0000_0000, 0x10)),
        "0000000000000000 0010000000000000 0020000000000000 00000000007f0000 1000000000000000",
    ),
    (m.LogDescription(0x10_0000, 0x40), "0000100000000000 4000000000000000"),
    # iova, size, user address (u64), permissions, type (u8), 6 bytes of C padding.
    (
        m.IotlbMessage(0x1000, 0x2000, 0x7F00_0000_0000, 3, m.IotlbType.UPDATE),
        "0010000000000000 0020000000000000 00000000007f0000 03 02 000000000000",
    ),
    # offset, size, flags (u32), then size bytes.
    (m.ConfigSpace(4, 1, b"\x01\x02"), "04000000 02000000 01000000 0102"),
    (m.ConfigSpace(0, 0, b""), "00000000 00000000 00000000"),
    # u64 (index bits 0-7, bit 8 no fd), size, offset.
    (
        m.VringArea(2, 0x1000, 0x10, no_fd=True),
        "0201000000000000 0010000000000000 1000000000000000",
    ),
    # mmap size, mmap offset (u64), num queues, queue size (u16), 4 bytes of C padding.
    (
        m.InflightDescription(0x2000, 0x40, 2, 256),
        "0020000000000000 4000000000000000 0200 0001 00000000",
    ),
    # The UUID in RFC 4122 order (first three components big endian).
    (m.SharedObject(UUID), "12345678 9abc def0 1234 56789abcdef0"),
    (
        m.DeviceStateTransfer(m.TransferDirection.LOAD, m.MigrationPhase.STOPPED),
        "01000000 00000000",
    ),
    (m.MacAddress(bytes.fromhex("525400123456")), "525400123456 0000"),
    (m.Opaque(b"abc"), "616263"),
]

PAYLOAD_CLASSES = {
    c for c in vars(m).values() if isinstance(c, type) and issubclass(c, m.Payload)
} - {m.Payload}


def context_for(payload: m.Payload) -> m.DecodeContext:
    """XEN_MMAP when a region of ``payload`` carries the Xen fields."""
    regions = getattr(payload, "regions", None) or [getattr(payload, "region", payload)]
    return m.DecodeContext(xen_mmap=getattr(regions[0], "xen_mmap_flags", None) is not None)


def test_layouts_cover_every_payload() -> None:
    assert {type(p) for p, _ in LAYOUTS} == PAYLOAD_CLASSES


@pytest.mark.skipif(sys.byteorder != "little", reason="hand-written bytes are little endian")
@pytest.mark.parametrize(("payload", "wire"), LAYOUTS, ids=lambda v: type(v).__name__)
def test_payload_layout(payload: m.Payload, wire: str) -> None:
    data = bytes.fromhex(wire)
    assert payload.pack() == data
    assert type(payload).unpack(data, context_for(payload)) == payload
    assert type(payload).MIN_SIZE <= len(data) <= type(payload).MAX_SIZE


def test_sizes() -> None:
    """What QEMU sends (``sizeof`` of its structs, C padding included)."""
    sizes = {
        m.U64: 8, m.VringState: 8, m.VringAddr: 40, m.VringFd: 8, m.LogDescription: 16,
        m.IotlbMessage: 32, m.VringArea: 24, m.InflightDescription: 24, m.SharedObject: 16,
        m.DeviceStateTransfer: 8, m.MacAddress: 8,
    }  # fmt: skip
    assert {cls: cls.SIZE for cls in sizes} == sizes
    assert m.HEADER.size == m.HEADER_SIZE == 12
    assert m.CONFIG_HEADER_SIZE == 12 and m.INFLIGHT_WIRE_SIZE == 24
    assert m.MemoryRegion.wire_size(False) == 32 and m.MemoryRegion.wire_size(True) == 40


def test_request_size_bounds_follow_the_payloads() -> None:
    """The table's size bounds (derived from the payload classes) against the spec."""
    bounds = {
        R.SET_MEM_TABLE: (8, 8 + 8 * 40),
        R.SET_LOG_BASE: (16, 16),
        R.SET_VRING_ADDR: (40, 40),
        R.IOTLB_MSG: (26, 32),  # the spec's 26 bytes, or QEMU's sizeof 32
        R.GET_CONFIG: (12, 12 + 256),
        R.SET_CONFIG: (12, 12 + 256),
        R.CREATE_CRYPTO_SESSION: (8, m.MAX_PAYLOAD_SIZE),
        R.GET_INFLIGHT_FD: (20, 24),
        R.SET_INFLIGHT_FD: (20, 24),
        R.ADD_MEM_REG: (8 + 32, 8 + 40),
        R.REM_MEM_REG: (8 + 32, 8 + 40),
        R.GET_SHARED_OBJECT: (16, 16),
    }
    for request, spec in m.REQUESTS.items():
        if spec.payload is None:
            assert (spec.min_size, spec.max_size) == (0, 0), request
            assert spec.decode is None
        else:
            expected = bounds.get(request, (8, 8))
            assert (spec.min_size, spec.max_size) == expected, request
    assert {
        R.SET_LOG_BASE, R.IOTLB_MSG, R.POSTCOPY_END, R.SET_DEVICE_STATE_FD,
        R.CHECK_DEVICE_STATE, R.GET_SHARED_OBJECT,
    } == m.STATUS_REPLIES  # fmt: skip


# ---------------------------------------------------------------- round trips

_u16, _u32, _u64 = (st.integers(0, (1 << bits) - 1) for bits in (16, 32, 64))


@st.composite
def _regions(draw: st.DrawFn, xen: bool) -> m.MemoryRegion:
    size = draw(st.integers(1, 1 << 48))
    base = st.integers(0, (1 << 64) - size)
    extra = (draw(_u32), draw(_u32)) if xen else ()
    return m.MemoryRegion(draw(base), size, draw(base), draw(base), *extra)


@st.composite
def _config(draw: st.DrawFn) -> m.ConfigSpace:
    data = draw(st.binary(max_size=m.VHOST_USER_MAX_CONFIG_SIZE))
    # offset is a u32, and offset + size must not wrap (an empty access may not sit at 2**32)
    offset = draw(st.integers(0, min((1 << 32) - 1, (1 << 32) - len(data))))
    return m.ConfigSpace(offset, draw(st.sampled_from(m.ConfigFlags)), data)


STRATEGIES: dict[type[m.Payload], st.SearchStrategy[m.Payload]] = {
    m.Header: st.builds(m.Header, _u32, _u32, _u32),
    m.U64: st.builds(m.U64, _u64),
    m.Status: st.builds(m.Status, _u64),
    m.Empty: st.just(m.Empty()),
    m.VringState: st.builds(m.VringState, _u32, _u32),
    m.VringAddr: st.builds(m.VringAddr, _u32, _u32, _u64, _u64, _u64, _u64),
    m.VringFd: st.builds(m.VringFd, st.integers(0, 255), st.booleans()),
    m.MemoryRegion: st.booleans().flatmap(_regions),
    m.MemoryTable: st.booleans().flatmap(
        lambda xen: st.lists(_regions(xen), max_size=8).map(lambda rs: m.MemoryTable(tuple(rs)))
    ),
    m.SingleMemoryRegion: st.booleans().flatmap(_regions).map(m.SingleMemoryRegion),
    m.LogDescription: st.builds(m.LogDescription, _u64, _u64),
    m.IotlbMessage: st.builds(
        m.IotlbMessage, _u64, _u64, _u64, st.integers(0, 3), st.sampled_from(m.IotlbType)
    ),
    m.ConfigSpace: _config(),
    m.VringArea: st.builds(m.VringArea, st.integers(0, 255), _u64, _u64, st.booleans()),
    m.InflightDescription: st.builds(m.InflightDescription, _u64, _u64, _u16, _u16),
    m.SharedObject: st.builds(m.SharedObject, st.uuids()),
    m.DeviceStateTransfer: st.builds(
        m.DeviceStateTransfer,
        st.sampled_from(m.TransferDirection),
        st.just(m.MigrationPhase.STOPPED),
    ),
    m.MacAddress: st.builds(m.MacAddress, st.binary(min_size=6, max_size=6)),
    m.Opaque: st.builds(m.Opaque, st.binary(max_size=m.MAX_PAYLOAD_SIZE)),
}


def test_strategies_cover_every_payload() -> None:
    assert set(STRATEGIES) == PAYLOAD_CLASSES


@settings(max_examples=40, deadline=None)
@given(payload=st.one_of(*STRATEGIES.values()))
def test_round_trip(payload: m.Payload) -> None:
    cls = type(payload)
    data = payload.pack()
    assert cls.MIN_SIZE <= len(data) <= cls.MAX_SIZE
    assert cls.unpack(data, context_for(payload)) == payload
    assert cls.unpack(memoryview(bytearray(data)), context_for(payload)) == payload


@settings(max_examples=100, deadline=None)
@given(case=st.sampled_from(CASES), cut=st.integers(1, 64), grow=st.integers(1, 64))
def test_each_request_rejects_truncated_and_oversized_payloads(
    case: Case, cut: int, grow: int
) -> None:
    """Through the table's decoder: a typed ``PayloadSizeMismatch`` naming the request."""
    spec = m.REQUESTS[case.request]
    if spec.payload is None or spec.payload is m.Opaque:
        return
    assert spec.decode is not None
    data = case.wire if case.wire is not None else case.payload.pack()  # type: ignore[union-attr]
    # A fixed-size payload with C padding comes with or without it.
    valid = (
        {spec.payload.MIN_SIZE, spec.payload.MAX_SIZE} if hasattr(spec.payload, "SIZE") else set()
    )
    for bad in (data[: max(0, len(data) - cut)], data + bytes(grow)):
        if spec.min_size <= len(bad) <= spec.max_size and len(bad) not in valid | {len(data)}:
            with pytest.raises(PayloadSizeMismatch) as info:
                spec.decode(case.request, bad, m.DecodeContext())
            assert info.value.request is case.request and info.value.size == len(bad)


@pytest.mark.parametrize(("payload", "wire"), LAYOUTS, ids=lambda v: type(v).__name__)
def test_truncated_and_oversized_unpack(payload: m.Payload, wire: str) -> None:
    cls, data, ctx = type(payload), bytes.fromhex(wire), context_for(payload)
    bad = [data + b"\0"] if cls is not m.Opaque else []
    if data and cls is not m.Opaque:
        bad += [data[:-1], data[: len(data) // 2]]
    for short_or_long in bad:
        with pytest.raises(m.InvalidMessage) as plain:
            cls.unpack(short_or_long, ctx)
        assert plain.value.request is None and plain.value.section == cls.SECTION
        with pytest.raises(PayloadSizeMismatch) as cited:
            cls.unpack(short_or_long, ctx, request=R.SET_FEATURES)
        assert cited.value.request is R.SET_FEATURES and cited.value.size == len(short_or_long)


@pytest.mark.parametrize(
    ("cls", "data", "words"),
    [
        (m.VringFd, m.U64(1 << 9 | 1).pack(), "bits set beyond"),
        (m.VringArea, m.U64(1 << 63).pack() + bytes(16), "bits set beyond"),
        (m.IotlbMessage, bytes(24) + b"\x04\x02", "permissions 4 not in 0..3"),
        (m.IotlbMessage, bytes(24) + b"\x01\x05", "type 5 not in 1 (MISS)"),
        (m.ConfigSpace, struct.pack("=III", 0, 0, 2), "flags 2 not in 0 (WRITABLE), 1 (MIGRATION)"),
        (m.ConfigSpace, struct.pack("=III", 0xFFFF_FFFF, 2, 0) + bytes(2), "wraps around"),
        (m.ConfigSpace, struct.pack("=III", 0, 257, 0) + bytes(257), "257 bytes, at most 256"),
        (m.DeviceStateTransfer, struct.pack("=II", 2, 0), "direction 2 not in 0 (SAVE), 1 (LOAD)"),
        (m.DeviceStateTransfer, struct.pack("=II", 0, 1), "phase 1 not in 0 (STOPPED)"),
        (m.MemoryRegion, struct.pack("=QQQQ", 0, 0, 0, 0), "size 0"),
        (m.MemoryRegion, struct.pack("=QQQQ", 1 << 63, (1 << 63) + 1, 0, 0), "guest address"),
        (m.MemoryTable, struct.pack("=II", 9, 0) + bytes(9 * 32), "9 regions, at most 8"),
        (
            m.MemoryTable,
            struct.pack("=IIQQQQQQQQ", 2, 0, 0, 1, 0, 0, 0, 0, 0, 0),
            "region 1: memory region of size 0",
        ),
        (m.SingleMemoryRegion, bytes(8) + struct.pack("=QQQQ", 0, 2, (1 << 64) - 1, 0), "wraps"),
    ],
)
def test_field_ranges(cls: type[m.Payload], data: bytes, words: str) -> None:
    with pytest.raises(m.InvalidMessage) as info:
        cls.unpack(data)
    assert type(info.value) is m.InvalidMessage
    assert words in str(info.value) and cls.__name__ in str(info.value)


def test_vring_index_checked_against_the_context() -> None:
    ctx = m.DecodeContext(max_queues=2)
    for payload in (m.VringState(2, 0), m.VringAddr(2, 0, 0, 0, 0, 0), m.VringFd(2)):
        type(payload).unpack(payload.pack())  # no limit without a context
        with pytest.raises(m.InvalidMessage, match="vring index 2 out of range"):
            type(payload).unpack(payload.pack(), ctx, request=R.SET_VRING_BASE)


def test_pack_refuses_what_does_not_fit() -> None:
    with pytest.raises(struct.error):
        m.VringFd(256).pack()
    with pytest.raises(struct.error):
        m.VringState(1 << 32, 0).pack()


def test_ring_state_helpers() -> None:
    state = m.VringState(0, m.VringState.packed_num(5, True, 9, False))
    assert state.packed_indices == (5, True, 9, False)
    assert m.VringState(0, 0x1_0005).split_next_avail == 5
    assert m.VringAddr(0, 1, 0, 0, 0, 0).log_used and not m.VringAddr(0, 0, 0, 0, 0, 0).log_used


def test_enum_numbers_follow_the_spec() -> None:
    assert R.GET_FEATURES == 1 and R.SET_BACKEND_REQ_FD == 21 and R.VRING_KICK == 35
    assert R.GET_MAX_MEM_SLOTS == 36 and R.ADD_MEM_REG == 37 and R.REM_MEM_REG == 38
    assert R.SET_STATUS == 39 and R.GET_STATUS == 40 and R.GET_SHARED_OBJECT == 41
    assert R.SET_DEVICE_STATE_FD == 42 and R.CHECK_DEVICE_STATE == 43
    assert list(R) == sorted(R) and [int(r) for r in R] == list(range(1, len(R) + 1))
    assert [int(f) for f in PF] == list(range(len(PF)))
    assert PF.CONFIGURE_MEM_SLOTS == 15 and PF.STATUS == 16 and PF.DEVICE_STATE == 19
    assert m.BackendRequest.CONFIG_CHANGE_MSG == 2 and m.BackendRequest.SHARED_OBJECT_LOOKUP == 8
    assert m.VHOST_USER_F_PROTOCOL_FEATURES == 30 and m.VHOST_F_LOG_ALL == 26


def test_table_sections_and_gates() -> None:
    spec = m.REQUESTS[R.SET_MEM_TABLE]
    assert spec.section == "vhost-user: Front-end message types / VHOST_USER_SET_MEM_TABLE"
    gates = {r: s.feature for r, s in m.REQUESTS.items()}
    assert gates[R.GET_CONFIG] is gates[R.SET_CONFIG] is PF.CONFIG
    assert gates[R.ADD_MEM_REG] is gates[R.REM_MEM_REG] is gates[R.GET_MAX_MEM_SLOTS]
    assert gates[R.GET_MAX_MEM_SLOTS] is PF.CONFIGURE_MEM_SLOTS
    assert gates[R.SET_STATUS] is gates[R.GET_STATUS] is PF.STATUS
    assert gates[R.GET_INFLIGHT_FD] is gates[R.SET_INFLIGHT_FD] is PF.INFLIGHT_SHMFD
    assert gates[R.SET_LOG_BASE] is PF.LOG_SHMFD
    assert gates[R.SET_BACKEND_REQ_FD] is PF.BACKEND_REQ
    assert gates[R.GET_QUEUE_NUM] is PF.MQ
    assert gates[R.RESET_DEVICE] is PF.RESET_DEVICE
    assert gates[R.GET_FEATURES] is None and gates[R.SET_VRING_NUM] is None
    assert m.REQUESTS[R.SET_PROTOCOL_FEATURES].needs_protocol_features


# ---------------------------------------------------------------- encoders


def test_reply_and_backend_encoders() -> None:
    assert m.encode_reply(R.GET_FEATURES, 1 << 30) == m.HEADER.pack(1, 0x5, 8) + (1 << 30).to_bytes(
        8, "little" if sys.byteorder == "little" else "big"
    )
    assert m.encode_ack(R.SET_MEM_TABLE, False) == m.HEADER.pack(5, 0x5, 8) + m.U64(1).pack()
    assert m.config_change_msg() == m.HEADER.pack(2, 0x1, 0)
    assert m.config_change_msg(need_reply=True) == m.HEADER.pack(2, 0x9, 0)
    assert m.vring_call_msg(3) == m.HEADER.pack(4, 1, 8) + m.VringState(3, 0).pack()
    assert m.vring_err_msg(1)[:4] == m.HEADER.pack(5, 1, 8)[:4]
    ack = m.encode_reply(m.BackendRequest.CONFIG_CHANGE_MSG, 0)
    assert m.decode_backend_ack(ack, m.BackendRequest.CONFIG_CHANGE_MSG) == 0
    with pytest.raises(m.InvalidMessage):
        m.decode_backend_ack(ack, m.BackendRequest.IOTLB_MSG)
    with pytest.raises(m.InvalidMessage):
        m.decode_backend_ack(m.config_change_msg(), m.BackendRequest.CONFIG_CHANGE_MSG)
    with pytest.raises(ValueError):
        m.encode_message(1, 1, bytes(m.MAX_PAYLOAD_SIZE + 1))
