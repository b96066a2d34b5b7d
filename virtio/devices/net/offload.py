"""Offload translation between ports (virtio 1.4 §5.1.9.4, what DPDK's GSO library
does): a packet reaches a port as the port can take it, never dropped nor corrupted.

* A TSO packet (``gso_type`` TCPV4/TCPV6) goes unchanged to a port that negotiated
  VIRTIO_NET_F_GUEST_TSO4/6 (and GUEST_ECN for the ECN bit); to any other it is cut
  into ``gso_size`` segments (TCP sequence numbers, IPv4 length/id/checksum, IPv6
  payload length, FIN/PSH on the last segment only, CWR on the first only) with
  their checksums complete.
* A partial-checksum packet (NEEDS_CSUM) goes unchanged to a port with
  VIRTIO_NET_F_GUEST_CSUM; for any other the checksum is completed: the
  ones'-complement sum from ``csum_start`` to the end stored at ``csum_start +
  csum_offset`` (§5.1.9.2) and ``flags`` cleared (§5.1.9.4.1: without GUEST_CSUM the
  device MUST set flags to zero).

Sums use the identity 2**16 = 1 (mod 0xFFFF): a byte string's 16-bit one's-complement
sum is the big integer it spells modulo 0xFFFF -- one C-speed operation per packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtio.devices.net.packet import (
    DATA_VALID,
    ETH_HLEN,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    VLAN_HLEN,
    Packet,
)

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
IPPROTO_TCP = 6
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80


@dataclass(frozen=True, slots=True)
class RxOffloads:
    """What a port accepts on receive (negotiated GUEST_CSUM, GUEST_TSO4/6,
    GUEST_ECN; a tap with TUNSETOFFLOAD accepts everything)."""

    csum: bool = False
    tso4: bool = False
    tso6: bool = False
    ecn: bool = False


class OffloadError(ValueError):
    """A GSO packet whose headers cannot be segmented (not Ethernet/IP/TCP)."""


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's-complement sum of ``data`` (odd length: zero-padded)."""
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    s = n % 0xFFFF
    return 0xFFFF if s == 0 and n else s


def fold(*sums: int) -> int:
    s = sum(sums)
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def complete_checksum(frame: bytearray, start: int, offset: int) -> None:
    """Finish a partial checksum in place (§5.1.9.2: NEEDS_CSUM)."""
    csum = ~ones_sum(memoryview(frame)[start:]) & 0xFFFF
    struct.pack_into("!H", frame, start + offset, csum or 0xFFFF)


@dataclass(slots=True)
class _Headers:
    l3: int  # offset of the IP header
    l4: int  # offset of the TCP header
    end: int  # end of the TCP header: payload starts here
    v6: bool


def _parse(frame: bytes, gso: int) -> _Headers:
    if len(frame) < ETH_HLEN:
        raise OffloadError("no Ethernet header")
    l3 = ETH_HLEN
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    if ethertype == ETH_P_8021Q:
        if len(frame) < ETH_HLEN + VLAN_HLEN:
            raise OffloadError("truncated VLAN tag")
        (ethertype,) = struct.unpack_from("!H", frame, 16)
        l3 += VLAN_HLEN
    if gso == GSO_TCPV4:
        if ethertype != ETH_P_IP or len(frame) < l3 + 20:
            raise OffloadError("GSO_TCPV4 on a frame that is not IPv4")
        ihl = (frame[l3] & 0x0F) * 4
        if frame[l3] >> 4 != 4 or ihl < 20 or frame[l3 + 9] != IPPROTO_TCP:
            raise OffloadError("GSO_TCPV4 on an IPv4 packet that is not TCP")
        l4, v6 = l3 + ihl, False
    elif gso == GSO_TCPV6:
        if ethertype != ETH_P_IPV6 or len(frame) < l3 + 40:
            raise OffloadError("GSO_TCPV6 on a frame that is not IPv6")
        if frame[l3 + 6] != IPPROTO_TCP:
            raise OffloadError("GSO_TCPV6 with extension headers or not TCP")
        l4, v6 = l3 + 40, True
    else:
        raise OffloadError(f"gso_type {gso} is not segmented here")
    if len(frame) < l4 + 20:
        raise OffloadError("truncated TCP header")
    end = l4 + (frame[l4 + 12] >> 4) * 4
    if end < l4 + 20 or end > len(frame):
        raise OffloadError("bad TCP data offset")
    return _Headers(l3, l4, end, v6)


def _pseudo_sum(frame: bytes | bytearray, h: _Headers, tcp_len: int) -> int:
    if h.v6:
        addrs = frame[h.l3 + 8 : h.l3 + 40]
        return fold(ones_sum(addrs), tcp_len >> 16, tcp_len & 0xFFFF, IPPROTO_TCP)
    addrs = frame[h.l3 + 12 : h.l3 + 20]
    return fold(ones_sum(addrs), tcp_len, IPPROTO_TCP)


def check_segmentable(packet: Packet) -> None:
    """``OffloadError`` unless ``packet`` (a TSO packet) has headers ``segment`` can
    cut: checked once when it enters the switch, before any port sees it."""
    h = _parse(packet.frame, packet.gso)
    if h.end >= len(packet.frame):
        raise OffloadError("a TSO packet without payload")


def segment(packet: Packet) -> list[bytes]:
    """Cut a TSO packet into frames of at most ``gso_size`` payload bytes, each with
    complete IP and TCP checksums.  ``OffloadError`` if its headers are not
    Ethernet (+VLAN) / IPv4 or IPv6 / TCP."""
    frame = packet.frame
    h = _parse(frame, packet.gso)
    mss = packet.gso_size
    head = bytearray(frame[: h.end])
    payload = memoryview(frame)[h.end :]
    (seq,) = struct.unpack_from("!I", frame, h.l4 + 4)
    tcp_flags = frame[h.l4 + 13]
    (ip_id,) = struct.unpack_from("!H", frame, h.l3 + 4)
    ip_hlen = h.l4 - h.l3
    out = []
    count = max(1, -(-len(payload) // mss))
    for i in range(count):
        chunk = payload[i * mss : (i + 1) * mss]
        seg = bytearray(head)
        seg += chunk
        tcp_len = h.end - h.l4 + len(chunk)
        if h.v6:
            struct.pack_into("!H", seg, h.l3 + 4, tcp_len)
        else:
            struct.pack_into("!HH", seg, h.l3 + 2, ip_hlen + tcp_len, (ip_id + i) & 0xFFFF)
            struct.pack_into("!H", seg, h.l3 + 10, 0)
            ip_csum = ~ones_sum(memoryview(seg)[h.l3 : h.l4]) & 0xFFFF
            struct.pack_into("!H", seg, h.l3 + 10, ip_csum)
        struct.pack_into("!I", seg, h.l4 + 4, (seq + i * mss) & 0xFFFFFFFF)
        f = tcp_flags
        if i != count - 1:
            f &= ~(TCP_FIN | TCP_PSH)
        if i != 0:
            f &= ~TCP_CWR
        seg[h.l4 + 13] = f
        struct.pack_into("!H", seg, h.l4 + 16, 0)
        s = fold(_pseudo_sum(seg, h, tcp_len), ones_sum(memoryview(seg)[h.l4 :]))
        struct.pack_into("!H", seg, h.l4 + 16, (~s & 0xFFFF) or 0xFFFF)
        out.append(bytes(seg))
    return out


@dataclass(slots=True)
class Adapted:
    """``adapt``'s answer: the packets to deliver and what it took."""

    packets: list[Packet]
    segmented: bool = False
    checksummed: bool = False


def adapt(packet: Packet, rx: RxOffloads) -> Adapted:
    """``packet`` as port offloads ``rx`` can receive it (module docstring)."""
    gso = packet.gso
    if gso != GSO_NONE:
        wanted = rx.tso4 if gso == GSO_TCPV4 else rx.tso6 if gso == GSO_TCPV6 else False
        if wanted and rx.csum and (rx.ecn or not packet.gso_type & GSO_ECN):
            return Adapted([packet])
        flags = DATA_VALID if rx.csum else 0
        return Adapted([Packet(f, flags) for f in segment(packet)], segmented=True)
    if packet.flags & NEEDS_CSUM:
        if rx.csum:
            return Adapted([packet])
        frame = bytearray(packet.frame)
        complete_checksum(frame, packet.csum_start, packet.csum_offset)
        return Adapted([Packet(bytes(frame))], checksummed=True)
    if packet.flags and not rx.csum:
        return Adapted([Packet(packet.frame)])  # DATA_VALID only with GUEST_CSUM
    return Adapted([packet])
