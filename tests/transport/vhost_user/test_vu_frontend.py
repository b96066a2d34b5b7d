"""Sans-IO vhost-user front-end (``FrontendConnection``): requests encoded from the
``REQUESTS`` table, every reply checked, typed errors for broken replies."""

from __future__ import annotations

import os

import pytest

from virtio.testing.fds import is_open
from virtio.transport.vhost_user.frontend import (
    Ack,
    BackendDisconnected,
    FrontendConnection,
    InvalidReply,
    Response,
)
from virtio.transport.vhost_user.messages import (
    CONFIG_HEADER_SIZE,
    HEADER,
    ConfigSpace,
    HeaderFlags,
    InflightDescription,
    VringState,
    encode_ack,
    encode_reply,
)
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.messages import ProtocolFeature as PF
from virtio.transport.vhost_user.protocol import (
    NEED_DATA,
    BackendConnection,
    ConnectionClosed,
    ConnectionState,
    Reply,
    Request,
)

REPLY = 1 | HeaderFlags.REPLY


def feed(conn: FrontendConnection, data: bytes, fds=(), *, bytewise: bool = False):
    if bytewise:
        for i in range(len(data)):
            conn.receive_data(data[i : i + 1], fds if i == len(data) - 1 else ())
    else:
        conn.receive_data(data, fds)
    return conn.next_event()


def test_round_trip_with_backend_connection():
    """Both sans-IO ends in memory: negotiation, REPLY_ACK, explicit replies."""
    fe, be = FrontendConnection(), BackendConnection(max_queues=1)

    def exchange(out, answer):
        be.receive_data(out.data, out.fds)
        req = be.next_event()
        assert isinstance(req, Request)
        reply = answer(req)
        return feed(fe, reply.data, reply.fds, bytewise=True)

    r = exchange(fe.send_request(R.GET_FEATURES), lambda q: be.send_reply(q, 1 << 30 | 1 << 32))
    assert isinstance(r, Response) and r.u64 == 1 << 30 | 1 << 32
    assert fe.offered_features == r.u64
    r = exchange(
        fe.send_request(R.GET_PROTOCOL_FEATURES), lambda q: be.send_reply(q, PF.REPLY_ACK.mask)
    )
    out = fe.send_request(R.SET_PROTOCOL_FEATURES, PF.REPLY_ACK.mask)
    assert not fe.pending_replies  # REPLY_ACK applies from the next request on
    be.receive_data(out.data)
    assert be.next_event().reply is Reply.NONE
    assert fe.reply_ack
    # now every request without an explicit reply asks for an ack ...
    out = fe.send_request(R.SET_OWNER)
    assert HEADER.unpack_from(out.data)[1] & HeaderFlags.NEED_REPLY
    ack = exchange(out, lambda q: be.ack(q, False))
    assert ack == Ack(R.SET_OWNER, 1) and not ack.ok
    # ... but not one with an explicit reply
    out = fe.send_request(R.GET_VRING_BASE, VringState(0, 0))
    assert not HEADER.unpack_from(out.data)[1] & HeaderFlags.NEED_REPLY
    r = exchange(out, lambda q: be.send_reply(q, VringState(0, 7)))
    assert VringState.unpack(r.payload) == VringState(0, 7)
    assert fe.next_event() is NEED_DATA


def _waiting(request=R.GET_FEATURES, **kw) -> FrontendConnection:
    fe = FrontendConnection(name="fake")
    fe.send_request(request, **kw)
    return fe


BAD_REPLIES = {
    "wrong size": (R.GET_FEATURES, encode_reply(R.GET_FEATURES, b"\0" * 4), "4 bytes, expected 8"),
    "wrong request": (R.GET_FEATURES, encode_reply(R.GET_QUEUE_NUM, 0), "answered GET_QUEUE_NUM"),
    "no REPLY flag": (R.GET_FEATURES, HEADER.pack(R.GET_FEATURES, 1, 8) + bytes(8), "lack REPLY"),
    "version 2": (
        R.GET_FEATURES,
        HEADER.pack(R.GET_FEATURES, 2 | HeaderFlags.REPLY, 8) + bytes(8),
        "version 2",
    ),
    "oversized": (R.GET_FEATURES, HEADER.pack(R.GET_FEATURES, REPLY, 1 << 20), "payload of"),
    "config size": (
        R.GET_CONFIG,
        encode_reply(R.GET_CONFIG, bytes(CONFIG_HEADER_SIZE + 3)),
        "15 bytes, expected 0 or 20",
    ),
    "vring state size": (
        R.GET_VRING_BASE,
        encode_reply(R.GET_VRING_BASE, bytes(4)),
        "4 bytes, expected 8",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES.values()), ids=list(BAD_REPLIES))
def test_broken_replies_are_typed_errors(case):
    request, data, text = case
    payload = {R.GET_CONFIG: ConfigSpace(0, 0, bytes(8)), R.GET_VRING_BASE: VringState(0, 0)}
    fe = FrontendConnection(name="fake")
    fe.send_request(request, payload.get(request))
    with pytest.raises(InvalidReply, match=text) as info:
        feed(fe, data)
    assert info.value.section.startswith("vhost-user: ")
    assert fe.state is ConnectionState.ERROR
    # the stream may be out of sync: everything after is refused
    with pytest.raises(InvalidReply, match="unusable"):
        fe.send_request(R.GET_FEATURES)


def test_unexpected_fds_are_closed_and_refused():
    fe = _waiting(R.SET_OWNER, need_reply=True)
    r, w = os.pipe()
    with pytest.raises(InvalidReply, match="1 file descriptor"):
        feed(fe, encode_ack(R.SET_OWNER), [w])
    assert not is_open(w)
    os.close(r)
    # GET_INFLIGHT_FD may carry one fd, not two
    fe = _waiting(R.GET_INFLIGHT_FD)
    fds = [os.eventfd(0), os.eventfd(0)]
    data = encode_reply(R.GET_INFLIGHT_FD, InflightDescription(4096, 0, 1, 16))
    with pytest.raises(InvalidReply, match="2 file descriptor"):
        feed(fe, data, fds)
    assert not any(is_open(fd) for fd in fds)
    fe = _waiting(R.GET_INFLIGHT_FD)
    fd = os.eventfd(0)
    event = feed(fe, data, [fd])
    assert isinstance(event, Response) and event.fds == (fd,)
    os.close(fd)


def test_ack_failure_and_ack_size():
    fe = _waiting(R.SET_OWNER, need_reply=True)
    assert feed(fe, encode_ack(R.SET_OWNER, False)) == Ack(R.SET_OWNER, 1)
    fe = _waiting(R.SET_OWNER, need_reply=True)
    with pytest.raises(InvalidReply, match="REPLY_ACK of 4 bytes"):
        feed(fe, encode_reply(R.SET_OWNER, bytes(4)))


def test_empty_config_reply_is_a_failure_not_a_format_error():
    fe = _waiting(R.GET_CONFIG)  # no payload: asks for 0 bytes
    event = feed(fe, encode_reply(R.GET_CONFIG, b""))
    assert isinstance(event, Response) and event.payload == b""


def test_unsolicited_reply_and_end_of_file():
    fe = FrontendConnection(name="fake")
    with pytest.raises(InvalidReply, match="unsolicited"):
        feed(fe, encode_ack(R.SET_OWNER))
    fe = _waiting()
    fe.receive_data(encode_reply(R.GET_FEATURES, 0)[:5])
    assert fe.next_event() is NEED_DATA
    with pytest.raises(BackendDisconnected, match="GET_FEATURES waited for its reply"):
        feed(fe, b"")
    fe = FrontendConnection()
    assert isinstance(feed(fe, b""), ConnectionClosed)


def test_raw_requests_for_hostile_tests():
    """Unknown numbers and malformed payloads go out as they are; ``expect_reply``
    checks only the header of the answer."""
    fe = FrontendConnection()
    out = fe.send_request(99, b"xyz", need_reply=True)
    assert HEADER.unpack_from(out.data) == (99, 1 | HeaderFlags.NEED_REPLY, 3)
    assert feed(fe, encode_ack(99, False)) == Ack(99, 1)
    fe.expect_reply(R.SET_VRING_NUM)
    event = feed(fe, encode_reply(R.SET_VRING_NUM, b"\1\2\3"))
    assert isinstance(event, Response) and event.payload == b"\1\2\3"
