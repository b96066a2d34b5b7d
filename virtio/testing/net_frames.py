"""Frame builders and checksum verifiers for virtio-net tests, independent of the
device's own offload code (plain 16-bit word sums)."""

from __future__ import annotations

import struct

MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")
MAC_C = bytes.fromhex("525400000003")
BROADCAST = b"\xff" * 6


def word_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ether(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x0800) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def tcp4(
    dst: bytes,
    src: bytes,
    payload: bytes,
    *,
    seq: int = 1000,
    flags: int = 0x18,
    partial: bool = False,
    ip_id: int = 7,
) -> bytes:
    """An Ethernet/IPv4/TCP frame: checksums complete, or (``partial``) the TCP
    checksum field holding the pseudo-header sum as Linux leaves it for NEEDS_CSUM."""
    saddr, daddr = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    tcp_len = 20 + len(payload)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload
    pseudo = saddr + daddr + struct.pack("!BBH", 0, 6, tcp_len)
    check = word_sum(pseudo) if partial else ~word_sum(pseudo + tcp) & 0xFFFF
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, ip_id, 0x4000, 64, 6, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", ~word_sum(ip) & 0xFFFF) + ip[12:]
    return ether(dst, src, ip + tcp)


def tcp6(dst: bytes, src: bytes, payload: bytes, *, seq: int = 1, partial: bool = False) -> bytes:
    saddr, daddr = b"\xfd" + b"\0" * 14 + b"\x01", b"\xfd" + b"\0" * 14 + b"\x02"
    tcp_len = 20 + len(payload)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, seq, 0, 5 << 4, 0x19, 65535, 0, 0) + payload
    pseudo = saddr + daddr + struct.pack("!IxxxB", tcp_len, 6)
    check = word_sum(pseudo) if partial else ~word_sum(pseudo + tcp) & 0xFFFF
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, tcp_len, 6, 64, saddr, daddr)
    return ether(dst, src, ip + tcp, 0x86DD)


def tcp_valid(frame: bytes) -> bool:
    """IP header checksum (v4) and TCP checksum of one frame both verify."""
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    l3 = 14
    if ethertype == 0x0800:
        ihl = (frame[l3] & 15) * 4
        if word_sum(frame[l3 : l3 + ihl]) != 0xFFFF:
            return False
        (total,) = struct.unpack_from("!H", frame, l3 + 2)
        tcp = frame[l3 + ihl : l3 + total]
        pseudo = frame[l3 + 12 : l3 + 20] + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        (plen,) = struct.unpack_from("!H", frame, l3 + 4)
        tcp = frame[l3 + 40 : l3 + 40 + plen]
        pseudo = frame[l3 + 8 : l3 + 40] + struct.pack("!IxxxB", len(tcp), 6)
    return word_sum(pseudo + tcp) == 0xFFFF


def tcp_payload(frame: bytes) -> tuple[int, int, bytes]:
    """(sequence number, TCP flags, payload) of a frame built above."""
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    l4 = 14 + ((frame[14] & 15) * 4 if ethertype == 0x0800 else 40)
    (seq,) = struct.unpack_from("!I", frame, l4 + 4)
    return seq, frame[l4 + 13], frame[l4 + (frame[l4 + 12] >> 4) * 4 :]
