"""VHOST_USER_SEND_RARP (vhost-user ``VHOST_USER_PROTOCOL_F_RARP``) end to end on a
virtio-net port: the front-end's request puts a RARP from the MAC on the switch, which
learns the MAC on that port and floods the frame; a group or zero MAC (untrusted
input) is ignored with a warning and the connection goes on.  The real-guest check is
``tests/integration/test_vu_net_migrate.py``."""

from __future__ import annotations

import logging
import socket

import trio

from virtio.devices.net import Switch, VirtioNet
from virtio.devices.net.offload import RxOffloads
from virtio.testing.vhost_user_frontend import VhostUserFrontend
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.messages import MacAddress, ProtocolFeature
from virtio.transport.vhost_user.server import VhostUserServer

GUEST = bytes.fromhex("52540000130a")


class Listener:
    """A switch port that keeps what it is given."""

    name = "listener"
    rx_offloads = RxOffloads()  # none

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def deliver(self, packet) -> bool:
        self.frames.append(packet.frame)
        return True


async def test_send_rarp_announces_and_bad_macs_are_ignored(caplog) -> None:
    caplog.set_level(logging.INFO)
    switch = Switch()
    port = VirtioNet(name="port1", switch=switch, mac=bytes.fromhex("525400123456"))
    listener = Listener()
    switch.add_port(listener)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            nursery.start_soon(VhostUserServer(port).serve_connection, b)
            fe = VhostUserFrontend(a)
            await fe.negotiate()
            assert fe.protocol_features >> ProtocolFeature.RARP & 1  # offered by net
            for bad in (bytes.fromhex("01005e000001"), bytes(6)):
                await fe.request(R.SEND_RARP, MacAddress(bad), need_reply=fe.reply_ack)
            assert listener.frames == [] and switch.addresses() == {}
            await fe.request(R.SEND_RARP, MacAddress(GUEST), need_reply=fe.reply_ack)
            (frame,) = listener.frames
            assert frame[:6] == b"\xff" * 6 and frame[6:12] == GUEST
            assert frame[12:14] == b"\x80\x35" and frame[20:22] == b"\x00\x03"  # RFC 903
            assert switch.addresses() == {GUEST.hex(":"): "port1"}
            await fe.aclose()
            nursery.cancel_scope.cancel()
    assert caplog.text.count("SEND_RARP for") == 2 and "not a unicast address" in caplog.text
    assert (
        "port1: announcing 52:54:00:00:13:0a (RARP): the switch had it on no port, now on port1"
        in caplog.text
    )
