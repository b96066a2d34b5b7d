"""The tap uplink: a Linux tap interface as one port of the switch.

Opened as QEMU's tap netdev opens it (Linux ``Documentation/networking/tuntap.rst``):
``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` with a 12-byte ``virtio_net_hdr``
(``TUNSETVNETHDRSZ``), and ``TUNSETOFFLOAD`` (checksum, TSO4/6, TSO-ECN) so the host
kernel hands us partial-checksum and TSO packets and takes ours as they are: the
offloads pass through between guests and the host stack.  Frames the kernel sends
are checked like a guest's (``check_transmit``) before they reach the switch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct

import trio

from virtio.devices.net.offload import RxOffloads
from virtio.devices.net.packet import (
    HDR,
    MAX_GSO_FRAME,
    Packet,
    PacketRefused,
    TxOffloads,
    check_transmit,
)
from virtio.devices.net.switch import Switch

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
ALL_OFFLOADS = RxOffloads(csum=True, tso4=True, tso6=True, ecn=True)
_TX = TxOffloads(csum=True, tso4=True, tso6=True, ecn=True)


class TapPort:
    """A switch port on tap interface ``ifname`` (created if it does not exist)."""

    rx_offloads = ALL_OFFLOADS

    def __init__(self, ifname: str, switch: Switch) -> None:
        if not 0 < len(ifname.encode()) < 16:
            raise ValueError(f"interface name {ifname!r}: 1 to 15 bytes")
        self.name = f"tap:{ifname}"
        self.ifname = ifname
        self.switch = switch
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", HDR.size))
            offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, offloads)
        except OSError:
            os.close(self.fd)
            raise
        self.write_errors = 0
        switch.add_port(self)

    def deliver(self, packet: Packet) -> bool:
        try:
            os.write(self.fd, packet.header() + packet.frame)
        except BlockingIOError:
            return False
        except OSError as exc:  # EIO: the interface is down
            if exc.errno != errno.EIO:
                log.warning("%s: write: %s", self.name, exc)
            self.write_errors += 1
            return False
        return True

    async def run(self) -> None:
        """Forward what the kernel sends to the switch until cancelled."""
        size = HDR.size + MAX_GSO_FRAME
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            while True:
                try:
                    data = os.read(self.fd, size)
                except BlockingIOError:
                    break
                try:
                    packet = Packet.parse(data)
                    check_transmit(packet, _TX, MAX_GSO_FRAME)
                except PacketRefused as exc:
                    self.switch.drop(self, exc.reason)
                    continue
                except ValueError:
                    self.switch.drop(self, "runt")
                    continue
                self.switch.forward(self, packet)

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.switch.remove_port(self)
        with contextlib.suppress(OSError):
            os.close(self.fd)
