"""The learning switch (sans I/O): learning, ageing, flooding, counters, offloads."""

from __future__ import annotations

from dataclasses import dataclass, field

from virtio.devices.net.offload import RxOffloads
from virtio.devices.net.packet import GSO_TCPV4, NEEDS_CSUM, Packet
from virtio.devices.net.switch import MAX_ADDRESSES, Switch
from virtio.testing.net_frames import BROADCAST, MAC_A, MAC_B, MAC_C, ether, tcp4, tcp_valid


@dataclass(eq=False)
class FakePort:
    name: str
    rx_offloads: RxOffloads = field(default_factory=RxOffloads)
    room: int = 1000
    got: list[Packet] = field(default_factory=list)

    def deliver(self, packet: Packet) -> bool:
        if len(self.got) >= self.room:
            return False
        self.got.append(packet)
        return True


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _switch(*names, **kw):
    sw = Switch(**kw)
    ports = [FakePort(n) for n in names]
    for p in ports:
        sw.add_port(p)
    return sw, ports


def test_flood_learn_then_unicast():
    sw, (a, b, c) = _switch("a", "b", "c")
    assert sw.forward(a, Packet(ether(MAC_B, MAC_A, b"1" * 50))) == 2  # unknown: flood
    assert len(b.got) == 1 and len(c.got) == 1
    assert sw.forward(b, Packet(ether(MAC_A, MAC_B, b"2" * 50))) == 1  # learned: a only
    assert len(a.got) == 1 and len(c.got) == 1
    assert sw.forward(a, Packet(ether(MAC_B, MAC_A, b"3" * 50))) == 1
    assert len(b.got) == 2 and len(c.got) == 1
    assert sw.addresses() == {MAC_A.hex(":"): "a", MAC_B.hex(":"): "b"}
    st = sw.statistics()
    assert st["a"]["in_packets"] == 2 and st["a"]["flooded"] == 1
    assert st["b"]["out_packets"] == 2 and st["c"]["out_packets"] == 1


def test_broadcast_always_floods_and_group_sources_are_not_learned():
    sw, (a, b) = _switch("a", "b")
    sw.forward(b, Packet(ether(BROADCAST, MAC_B, b"x" * 50)))
    sw.forward(a, Packet(ether(BROADCAST, MAC_A, b"x" * 50)))
    assert len(a.got) == 1 and len(b.got) == 1
    sw.forward(a, Packet(ether(MAC_B, b"\x01" + MAC_C[1:], b"x" * 50)))
    assert b"\x01" + MAC_C[1:] not in [bytes.fromhex(m.replace(":", "")) for m in sw.addresses()]


def test_ageing_and_moves():
    clock = Clock()
    sw, (a, b, c) = _switch("a", "b", "c", ageing=10.0, clock=clock)
    sw.forward(b, Packet(ether(BROADCAST, MAC_B, b"x" * 50)))
    clock.now = 9.0
    sw.forward(a, Packet(ether(MAC_B, MAC_A, b"x" * 50)))
    assert len(c.got) == 1  # only the broadcast
    clock.now = 20.0  # B silent for 20 s: aged out, flooded again
    sw.forward(a, Packet(ether(MAC_B, MAC_A, b"x" * 50)))
    assert len(c.got) == 2
    sw.forward(c, Packet(ether(MAC_A, MAC_B, b"x" * 50)))  # B moved to c
    sw.forward(a, Packet(ether(MAC_B, MAC_A, b"x" * 50)))
    assert len(c.got) == 3 and len(b.got) == 2  # b no longer gets B's traffic


def test_hairpin_dropped_and_table_bounded():
    sw, (a, b) = _switch("a", "b")
    sw.forward(a, Packet(ether(MAC_C, MAC_A, b"x" * 50)))
    assert sw.forward(a, Packet(ether(MAC_A, MAC_A, b"x" * 50))) == 0
    assert sw.statistics()["a"]["dropped_hairpin"] == 1
    for i in range(MAX_ADDRESSES + 10):
        sw.forward(b, Packet(ether(BROADCAST, b"\x02" + i.to_bytes(5, "big"), b"")))
    assert len(sw.addresses()) == MAX_ADDRESSES


def test_full_port_counts_its_own_drops_only():
    sw, (a, b, c) = _switch("a", "b", "c")
    b.room = 1  # a stalled receiver
    for _ in range(5):
        sw.forward(a, Packet(ether(BROADCAST, MAC_A, b"x" * 50)))
    assert len(b.got) == 1 and len(c.got) == 5
    st = sw.statistics()
    assert st["b"]["dropped_no_room"] == 4 and "dropped_no_room" not in st["c"]


def test_offloads_per_destination():
    sw, (a, b, c) = _switch("a", "b", "c")
    b.rx_offloads = RxOffloads(csum=True, tso4=True, tso6=True, ecn=True)
    frame = tcp4(BROADCAST, MAC_A, bytes(range(256)) * 20, partial=True)
    sw.forward(a, Packet(frame, NEEDS_CSUM, GSO_TCPV4, 54, 1000, 34, 16))
    assert len(b.got) == 1 and b.got[0].gso_type == GSO_TCPV4  # passed through
    assert len(c.got) == 6 and all(tcp_valid(p.frame) for p in c.got)
    st = sw.statistics()
    assert st["c"]["segmented"] == 1 and st["c"]["segments"] == 6
    # a TSO packet whose headers are not TCP is refused at the source
    sw.forward(
        a, Packet(ether(BROADCAST, MAC_A, b"x" * 200), NEEDS_CSUM, GSO_TCPV4, 54, 50, 34, 16)
    )
    assert sw.statistics()["a"]["dropped_bad_gso"] == 1 and len(c.got) == 6
