"""A packet in flight between ports: its ``virtio_net_hdr`` fields and its frame
(virtio 1.4 §5.1.9), and the checks a transmitted one must pass.

The header travels with the frame through the switch (``switch.py``), so a TSO or
partial-checksum packet reaches a port that negotiated the matching guest offloads
unchanged; ``offload.py`` finishes it in software for one that did not.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtio.spec.net import NetHdrFlag, NetHdrGso
from virtio.spec.sections import S_5_1_9, S_5_1_9_2_1, S_5_1_9_2_2

HDR = struct.Struct("<BBHHHHH")
"""``struct virtio_net_hdr`` with ``num_buffers`` (12 bytes, §5.1.9)."""
HDR_LEGACY = struct.Struct("<BBHHHH")
"""Without ``num_buffers``: legacy drivers without MRG_RXBUF (§5.1.9.1)."""

NEEDS_CSUM = int(NetHdrFlag.VIRTIO_NET_HDR_F_NEEDS_CSUM)
DATA_VALID = int(NetHdrFlag.VIRTIO_NET_HDR_F_DATA_VALID)
GSO_NONE = int(NetHdrGso.VIRTIO_NET_HDR_GSO_NONE)
GSO_TCPV4 = int(NetHdrGso.VIRTIO_NET_HDR_GSO_TCPV4)
GSO_TCPV6 = int(NetHdrGso.VIRTIO_NET_HDR_GSO_TCPV6)
GSO_ECN = int(NetHdrGso.VIRTIO_NET_HDR_GSO_ECN)

ETH_HLEN = 14
VLAN_HLEN = 4
MIN_FRAME = ETH_HLEN
MAX_GSO_FRAME = 65535 + ETH_HLEN + VLAN_HLEN
"""The largest frame a port may send: an IP packet of 64 KiB with its link header."""
MAX_SEGMENTS = 1024
"""A GSO packet cut into more segments than this is refused (a tiny ``gso_size``
would make one packet cost thousands of frames; TCP's smallest usable MSS cuts 64 KiB
into fewer than 800)."""


@dataclass(slots=True)
class Packet:
    """One Ethernet frame and its offload state (``virtio_net_hdr`` fields)."""

    frame: bytes
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @property
    def dst(self) -> bytes:
        return self.frame[0:6]

    @property
    def src(self) -> bytes:
        return self.frame[6:12]

    @property
    def gso(self) -> int:
        """The GSO type without the ECN bit."""
        return self.gso_type & ~GSO_ECN

    def header(self, num_buffers: int = 1, *, legacy: bool = False) -> bytes:
        """The header for a receive buffer (``num_buffers``, §5.1.9.4)."""
        if legacy:
            return HDR_LEGACY.pack(
                self.flags,
                self.gso_type,
                self.hdr_len,
                self.gso_size,
                self.csum_start,
                self.csum_offset,
            )
        return HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            num_buffers,
        )

    @classmethod
    def parse(cls, data: bytes, hdr_size: int = HDR.size) -> Packet:
        """Header + frame as a driver (or a tap) sent them; ``hdr_size`` is 12, or 10
        for a legacy header (§5.1.9.1).  ``ValueError`` if shorter than the header."""
        if len(data) < hdr_size:
            raise ValueError(f"{len(data)} bytes: shorter than the {hdr_size}-byte header")
        flags, gso_type, hdr_len, gso_size, start, offset = HDR_LEGACY.unpack_from(data)
        return cls(data[hdr_size:], flags, gso_type, hdr_len, gso_size, start, offset)


@dataclass(frozen=True, slots=True)
class TxOffloads:
    """What a port's driver may ask of the device on transmit (negotiated
    VIRTIO_NET_F_CSUM, HOST_TSO4/6, HOST_ECN; §5.1.3)."""

    csum: bool = False
    tso4: bool = False
    tso6: bool = False
    ecn: bool = False


class PacketRefused(ValueError):
    """A transmitted packet the device drops (counted under ``reason``)."""

    def __init__(self, reason: str, message: str, section: str) -> None:
        super().__init__(f"{message} (virtio 1.4 §{section})")
        self.reason = reason
        self.section = section


def check_transmit(packet: Packet, offloads: TxOffloads, mtu: int) -> None:
    """Refuse a packet the driver may not send or the device cannot take:
    ``PacketRefused`` names the reason and the clause.  ``mtu`` bounds frames without
    GSO (the frame may add an Ethernet header and one VLAN tag)."""
    n = len(packet.frame)
    drv = S_5_1_9_2_1.number
    if n < MIN_FRAME:
        raise PacketRefused("runt", f"frame of {n} bytes: no Ethernet header", S_5_1_9.number)
    if n > MAX_GSO_FRAME:
        raise PacketRefused("oversized", f"frame of {n} bytes: over 64 KiB", S_5_1_9.number)
    gso = packet.gso
    if gso == GSO_NONE and packet.gso_type & GSO_ECN:
        raise PacketRefused("bad_gso", "GSO_ECN set without a GSO type", drv)
    if gso == GSO_NONE and n > mtu + ETH_HLEN + VLAN_HLEN:
        raise PacketRefused(
            "oversized", f"frame of {n} bytes exceeds the MTU {mtu} without GSO", drv
        )
    if packet.flags & NEEDS_CSUM:
        if not offloads.csum:
            raise PacketRefused(
                "bad_csum", "VIRTIO_NET_HDR_F_NEEDS_CSUM without VIRTIO_NET_F_CSUM", drv
            )
        end = packet.csum_start + packet.csum_offset + 2
        if packet.csum_start >= n or end > n:
            raise PacketRefused(
                "bad_csum",
                f"csum_start {packet.csum_start} + csum_offset {packet.csum_offset} "
                f"outside the {n}-byte frame",
                drv,
            )
    if gso == GSO_NONE:
        return
    allowed = {GSO_TCPV4: offloads.tso4, GSO_TCPV6: offloads.tso6}
    if not allowed.get(gso, False):
        raise PacketRefused("bad_gso", f"gso_type {packet.gso_type:#x} not negotiated", drv)
    if packet.gso_type & GSO_ECN and not offloads.ecn:
        raise PacketRefused("bad_gso", "VIRTIO_NET_HDR_GSO_ECN without HOST_ECN", drv)
    if not packet.flags & NEEDS_CSUM:
        raise PacketRefused("bad_gso", "a GSO packet without NEEDS_CSUM", drv)
    if packet.gso_size == 0:
        raise PacketRefused("bad_gso", "gso_size 0", drv)
    if (n - ETH_HLEN) // packet.gso_size > MAX_SEGMENTS:
        raise PacketRefused(
            "bad_gso",
            f"gso_size {packet.gso_size} cuts {n} bytes into over {MAX_SEGMENTS} segments",
            S_5_1_9_2_2.number,
        )
