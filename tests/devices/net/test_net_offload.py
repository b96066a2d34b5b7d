"""Offload translation (virtio 1.4 §5.1.9.2 / §5.1.9.4): software segmentation and
checksum completion, checked against an independent checksum verifier."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio.devices.net.offload import OffloadError, RxOffloads, adapt, ones_sum, segment
from virtio.devices.net.packet import (
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    Packet,
    PacketRefused,
    TxOffloads,
    check_transmit,
)
from virtio.testing.net_frames import MAC_A, MAC_B, tcp4, tcp6, tcp_payload, tcp_valid, word_sum

ALL = RxOffloads(csum=True, tso4=True, tso6=True, ecn=True)
NONE = RxOffloads()
TX = TxOffloads(csum=True, tso4=True, tso6=True, ecn=True)


def _tso(frame: bytes, gso: int, mss: int) -> Packet:
    l4 = 14 + (20 if gso == GSO_TCPV4 else 40)
    return Packet(frame, NEEDS_CSUM, gso, l4 + 20, mss, l4, 16)


@given(st.binary(max_size=3000))
@settings(max_examples=200, deadline=None)
def test_ones_sum_matches_word_sum(data):
    s = ones_sum(data)
    assert s == word_sum(data) or (s == 0xFFFF and word_sum(data) == 0)


@pytest.mark.parametrize("size", [1, 100, 1447, 1448, 1449, 6000, 65000 - 54])
def test_tso4_segments_verify_and_reassemble(size):
    payload = os.urandom(size)
    frame = tcp4(MAC_B, MAC_A, payload, partial=True, flags=0x19, seq=0xFFFFFF00)  # FIN|PSH|ACK
    packet = _tso(frame, GSO_TCPV4, 1448)
    check_transmit(packet, TX, 1500)
    out = adapt(packet, NONE)
    assert out.segmented
    assert len(out.packets) == -(-size // 1448)
    data = b""
    for i, p in enumerate(out.packets):
        assert p.flags == 0 and p.gso_type == 0
        assert len(p.frame) <= 1514
        assert tcp_valid(p.frame)
        seq, flags, chunk = tcp_payload(p.frame)
        assert seq == (0xFFFFFF00 + len(data)) & 0xFFFFFFFF  # wraps
        last = i == len(out.packets) - 1
        assert flags & 0x09 == (0x09 if last else 0)  # FIN and PSH only on the last
        data += chunk
    assert data == payload


def test_tso6_segments_and_ecn_to_port_without_guest_ecn():
    payload = os.urandom(5000)
    frame = tcp6(MAC_B, MAC_A, payload, partial=True)
    packet = _tso(frame, GSO_TCPV6 | GSO_ECN, 1000)
    out = adapt(packet, RxOffloads(csum=True, tso4=True, tso6=True, ecn=False))
    assert out.segmented and len(out.packets) == 5
    assert all(tcp_valid(p.frame) for p in out.packets)
    assert b"".join(tcp_payload(p.frame)[2] for p in out.packets) == payload
    # with GUEST_ECN it passes unchanged
    assert adapt(packet, ALL).packets == [packet]


def test_partial_checksum_completed_for_port_without_guest_csum():
    frame = tcp4(MAC_B, MAC_A, os.urandom(333), partial=True)
    packet = Packet(frame, NEEDS_CSUM, 0, 0, 0, 34, 16)
    assert not tcp_valid(frame)
    out = adapt(packet, NONE)
    assert out.checksummed and len(out.packets) == 1
    assert out.packets[0].flags == 0 and tcp_valid(out.packets[0].frame)
    assert adapt(packet, ALL).packets == [packet]  # GUEST_CSUM: unchanged


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (Packet(b"\0" * 10), "runt"),
        (Packet(b"\0" * 1600), "oversized"),  # over MTU 1500 without GSO
        (Packet(b"\0" * 70000, NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16), "oversized"),
        (Packet(b"\0" * 100, NEEDS_CSUM, 0, 0, 0, 90, 16), "bad_csum"),
        (Packet(b"\0" * 100, NEEDS_CSUM, 0, 0, 0, 200, 0), "bad_csum"),
        (Packet(b"\0" * 100, NEEDS_CSUM, GSO_TCPV4, 54, 0, 34, 16), "bad_gso"),
        (Packet(b"\0" * 9000, NEEDS_CSUM, GSO_TCPV4, 54, 1, 34, 16), "bad_gso"),
        (Packet(b"\0" * 100, 0, GSO_TCPV4, 54, 10, 34, 16), "bad_gso"),
        (Packet(b"\0" * 100, NEEDS_CSUM, 3, 54, 10, 34, 6), "bad_gso"),  # UFO: not offered
        (Packet(b"\0" * 100, 0, GSO_ECN), "bad_gso"),
    ],
)
def test_check_transmit_refuses(packet, reason):
    with pytest.raises(PacketRefused) as info:
        check_transmit(packet, TX, 1500)
    assert info.value.reason == reason
    assert "virtio 1.4 §5.1.9" in str(info.value)


def test_offloads_not_negotiated_are_refused():
    frame = tcp4(MAC_B, MAC_A, b"x" * 100, partial=True)
    with pytest.raises(PacketRefused, match="NEEDS_CSUM without"):
        check_transmit(Packet(frame, NEEDS_CSUM, 0, 0, 0, 34, 16), TxOffloads(), 1500)
    with pytest.raises(PacketRefused, match="not negotiated"):
        check_transmit(_tso(frame, GSO_TCPV4, 50), TxOffloads(csum=True), 1500)


def test_unsegmentable_tso_packet():
    frame = tcp6(MAC_B, MAC_A, b"x" * 100)
    with pytest.raises(OffloadError, match="not IPv4"):
        segment(_tso(frame, GSO_TCPV4, 50))
