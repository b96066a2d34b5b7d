"""The native forwarding database (virtio/native/net_fdb.c) against the Python
switch (switch.py): the same frames in give the same forwarding decisions, the same
learned addresses and the same counters (issue 10 §2: MAC learning with ageing and
per-port counters in C)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio.devices.net.fdb import FLOOD, HAIRPIN, MAX_PORTS, RUNT, NativeFdb
from virtio.devices.net.offload import RxOffloads
from virtio.devices.net.packet import Packet
from virtio.devices.net.switch import MAX_ADDRESSES, Switch
from virtio.testing.net_frames import ether


@dataclass(eq=False)
class FakePort:
    name: str
    rx_offloads: RxOffloads = field(default_factory=RxOffloads)
    got: list[Packet] = field(default_factory=list)

    def deliver(self, packet: Packet) -> bool:
        self.got.append(packet)
        return True


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


# A small pool (with a group address and zero) so moves, hairpins and floods happen.
POOL = [bytes([2, 0, 0, 0, 0, i]) for i in range(1, 7)] + [b"\x01\0^\0\0\1", b"\0" * 6]
NPORTS = 3

op = st.one_of(
    st.tuples(
        st.just("frame"),
        st.integers(0, NPORTS - 1),
        st.sampled_from(POOL),
        st.sampled_from([*POOL, b"\xff" * 6]),
        st.integers(0, 60),
    ),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 5.0, 11.0])),
    st.tuples(st.just("forget"), st.integers(0, NPORTS - 1)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60))
def test_same_decisions_addresses_and_counters_as_python_switch(ops) -> None:
    clock = Clock()
    sw = Switch(ageing=10.0, clock=clock)
    ports = [FakePort(f"p{i}") for i in range(NPORTS)]
    for p in ports:
        sw.add_port(p)
    fdb = NativeFdb(ageing=10.0, clock=clock)
    for o in ops:
        if o[0] == "tick":
            clock.now += o[1]
        elif o[0] == "forget":
            sw.forget(ports[o[1]])
            fdb.forget(o[1])
        else:
            _, src, smac, dmac, pad = o
            frame = ether(dmac, smac, b"x" * pad)
            before = [len(p.got) for p in ports]
            sw.forward(ports[src], Packet(frame))
            got = [i for i, p in enumerate(ports) if len(p.got) > before[i]]
            decision = fdb.decide(src, frame)
            if decision == FLOOD:
                assert got == [i for i in range(NPORTS) if i != src]
            elif decision == HAIRPIN:
                assert got == []
            else:
                assert got == [decision]
            for i in got:
                fdb.delivered(i, len(frame), True)
        assert fdb.addresses() == {mac: int(name[1:]) for mac, name in sw.addresses().items()}
    for i, p in enumerate(ports):
        py = sw.counters[p.name]
        c = fdb.counters(i)
        assert c["in_packets"] == py.in_packets and c["in_bytes"] == py.in_bytes
        assert c["out_packets"] == py.out_packets and c["out_bytes"] == py.out_bytes
        assert c["flooded"] == py.flooded
        assert c["dropped_hairpin"] == py.dropped["hairpin"]


def test_full_table_evicts_least_recently_learned_like_python() -> None:
    """A port sending from random sources cannot grow the table past MAX_ADDRESSES;
    the order of eviction (re-learning refreshes) matches the Python switch, and
    deleting from the hash table (ageing, eviction) never loses another entry."""
    rng = random.Random(10)
    clock = Clock()
    sw = Switch(ageing=50.0, clock=clock)
    ports = [FakePort("p0"), FakePort("p1")]
    for p in ports:
        sw.add_port(p)
    fdb = NativeFdb(ageing=50.0, clock=clock)
    macs = [bytes([2]) + rng.randbytes(5) for _ in range(3 * MAX_ADDRESSES)]
    for step in range(4 * MAX_ADDRESSES):
        mac = rng.choice(macs)
        port = rng.randrange(2)
        sw.learn(mac, ports[port])
        fdb.learn(mac, port)
        if step % 7 == 0:
            probe = rng.choice(macs)
            py = sw.lookup(probe)
            assert fdb.lookup(probe) == (None if py is None else ports.index(py))
        clock.now += 0.01
    assert len(fdb) == MAX_ADDRESSES
    assert fdb.addresses() == {m: int(n[1:]) for m, n in sw.addresses().items()}
    clock.now += 30.0  # part of the table ages out, entry by entry on lookup
    for mac in macs:
        py = sw.lookup(mac)
        assert fdb.lookup(mac) == (None if py is None else ports.index(py))
    assert fdb.addresses() == {m: int(n[1:]) for m, n in sw.addresses().items()}
    assert len(fdb) == len(sw.addresses())
    sw.forget(ports[0])
    fdb.forget(0)
    assert fdb.addresses() == {m: int(n[1:]) for m, n in sw.addresses().items()}


def test_hostile_input_refused_and_counted() -> None:
    fdb = NativeFdb()
    assert fdb.decide(0, b"\x02" * 13) == RUNT
    assert fdb.counters(0)["dropped_runt"] == 1
    assert fdb.counters(0)["in_packets"] == 0
    with pytest.raises(ValueError):
        fdb.decide(MAX_PORTS, b"\x02" * 14)
    with pytest.raises(ValueError):
        fdb.learn(b"\x02" * 5, 0)
    assert len(fdb) == 0
