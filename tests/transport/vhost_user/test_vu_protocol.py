"""BackendConnection: validation, fd ownership, negotiation, replies.  No sockets."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.errors import DeviceUsageError, DriverError
from virtio.testing.fds import is_open, make_fds
from virtio.transport.vhost_user import messages as m
from virtio.transport.vhost_user.errors import (
    IncorrectFds,
    InvalidMessage,
    OversizedMessage,
    PartialMessage,
    PayloadSizeMismatch,
    ProtocolFeatureNotNegotiated,
    UnknownRequest,
    VhostUserProtocolError,
)
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.messages import ProtocolFeature as PF
from virtio.transport.vhost_user.protocol import (
    NEED_DATA,
    BackendConnection,
    ConnectionClosed,
    ConnectionState,
    RejectedRequest,
    Reply,
    Request,
)

ALL_FEATURES = m.protocol_feature_mask(*(f for f in PF if f is not PF.XEN_MMAP))
OFFERED = 1 << m.VHOST_USER_F_PROTOCOL_FEATURES | 1 << 32


def negotiated(protocol_features: int = ALL_FEATURES, **kwargs: object) -> BackendConnection:
    conn = BackendConnection(**kwargs)  # type: ignore[arg-type]
    for request, payload, reply in (
        (R.GET_FEATURES, None, OFFERED),
        (R.GET_PROTOCOL_FEATURES, None, protocol_features),
        (R.SET_PROTOCOL_FEATURES, protocol_features, None),
    ):
        conn.receive_data(m.encode_request(request, payload))
        event = conn.next_event()
        assert isinstance(event, Request), event
        if reply is not None:
            conn.send_reply(event, reply)
    return conn


def raw(request: int, flags: int = 1, payload: bytes = b"", size: int | None = None) -> bytes:
    return m.HEADER.pack(request, flags, len(payload) if size is None else size) + payload


def one_event(conn: BackendConnection, data: bytes, fds: list[int] | None = None) -> object:
    conn.receive_data(data, fds or [])
    event = conn.next_event()
    assert conn.next_event() is NEED_DATA
    return event


def rejected(conn: BackendConnection, data: bytes, fds: list[int] | None = None) -> RejectedRequest:
    event = one_event(conn, data, fds)
    assert isinstance(event, RejectedRequest), event
    return event


def still_works(conn: BackendConnection) -> None:
    event = one_event(conn, m.encode_request(R.SET_VRING_NUM, m.VringState(0, 64)))
    assert isinstance(event, Request) and event.payload == m.VringState(0, 64)


# ---------------------------------------------------------------- malformed messages


@pytest.mark.parametrize(
    ("request_", "size"),
    [
        (R.GET_FEATURES, 8),
        (R.SET_FEATURES, 4),
        (R.SET_VRING_NUM, 12),
        (R.SET_VRING_ADDR, 32),
        (R.SET_MEM_TABLE, 4),
        (R.SET_MEM_TABLE, 8 + 31),
        (R.GET_CONFIG, 11),
        (R.GET_CONFIG, 12 + 257),
        (R.ADD_MEM_REG, 44),
        (R.GET_SHARED_OBJECT, 15),
    ],
)
def test_wrong_payload_size_is_rejected_and_skipped(request_: R, size: int) -> None:
    conn = negotiated()
    payload = struct.pack("=I", 0) + bytes(size - 4) if size >= 4 else bytes(size)
    event = rejected(conn, raw(request_, payload=payload))
    assert isinstance(event.error, PayloadSizeMismatch)
    assert event.error.size == size
    assert event.error.section.startswith("vhost-user: Front-end message types / ")
    still_works(conn)


def test_memory_table_size_must_match_region_count() -> None:
    conn = negotiated()
    table = m.MemoryTable((m.MemoryRegion(0, 0x1000, 0x7000, 0),)).pack()
    fds = make_fds(1)
    event = rejected(conn, raw(R.SET_MEM_TABLE, payload=table + bytes(32)), fds)
    assert isinstance(event.error, PayloadSizeMismatch)
    assert not is_open(fds[0])


def test_bad_version_is_fatal_and_closes_buffered_fds() -> None:
    conn = negotiated()
    fds = make_fds(2)
    conn.receive_data(raw(R.SET_VRING_NUM, flags=2, payload=bytes(8)), fds[:1])
    conn.receive_data(m.encode_request(R.SET_VRING_KICK, m.VringFd(0))[:5], fds[1:])
    with pytest.raises(InvalidMessage) as info:
        conn.next_event()
    assert "version" in str(info.value)
    assert conn.state is ConnectionState.ERROR
    assert not any(is_open(fd) for fd in fds)
    with pytest.raises(DeviceUsageError):
        conn.next_event()
    late = make_fds(1)
    with pytest.raises(DeviceUsageError):
        conn.receive_data(b"x", late)
    assert not is_open(late[0])


def test_reply_flag_on_a_request_is_rejected() -> None:
    conn = negotiated()
    event = rejected(conn, raw(R.SET_VRING_NUM, flags=0x5, payload=m.VringState(0, 8).pack()))
    assert isinstance(event.error, InvalidMessage)
    assert "REPLY" in str(event.error)
    still_works(conn)


def test_missing_fd_is_rejected() -> None:
    conn = negotiated()
    event = rejected(conn, m.encode_request(R.SET_VRING_KICK, m.VringFd(0)))
    assert isinstance(event.error, IncorrectFds)
    assert event.error.received == 0


def test_fd_with_nofd_bit_is_rejected_and_closed() -> None:
    conn = negotiated()
    fds = make_fds(1)
    event = rejected(conn, m.encode_request(R.SET_VRING_CALL, m.VringFd(0, no_fd=True)), fds)
    assert isinstance(event.error, IncorrectFds)
    assert not is_open(fds[0])


@pytest.mark.parametrize(
    ("request_", "payload", "count"),
    [
        (R.SET_VRING_NUM, m.VringState(0, 8), 1),
        (R.GET_FEATURES, None, 2),
        (R.SET_LOG_FD, None, 2),
        (R.SET_MEM_TABLE, m.MemoryTable((m.MemoryRegion(0, 0x1000, 0x7000, 0),)), 3),
        (R.ADD_MEM_REG, m.SingleMemoryRegion(m.MemoryRegion(0, 1, 2, 3)), 2),
    ],
)
def test_extra_fds_are_rejected_and_closed(request_: R, payload: object, count: int) -> None:
    conn = negotiated()
    fds = make_fds(count)
    event = rejected(conn, m.encode_request(request_, payload), fds)  # type: ignore[arg-type]
    assert isinstance(event.error, IncorrectFds)
    assert event.error.received == count
    assert not any(is_open(fd) for fd in fds)
    still_works(conn)


def test_memory_table_fewer_fds_than_regions() -> None:
    conn = negotiated()
    regions = (m.MemoryRegion(0, 0x1000, 0x7000, 0), m.MemoryRegion(0x1000, 0x1000, 0x9000, 0))
    fds = make_fds(1)
    event = rejected(conn, m.encode_request(R.SET_MEM_TABLE, m.MemoryTable(regions)), fds)
    assert isinstance(event.error, IncorrectFds) and event.error.received == 1
    assert not is_open(fds[0])


def test_memory_table_shape_checks() -> None:
    conn = negotiated()
    nine = m.MemoryTable(tuple(m.MemoryRegion(i << 20, 0x1000, i << 20, 0) for i in range(9)))
    event = rejected(conn, m.encode_request(R.SET_MEM_TABLE, nine), make_fds(9))
    assert isinstance(event.error, InvalidMessage) and "at most 8" in str(event.error)
    empty = m.MemoryTable((m.MemoryRegion(0, 0, 0x7000, 0),))
    event = rejected(conn, m.encode_request(R.SET_MEM_TABLE, empty), make_fds(1))
    assert "size 0" in str(event.error)
    wrap = m.MemoryTable((m.MemoryRegion((1 << 64) - 0x1000, 0x2000, 0x7000, 0),))
    event = rejected(conn, m.encode_request(R.SET_MEM_TABLE, wrap), make_fds(1))
    assert "wraps" in str(event.error)


def test_rem_mem_reg_tolerates_one_fd_and_closes_it() -> None:
    conn = negotiated()
    fds = make_fds(1)
    region = m.SingleMemoryRegion(m.MemoryRegion(0, 0x1000, 0x7000, 0))
    event = one_event(conn, m.encode_request(R.REM_MEM_REG, region), fds)
    assert isinstance(event, Request) and event.fds == ()
    assert not is_open(fds[0])


def test_unknown_request_is_rejected_and_its_fds_closed() -> None:
    conn = negotiated()
    fds = make_fds(2)
    event = rejected(conn, raw(99, payload=bytes(16)), fds)
    assert isinstance(event.error, UnknownRequest)
    assert event.request == 99 and event.reply is Reply.NONE
    assert not any(is_open(fd) for fd in fds)
    assert conn.reject(event) == (b"", [])
    # With NEED_REPLY the front-end waits: a failed ack answers it (REPLY_ACK section).
    event = rejected(conn, raw(0, flags=0x9))
    assert event.reply is Reply.ACK
    out = conn.reject(event)
    assert out == (raw(0, flags=0x5, payload=m.U64(1).pack()), [])
    still_works(conn)


def test_oversized_header_is_fatal() -> None:
    conn = negotiated()
    fds = make_fds(1)
    conn.receive_data(raw(R.SET_CONFIG, size=m.MAX_PAYLOAD_SIZE + 1), fds)
    with pytest.raises(OversizedMessage) as info:
        conn.next_event()
    assert info.value.size == m.MAX_PAYLOAD_SIZE + 1
    assert isinstance(info.value, DriverError)
    assert conn.state is ConnectionState.ERROR
    assert not is_open(fds[0])


def test_max_payload_size_is_accepted() -> None:
    conn = negotiated()
    event = one_event(conn, raw(R.CREATE_CRYPTO_SESSION, payload=bytes(m.MAX_PAYLOAD_SIZE)))
    assert isinstance(event, Request) and len(event.payload.data) == m.MAX_PAYLOAD_SIZE


@pytest.mark.parametrize(
    ("request_", "payload", "feature"),
    [
        (R.GET_CONFIG, m.ConfigSpace(0, 0, bytes(4)), PF.CONFIG),
        (R.GET_MAX_MEM_SLOTS, None, PF.CONFIGURE_MEM_SLOTS),
        (R.SET_STATUS, m.U64(1), PF.STATUS),
        (R.RESET_DEVICE, None, PF.RESET_DEVICE),
        (R.GET_QUEUE_NUM, None, PF.MQ),
        (R.VRING_KICK, m.VringState(0, 0), PF.INBAND_NOTIFICATIONS),
    ],
)
def test_ungated_requests_are_rejected(request_: R, payload: object, feature: PF) -> None:
    conn = negotiated(PF.REPLY_ACK.mask)
    event = rejected(conn, m.encode_request(request_, payload))  # type: ignore[arg-type]
    assert isinstance(event.error, ProtocolFeatureNotNegotiated)
    assert event.error.feature is feature
    still_works(conn)


def test_gated_log_base_fd_is_closed() -> None:
    conn = negotiated(0)
    fds = make_fds(1)
    event = rejected(conn, m.encode_request(R.SET_LOG_BASE, m.LogDescription(4096, 0)), fds)
    assert isinstance(event.error, ProtocolFeatureNotNegotiated)
    assert event.reply is Reply.EXPLICIT
    assert conn.reject(event) == (m.encode_reply(R.SET_LOG_BASE, 1), [])
    assert not is_open(fds[0])


def test_protocol_features_need_bit_30_in_our_get_features_reply() -> None:
    conn = BackendConnection()
    event = rejected(conn, m.encode_request(R.GET_PROTOCOL_FEATURES))
    assert isinstance(event.error, ProtocolFeatureNotNegotiated) and event.error.feature is None
    assert event.reply is Reply.EXPLICIT
    assert conn.reject(event) is None  # no way to say "failed": the server closes
    event = one_event(conn, m.encode_request(R.GET_FEATURES))
    conn.send_reply(event, 1 << 32)  # no PROTOCOL_FEATURES bit
    assert conn.offered_features == 1 << 32
    event = rejected(conn, m.encode_request(R.SET_VRING_ENABLE, m.VringState(0, 1)))
    assert isinstance(event.error, ProtocolFeatureNotNegotiated)


def test_negotiation_is_tracked() -> None:
    conn = BackendConnection(features=OFFERED, protocol_features=ALL_FEATURES)
    assert not conn.reply_ack
    event = one_event(conn, m.encode_request(R.SET_PROTOCOL_FEATURES, PF.REPLY_ACK.mask))
    assert isinstance(event, Request) and event.reply is Reply.NONE
    assert conn.reply_ack and conn.protocol_features == PF.REPLY_ACK.mask
    event = one_event(conn, m.encode_request(R.SET_FEATURES, OFFERED))
    assert conn.acked_features == OFFERED
    event = rejected(conn, m.encode_request(R.GET_CONFIG, m.ConfigSpace(0, 0, bytes(4))))
    assert isinstance(event.error, ProtocolFeatureNotNegotiated)
    assert conn.reject(event) == (m.encode_reply(R.GET_CONFIG, b""), [])


def test_protocol_features_must_have_been_offered() -> None:
    conn = negotiated(PF.MQ.mask)
    event = rejected(conn, m.encode_request(R.SET_PROTOCOL_FEATURES, PF.MQ.mask | PF.STATUS.mask))
    assert isinstance(event.error, InvalidMessage)
    assert conn.protocol_features == PF.MQ.mask


def test_inband_notifications_without_backend_req_and_reply_ack_is_fatal() -> None:
    conn = negotiated()
    conn.receive_data(m.encode_request(R.SET_PROTOCOL_FEATURES, PF.INBAND_NOTIFICATIONS.mask))
    with pytest.raises(InvalidMessage) as info:
        conn.next_event()
    assert info.value.section == "vhost-user: In-band notifications"
    assert conn.state is ConnectionState.ERROR


def test_vring_index_range_checks() -> None:
    conn = negotiated(max_queues=2)
    for request_, payload in [
        (R.SET_VRING_NUM, m.VringState(2, 64)),
        (R.SET_VRING_ADDR, m.VringAddr(5, 0, 0, 0, 0, 0)),
        (R.GET_VRING_BASE, m.VringState(2, 0)),
        (R.SET_VRING_ENABLE, m.VringState(7, 1)),
    ]:
        event = rejected(conn, m.encode_request(request_, payload))
        assert isinstance(event.error, InvalidMessage) and "out of range" in str(event.error)
    fds = make_fds(1)
    event = rejected(conn, m.encode_request(R.SET_VRING_KICK, m.VringFd(3)), fds)
    assert not is_open(fds[0])
    for bad in (m.VringState(0, 0), m.VringState(0, 32769)):
        event = rejected(conn, m.encode_request(R.SET_VRING_NUM, bad))
        assert "queue size" in str(event.error)
    event = rejected(conn, m.encode_request(R.SET_VRING_ENABLE, m.VringState(0, 2)))
    assert isinstance(event.error, InvalidMessage)
    event = rejected(conn, m.encode_request(R.SET_VRING_KICK, (1 << 9) | 1))
    assert "bits" in str(event.error)


def test_config_shape_checks() -> None:
    conn = negotiated()
    bad_flags = m.ConfigSpace(0, 2, bytes(4))
    assert isinstance(
        rejected(conn, m.encode_request(R.SET_CONFIG, bad_flags)).error, InvalidMessage
    )
    too_big = struct.pack("=III", 0, 300, 0) + bytes(300)
    assert isinstance(rejected(conn, raw(R.GET_CONFIG, payload=too_big)).error, PayloadSizeMismatch)
    lying = struct.pack("=III", 0, 8, 0) + bytes(4)
    assert isinstance(rejected(conn, raw(R.GET_CONFIG, payload=lying)).error, PayloadSizeMismatch)


# ---------------------------------------------------------------- end of file


def test_clean_eof_between_messages() -> None:
    conn = negotiated()
    fds = make_fds(1)
    conn.receive_data(b"", fds)
    assert not is_open(fds[0])
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert conn.state is ConnectionState.CLOSED


@pytest.mark.parametrize("cut", [1, 11, 12, 19])
def test_eof_mid_message_is_partial_message(cut: int) -> None:
    conn = negotiated()
    fds = make_fds(1)
    conn.receive_data(m.encode_request(R.SET_VRING_KICK, m.VringFd(0))[:cut], fds)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(PartialMessage) as info:
        conn.next_event()
    assert info.value.received == cut
    assert info.value.expected == (20 if cut >= 12 else None)
    assert not is_open(fds[0])
    assert conn.state is ConnectionState.ERROR


def test_close_releases_buffered_fds() -> None:
    conn = negotiated()
    fds = make_fds(1)
    conn.receive_data(m.encode_request(R.SET_VRING_KICK, m.VringFd(0))[:13], fds)
    assert conn.statistics().buffered_fds == 1
    conn.close()
    assert not is_open(fds[0])
    assert conn.state is ConnectionState.CLOSED


# ---------------------------------------------------------------- replies


def test_explicit_replies() -> None:
    conn = negotiated()
    event = one_event(conn, m.encode_request(R.GET_VRING_BASE, m.VringState(1, 0)))
    assert event.reply is Reply.EXPLICIT
    out = conn.send_reply(event, m.VringState(1, 42))
    assert out.data == m.HEADER.pack(11, 0x5, 8) + m.VringState(1, 42).pack()
    assert out.fds == []
    with pytest.raises(DeviceUsageError):
        conn.send_reply(event, m.VringState(1, 42))  # already answered


def test_reply_fds() -> None:
    conn = negotiated()
    event = one_event(conn, m.encode_request(R.GET_INFLIGHT_FD, m.InflightDescription(0, 0, 1, 8)))
    with pytest.raises(DeviceUsageError):
        conn.send_reply(event, m.InflightDescription(4096, 0, 1, 8), [5, 6])
    out = conn.send_reply(event, m.InflightDescription(4096, 0, 1, 8), [5])
    assert out.fds == [5]
    assert len(out.data) == 12 + m.INFLIGHT_WIRE_SIZE


def test_need_reply_ack() -> None:
    conn = negotiated()
    data = m.encode_request(R.SET_VRING_NUM, m.VringState(0, 256), need_reply=True)
    event = one_event(conn, data)
    assert event.need_reply and event.reply is Reply.ACK
    assert conn.pending_replies == (event,)
    with pytest.raises(DeviceUsageError):
        conn.send_reply(event, 0)
    assert conn.ack(event) == (m.HEADER.pack(8, 0x5, 8) + m.U64(0).pack(), [])
    assert conn.pending_replies == ()
    event = one_event(conn, data)
    assert conn.ack(event, success=False).data == m.HEADER.pack(8, 0x5, 8) + m.U64(1).pack()


def test_ack_without_need_reply_sends_nothing() -> None:
    conn = negotiated()
    event = one_event(conn, m.encode_request(R.SET_VRING_NUM, m.VringState(0, 256)))
    assert event.reply is Reply.NONE
    assert conn.ack(event) == (b"", [])


def test_need_reply_on_request_with_explicit_reply_adds_no_ack() -> None:
    conn = negotiated()
    event = one_event(conn, m.encode_request(R.GET_FEATURES, need_reply=True))
    assert event.reply is Reply.EXPLICIT
    with pytest.raises(DeviceUsageError):
        conn.ack(event)
    out = conn.send_reply(event, OFFERED)
    assert out.data == m.encode_reply(R.GET_FEATURES, OFFERED)


def test_replies_go_out_in_order() -> None:
    conn = negotiated()
    conn.receive_data(
        m.encode_request(R.GET_STATUS) + m.encode_request(R.SET_STATUS, 0xF, need_reply=True)
    )
    first, second = conn.next_event(), conn.next_event()
    with pytest.raises(DeviceUsageError):
        conn.ack(second)
    conn.send_reply(first, 0xF)
    conn.ack(second)
    assert conn.statistics().pending_replies == 0


def test_postcopy_mode_makes_mem_table_reply() -> None:
    conn = negotiated()
    region = m.MemoryRegion(0, 0x1000, 0x7000, 0)
    table = m.encode_request(R.SET_MEM_TABLE, m.MemoryTable((region,)))
    fds = make_fds(2)
    assert one_event(conn, table, fds[:1]).reply is Reply.NONE
    assert one_event(conn, m.encode_request(R.POSTCOPY_LISTEN, need_reply=True)).reply is Reply.ACK
    assert conn.postcopy_listening
    conn.ack(conn.pending_replies[0])
    event = one_event(conn, table, fds[1:])
    assert event.reply is Reply.EXPLICIT
    conn.send_reply(event, m.MemoryTable((region,)))
    # QEMU's acknowledgement: SET_MEM_TABLE with a u64 0; nothing to reply.
    ack = one_event(conn, m.encode_request(R.SET_MEM_TABLE, 0))
    assert ack.payload == m.U64(0) and ack.reply is Reply.NONE
    single = m.SingleMemoryRegion(region)
    add = one_event(conn, m.encode_request(R.ADD_MEM_REG, single), make_fds(1))
    assert add.reply is Reply.EXPLICIT
    conn.send_reply(add, single)
    os.close(add.fds[0])
    ack = one_event(conn, m.encode_request(R.ADD_MEM_REG, 0))  # the memory-slots variant
    assert ack.payload == m.U64(0) and ack.reply is Reply.NONE
    stray = make_fds(1)
    assert isinstance(rejected(conn, m.encode_request(R.REM_MEM_REG, 0), stray).error, IncorrectFds)
    assert not is_open(stray[0])
    assert conn.pending_replies == ()
    end = one_event(conn, m.encode_request(R.POSTCOPY_END))
    conn.send_reply(end, 0)
    assert not conn.postcopy_listening
    for fd in fds:
        os.close(fd)


def test_reject_status_replies() -> None:
    conn = negotiated(0)
    fds = make_fds(1)
    state = m.DeviceStateTransfer(m.TransferDirection.LOAD, m.MigrationPhase.STOPPED)
    event = rejected(conn, m.encode_request(R.SET_DEVICE_STATE_FD, state), fds)
    out = conn.reject(event)
    assert out == (m.encode_reply(R.SET_DEVICE_STATE_FD, 1 | m.VHOST_USER_VRING_NOFD_MASK), [])


def test_statistics_and_errors_are_driver_errors() -> None:
    conn = negotiated()
    rejected(conn, raw(77))
    stats = conn.statistics()
    assert stats.requests == 3 and stats.rejected == 1 and stats.state is ConnectionState.OPEN
    for cls in (InvalidMessage, IncorrectFds, OversizedMessage, UnknownRequest, PartialMessage):
        assert issubclass(cls, VhostUserProtocolError) and issubclass(cls, DriverError)
    assert "vhost-user: Front-end message types" in str(UnknownRequest(77))


# ---------------------------------------------------------------- property tests

chunks_strategy = st.lists(
    st.tuples(st.binary(min_size=1, max_size=64), st.integers(0, 3)), min_size=1, max_size=12
)


def _header_and_payload() -> st.SearchStrategy[bytes]:
    requests = st.one_of(st.sampled_from(list(R)), st.integers(0, 60))
    flags = st.one_of(st.sampled_from([1, 5, 9, 0xD]), st.integers(0, 0xFF))
    return st.builds(
        lambda r, f, payload, lie: (
            m.HEADER.pack(r, f, len(payload) if lie is None else lie) + payload
        ),
        requests,
        flags,
        st.one_of(
            st.binary(max_size=80),
            st.sampled_from([m.VringState(0, 8).pack(), m.VringFd(1).pack(), m.U64(0).pack()]),
        ),
        st.one_of(st.none(), st.integers(0, 0x2000)),
    )


structured_strategy = st.lists(
    st.tuples(_header_and_payload(), st.integers(0, 3)), min_size=1, max_size=10
)


def _drive(conn: BackendConnection, chunks: list[tuple[bytes, int]], eof: bool) -> None:
    """Feed everything; answer every event; check fd ownership at the end."""
    total = sum(count for _, count in chunks)
    all_fds = make_fds(total)  # all created up front: fd numbers are not reused meanwhile
    it = iter(all_fds)
    delivered: list[int] = []
    feed = [(data, [next(it) for _ in range(count)]) for data, count in chunks]
    if eof:
        feed.append((b"", []))
    for data, fds in feed:
        try:
            conn.receive_data(data, fds)
        except DeviceUsageError:
            # Feeding a dead or finished connection: refused, and the fds closed.
            assert conn.state is not ConnectionState.OPEN or data == b""
            continue
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA or isinstance(event, ConnectionClosed):
                    break
                if isinstance(event, Request):
                    assert len(event.fds) <= 8
                    delivered += event.fds
                    if event.reply is Reply.EXPLICIT:
                        conn.send_reply(event, b"")
                    else:
                        conn.ack(event)
                else:
                    assert isinstance(event, RejectedRequest)
                    assert isinstance(event.error, VhostUserProtocolError)
                    conn.reject(event)
        except VhostUserProtocolError:
            assert conn.state is ConnectionState.ERROR
    conn.close()
    assert len(set(delivered)) == len(delivered)
    for fd in all_fds:
        if fd in delivered:
            assert is_open(fd)
            os.close(fd)
        else:
            assert not is_open(fd), f"fd {fd} leaked"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=chunks_strategy, eof=st.booleans())
def test_random_bytes_only_give_events_or_typed_errors(
    chunks: list[tuple[bytes, int]], eof: bool
) -> None:
    _drive(BackendConnection(max_queues=4), chunks, eof)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=structured_strategy, eof=st.booleans(), negotiate=st.booleans())
def test_random_messages_only_give_events_or_typed_errors(
    chunks: list[tuple[bytes, int]], eof: bool, negotiate: bool
) -> None:
    conn = negotiated(max_queues=4) if negotiate else BackendConnection(max_queues=4)
    _drive(conn, chunks, eof)


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(1, 40), min_size=1, max_size=20))
def test_chunking_does_not_change_events(cuts: list[int]) -> None:
    """Any split of fd-less bytes gives the same events as feeding them whole."""
    msgs = [
        m.encode_request(R.SET_VRING_NUM, m.VringState(i, 16)) + m.encode_request(R.GET_STATUS)
        for i in range(4)
    ]
    blob = b"".join(msgs)
    whole = negotiated(max_queues=4)
    whole.receive_data(blob)
    expected = []
    while (event := whole.next_event()) is not NEED_DATA:
        expected.append((event.request, event.payload))
    conn = negotiated(max_queues=4)
    got = []
    pos = 0
    for cut in [*cuts, len(blob)]:
        if pos >= len(blob):
            break
        conn.receive_data(blob[pos : pos + cut])
        pos += cut
        while (event := conn.next_event()) is not NEED_DATA:
            got.append((event.request, event.payload))
    assert got == expected


@pytest.mark.parametrize(
    ("request_", "payload"),
    [
        (R.IOTLB_MSG, m.IotlbMessage(0, 0x1000, 0, 4, m.IotlbType.UPDATE)),
        (R.IOTLB_MSG, m.IotlbMessage(0, 0x1000, 0, 3, m.IotlbType.MISS)),
        (R.SET_DEVICE_STATE_FD, struct.pack("=II", 2, 0)),
        (R.SET_DEVICE_STATE_FD, struct.pack("=II", 0, 1)),
        (R.SET_CONFIG, struct.pack("=III", 0xFFFF_FFFF, 4, 0) + bytes(4)),
        (R.SET_VRING_ENDIAN, m.VringState(0, 2)),
    ],
)
def test_field_range_checks(request_: R, payload: object) -> None:
    conn = negotiated()
    fds = make_fds(1) if request_ is R.SET_DEVICE_STATE_FD else []
    event = rejected(conn, m.encode_request(request_, payload), fds)  # type: ignore[arg-type]
    assert type(event.error) is InvalidMessage
    assert event.error.request is request_
    assert not any(is_open(fd) for fd in fds)


def test_iotlb_accepts_unpadded_26_bytes() -> None:
    conn = negotiated()
    msg = m.IotlbMessage(0x1000, 0x1000, 0x7000, 1, m.IotlbType.INVALIDATE)
    event = one_event(conn, raw(R.IOTLB_MSG, payload=msg.pack()[:26]))
    assert isinstance(event, Request) and event.payload == msg


def test_receive_after_close_is_refused_and_fds_closed() -> None:
    conn = negotiated()
    conn.close()
    assert isinstance(conn.next_event(), ConnectionClosed)
    fds = make_fds(1)
    with pytest.raises(DeviceUsageError):
        conn.receive_data(b"\0", fds)
    assert not is_open(fds[0])
