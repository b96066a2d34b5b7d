"""The vhost-user message table: every front-end request, encoded and decoded (h11 style).

Each case is fed to a ``BackendConnection`` whole, in chunks of every awkward size (one byte
at a time included), and concatenated with the other cases plus trailing partial data.
Chunking follows Linux AF_UNIX stream semantics: a ``recvmsg`` glues the bytes of
consecutive writes but ends right after the write that carried fds.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections import deque
from dataclasses import dataclass

import pytest

from virtio.testing.fds import is_open, make_fds
from virtio.transport.vhost_user import messages as m
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


# ---------------------------------------------------------------- construct cross-check

CONSTRUCT_CASES = [
    (m.HEADER_STRUCT, dict(request=5, flags=9, size=40), m.Header(5, 9, 40).pack()),
    (m.U64_STRUCT, dict(u64=0xDEAD), m.U64(0xDEAD).pack()),
    (m.VRING_STATE_STRUCT, dict(index=3, num=256), m.VringState(3, 256).pack()),
    (
        m.VRING_ADDR_STRUCT,
        dict(index=1, flags=1, descriptor=2, used=3, available=4, log=5),
        m.VringAddr(1, 1, 2, 3, 4, 5).pack(),
    ),
    (
        m.MEMORY_TABLE_STRUCT,
        dict(
            num_regions=2,
            regions=[
                dict(
                    guest_address=r.guest_address,
                    size=r.size,
                    user_address=r.user_address,
                    mmap_offset=r.mmap_offset,
                )
                for r in (REGION_A, REGION_B)
            ],
        ),
        m.MemoryTable((REGION_A, REGION_B)).pack(),
    ),
    (
        m.SINGLE_MEMORY_REGION_STRUCT,
        dict(region=dict(guest_address=1, size=2, user_address=3, mmap_offset=4)),
        m.SingleMemoryRegion(m.MemoryRegion(1, 2, 3, 4)).pack(),
    ),
    (
        m.XEN_MEMORY_REGION_STRUCT,
        dict(guest_address=1, size=2, user_address=3, mmap_offset=4, xen_mmap_flags=5, domid=6),
        m.MemoryRegion(1, 2, 3, 4, 5, 6).pack(),
    ),
    (m.LOG_STRUCT, dict(mmap_size=9, mmap_offset=8), m.LogDescription(9, 8).pack()),
    (
        m.IOTLB_STRUCT,
        dict(iova=1, size=2, user_address=3, permissions=3, type=2),
        m.IotlbMessage(1, 2, 3, 3, 2).pack(),
    ),
    (
        m.CONFIG_STRUCT,
        dict(offset=4, size=3, flags=1, payload=b"abc"),
        m.ConfigSpace(4, 1, b"abc").pack(),
    ),
    (
        m.VRING_AREA_STRUCT,
        dict(u64=0x102, size=4096, offset=0),
        m.VringArea(2, 4096, 0, True).pack(),
    ),
    (
        m.INFLIGHT_STRUCT,
        dict(mmap_size=1, mmap_offset=2, num_queues=3, queue_size=4),
        m.InflightDescription(1, 2, 3, 4).pack()[:20],
    ),
    (m.SHARED_OBJECT_STRUCT, dict(uuid=UUID.bytes), m.SharedObject(UUID).pack()),
    (m.DEVICE_STATE_STRUCT, dict(direction=1, phase=0), m.DeviceStateTransfer(1, 0).pack()),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("struct", "fields", "wire"), CONSTRUCT_CASES)
def test_construct_layouts_match_struct_codecs(struct, fields, wire) -> None:  # type: ignore[no-untyped-def]
    assert struct.build(fields) == wire
    parsed = struct.parse(wire)
    for key, value in fields.items():
        if key != "regions" and key != "region":
            assert parsed[key] == value


def test_payload_round_trips() -> None:
    assert m.VringFd.unpack(m.VringFd(7, True).pack()) == m.VringFd(7, True)
    assert m.VringArea.unpack(m.VringArea(3, 4096, 8).pack()) == m.VringArea(3, 4096, 8)
    assert m.IotlbMessage.unpack(m.IotlbMessage(1, 2, 3, 1, 3).pack()) == m.IotlbMessage(
        1, 2, 3, 1, 3
    )
    assert len(m.IotlbMessage(1, 2, 3, 1, 3).pack()) == 32
    assert len(m.InflightDescription(1, 2, 3, 4).pack()) == m.INFLIGHT_WIRE_SIZE
    state = m.VringState(0, m.VringState.packed_num(5, True, 9, False))
    assert state.packed_indices == (5, True, 9, False)
    assert m.VringState(0, 0x1_0005).split_next_avail == 5


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
