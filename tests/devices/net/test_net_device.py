"""virtio-net over in-memory driver queues (virtio 1.4 §5.1): two ports on one
switch, receive with and without MRG_RXBUF, buffers given back, hostile transmit
buffers, the control queue."""

from __future__ import annotations

import os
import struct

import pytest
import trio

from virtio.control import ArgumentError
from virtio.devices.net import Switch, VirtioNet
from virtio.devices.net.packet import GSO_TCPV4, HDR, NEEDS_CSUM
from virtio.spec.features import TransportFeature as TF
from virtio.spec.net import NetFeature as NF
from virtio.testing.harness import DeviceHarness
from virtio.testing.net_frames import BROADCAST, MAC_A, MAC_B, ether, tcp4, tcp_payload, tcp_valid

RX, TX = 0, 1
GUEST_OFFLOADS = (
    NF.VIRTIO_NET_F_GUEST_CSUM.mask
    | NF.VIRTIO_NET_F_GUEST_TSO4.mask
    | NF.VIRTIO_NET_F_GUEST_TSO6.mask
    | NF.VIRTIO_NET_F_GUEST_ECN.mask
)


def _hdr(flags=0, gso=0, hdr_len=0, gso_size=0, start=0, offset=0) -> bytes:
    return HDR.pack(flags, gso, hdr_len, gso_size, start, offset, 0)


def _pair(**kw):
    sw = Switch()
    return (
        sw,
        VirtioNet(name="a", switch=sw, mac=MAC_A, **kw),
        VirtioNet(name="b", switch=sw, mac=MAC_B, **kw),
    )


def _features(dev, *, without=0) -> int:
    return dev.offered_features() & ~TF.VIRTIO_F_RING_PACKED.mask & ~without


async def _settle():
    await trio.testing.wait_all_tasks_blocked()


async def test_config_space_and_queue_layout():
    net = VirtioNet(mac=MAC_A, mtu=9000, num_queue_pairs=2)
    cfg = net.config_bytes()
    mac, status, pairs, mtu, _speed, duplex = struct.unpack_from("<6sHHHIB", cfg)
    assert (mac, status, pairs, mtu, duplex) == (MAC_A, 1, 2, 9000, 1)
    assert net.num_queues == 5
    for bit in (NF.VIRTIO_NET_F_MRG_RXBUF, NF.VIRTIO_NET_F_HOST_TSO6, NF.VIRTIO_NET_F_MQ):
        assert net.offered_features() & bit.mask
    net.ack_features(net.offered_features())
    assert net.ctrl_index == 4
    net.ack_features(net.offered_features() & ~NF.VIRTIO_NET_F_MQ.mask)
    assert net.ctrl_index == 2


async def test_broadcast_reaches_the_other_port_with_header():
    sw, a, b = _pair()
    async with DeviceHarness.start(a) as ha, DeviceHarness.start(b) as hb:
        await _settle()  # every queue served
        token = hb.submit(RX, writable=[2048])
        frame = ether(BROADCAST, MAC_A, os.urandom(100))
        used = await ha.request(TX, [_hdr() + frame])
        assert used.written == 0
        got = await hb.wait_used(RX, token)
        assert got.written == 12 + len(frame)
        flags, gso, *_, num_buffers = HDR.unpack_from(got.data)
        assert (flags, gso, num_buffers) == (0, 0, 1)
        assert got.data[12 : got.written] == frame
        # B answers A by unicast: A learned nothing about B yet, B learned A
        tok_a = ha.submit(RX, writable=[2048])
        reply = ether(MAC_A, MAC_B, b"pong" * 20)
        await hb.request(TX, [_hdr(), reply])  # header and frame in separate buffers
        assert (await ha.wait_used(RX, tok_a)).data[12:].startswith(reply)
    assert sw.addresses() == {MAC_A.hex(":"): "a", MAC_B.hex(":"): "b"}
    assert a.statistics()["queues"] == {RX: 1, TX: 1}


async def test_mergeable_buffers_span_and_count():
    _, a, b = _pair(mtu=9000)
    async with DeviceHarness.start(a) as ha, DeviceHarness.start(b) as hb:
        await _settle()  # every queue served
        tokens = [hb.submit(RX, writable=[1000]) for _ in range(4)]
        frame = ether(BROADCAST, MAC_A, os.urandom(3000))  # 3014 + 12 bytes: 4 buffers
        await ha.request(TX, [_hdr() + frame])
        used = [await hb.wait_used(RX, t) for t in tokens]
        assert [u.written for u in used] == [1000, 1000, 1000, 26]
        assert HDR.unpack_from(used[0].data)[-1] == 4  # num_buffers
        assert b"".join(u.data[: u.written] for u in used)[12:] == frame


@pytest.mark.parametrize("packed", [False, True])
async def test_mergeable_waits_for_buffers_without_holding_any(packed):
    _, a, b = _pair(mtu=9000)
    async with DeviceHarness.start(a) as ha, DeviceHarness.start(b, packed=packed) as hb:
        await _settle()  # every queue served
        t1 = hb.submit(RX, writable=[1000])
        frame = ether(BROADCAST, MAC_A, os.urandom(1500))
        await ha.request(TX, [_hdr() + frame])
        await _settle()
        # one buffer is not enough: it was given back, nothing is held
        svc = hb.device.active.services[RX]
        assert svc.outstanding == 0 and hb.queues[RX].inflight == 1
        t2 = hb.submit(RX, writable=[1000])
        u1, u2 = await hb.wait_used(RX, t1), await hb.wait_used(RX, t2)
        assert (u1.data + u2.data)[12 : 12 + len(frame)] == frame
        assert HDR.unpack_from(u1.data)[-1] == 2
        # the ring goes on from the right place: the next packet takes the next buffer
        t3 = hb.submit(RX, writable=[1000])
        await ha.request(TX, [_hdr() + frame[:500]])
        assert (await hb.wait_used(RX, t3)).data[12:512] == frame[:500]


async def test_without_mrg_rxbuf_too_big_is_dropped_and_buffer_reused():
    _, a, b = _pair()
    fb = _features(b, without=NF.VIRTIO_NET_F_MRG_RXBUF.mask)
    async with DeviceHarness.start(a) as ha, DeviceHarness.start(b, features=fb) as hb:
        await _settle()  # every queue served
        token = hb.submit(RX, writable=[200])
        await ha.request(TX, [_hdr() + ether(BROADCAST, MAC_A, b"x" * 500)])
        await _settle()
        assert b.errors["too_big"] == 1 and hb.queues[RX].inflight == 1
        small = ether(BROADCAST, MAC_A, b"y" * 100)
        await ha.request(TX, [_hdr() + small])
        got = await hb.wait_used(RX, token)
        assert got.data[12 : got.written] == small
        assert HDR.unpack_from(got.data)[-1] == 1


async def test_tso_to_port_without_guest_offloads_is_segmented():
    sw, a, b = _pair()
    fb = _features(b, without=GUEST_OFFLOADS)
    async with DeviceHarness.start(a) as ha, DeviceHarness.start(b, features=fb) as hb:
        await _settle()  # every queue served
        tokens = [hb.submit(RX, writable=[1600]) for _ in range(8)]
        payload = os.urandom(10000)
        frame = tcp4(BROADCAST, MAC_A, payload, partial=True)
        await ha.request(TX, [_hdr(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16) + frame])
        used = [await hb.wait_used(RX, t) for t in tokens[:7]]
        frames = [u.data[12 : u.written] for u in used]
        assert all(tcp_valid(f) for f in frames)
        assert b"".join(tcp_payload(f)[2] for f in frames) == payload
        assert all(HDR.unpack_from(u.data)[0] == 0 for u in used)  # flags zero
    assert sw.statistics()["b"]["segmented"] == 1 and sw.statistics()["b"]["segments"] == 7


async def test_hostile_transmits_are_dropped_and_counted_port_goes_on():
    sw, a, b = _pair()
    async with DeviceHarness.start(a) as ha, DeviceHarness.start(b) as hb:
        await _settle()  # every queue served
        frame = ether(BROADCAST, MAC_A, b"z" * 100)
        await ha.request(TX, [_hdr(NEEDS_CSUM, 0, 0, 0, 100, 40) + frame])  # csum outside
        await ha.request(TX, [_hdr(NEEDS_CSUM, GSO_TCPV4, 54, 0, 34, 16) + frame])  # gso 0
        await ha.request(TX, [_hdr() + b"\0" * 70000])  # over 64 KiB
        await ha.request(TX, [b"", b""])  # zero-length buffers
        await ha.request(TX, [_hdr() + ether(BROADCAST, MAC_A, b"q" * 1600)])  # > MTU
        assert not a.needs_reset and not ha.driver_errors
        dropped = {k: v for k, v in sw.statistics()["a"].items() if k.startswith("dropped")}
        assert dropped == {
            "dropped_bad_csum": 1,
            "dropped_bad_gso": 1,
            "dropped_oversized": 2,
            "dropped_runt": 1,
        }
        token = hb.submit(RX, writable=[2048])
        await ha.request(TX, [_hdr() + frame])
        assert (await hb.wait_used(RX, token)).data[12:].startswith(frame)


async def test_stalled_receiver_loses_only_its_own_packets():
    sw = Switch()
    a, b, c = (
        VirtioNet(name=n, switch=sw, mac=m, rx_backlog=8)
        for n, m in (("a", MAC_A), ("b", MAC_B), ("c", b"\x02" * 6))
    )
    async with (
        DeviceHarness.start(a) as ha,
        DeviceHarness.start(b),  # posts no buffers: stalled
        DeviceHarness.start(c) as hc,
    ):
        await _settle()  # every queue served
        tokens = [hc.submit(RX, writable=[256]) for _ in range(20)]
        for i in range(20):
            await ha.request(TX, [_hdr() + ether(BROADCAST, MAC_A, bytes([i]) * 60)])
        got = [await hc.wait_used(RX, t) for t in tokens]
        assert [u.data[26] for u in got] == list(range(20))  # all, in order
    assert b.errors["backlog_full"] == 11  # 8 queued, 1 waiting for buffers
    assert sw.statistics()["b"]["dropped_no_room"] == 11


async def _ctrl(h, cls, cmd, data=b""):
    used = await h.request(h.device.ctrl_index, [bytes([cls, cmd]) + data], [1])
    return used.data[0]


async def test_control_queue_filters_mq_and_announce():
    sw = Switch()
    a = VirtioNet(name="a", switch=sw, mac=MAC_A)
    b = VirtioNet(name="b", switch=sw, mac=MAC_B, num_queue_pairs=2)
    async with DeviceHarness.start(a) as ha, DeviceHarness.start(b) as hb:
        await _settle()  # every queue served
        ctrl = 4
        assert b.pairs == 1  # only the first pair until VQ_PAIRS_SET
        assert await _ctrl(hb, 4, 0, struct.pack("<H", 3)) == 1  # too many pairs: ERR
        assert await _ctrl(hb, 4, 0, struct.pack("<H", 2)) == 0 and b.pairs == 2
        # promiscuous off: unicast to another MAC is filtered, our own passes
        assert (await hb.request(ctrl, [bytes([0, 0, 0])], [1])).data[0] == 0
        assert not b.promisc
        toks = [hb.submit(q, writable=[2048]) for q in (0, 0, 2, 2)]
        await ha.request(TX, [_hdr() + ether(b"\x02" * 6, MAC_A, b"no" * 40)])
        for port in range(8):  # several flows: both receive queues get traffic
            tcp = bytearray(tcp4(MAC_B, MAC_A, b"yes" * 20))
            tcp[34:36] = (1000 + port).to_bytes(2, "big")
            await ha.request(TX, [_hdr() + bytes(tcp)])
        await _settle()
        assert b.errors["filtered"] == 1
        assert sorted(b.statistics()["queues"]) == [0, 2]
        # MAC table: a multicast group is accepted only once listed
        group = b"\x01\x00\x5e\x00\x00\x01"
        table = struct.pack("<I", 0) + struct.pack("<I", 1) + group
        assert await _ctrl(hb, 1, 0, table) == 0 and b.mc_table == {group}
        assert await _ctrl(hb, 1, 0, struct.pack("<I", 5)) == 1  # truncated table: ERR
        # announce: status bit set, ack clears it
        b.announce()  # the harness has no config-change channel: status only
        assert struct.unpack_from("<H", b.config_bytes(), 6)[0] == 3
        assert await _ctrl(hb, 3, 0) == 0
        assert struct.unpack_from("<H", b.config_bytes(), 6)[0] == 1
        assert await _ctrl(hb, 9, 9) == 1  # unknown class
        del toks


async def test_send_rarp_announces_on_the_switch():
    sw, a, b = _pair()
    async with DeviceHarness.start(a), DeviceHarness.start(b) as hb:
        await _settle()  # every queue served
        token = hb.submit(RX, writable=[2048])
        a.send_rarp(b"\x52\x54\x00\xaa\xbb\xcc")
        got = await hb.wait_used(RX, token)
        frame = got.data[12 : got.written]
        assert frame[:6] == BROADCAST and frame[12:14] == b"\x80\x35" and len(frame) == 60
    assert sw.addresses()["52:54:00:aa:bb:cc"] == "a"


@pytest.mark.parametrize(
    ("packed", "event_idx"), [(False, True), (False, False), (True, True), (True, False)]
)
async def test_receive_notifications_off_while_buffers_remain(packed, event_idx):
    """§2.7.10 / §2.8.10 (as QEMU's virtio-net): once the device uses receive buffers
    it turns receiveq notifications off (VRING_USED_F_NO_NOTIFY, packed DISABLE,
    EVENT_IDX's avail_event left behind), so reposting costs no notification; only a
    packet that finds the ring empty asks for one (enabled, re-checked, then slept)."""
    _, a, b = _pair()
    async with (
        DeviceHarness.start(a) as ha,
        DeviceHarness.start(b, packed=packed, event_idx=event_idx) as hb,
    ):
        await _settle()  # every queue served
        rxn = hb.notifiers[RX]
        tokens = [hb.submit(RX, writable=[2048]) for _ in range(2)]
        frames = [ether(BROADCAST, MAC_A, bytes([i]) * 60) for i in range(4)]
        await ha.request(TX, [_hdr() + frames[0]])
        assert (await hb.wait_used(RX, tokens[0])).data[12:86] == frames[0]
        before = rxn.kicks
        tokens.append(hb.submit(RX, writable=[2048]))  # a repost while one remains
        assert rxn.kicks == before  # no notification wanted
        for i in (1, 2):
            await ha.request(TX, [_hdr() + frames[i]])
            assert (await hb.wait_used(RX, tokens[i])).data[12:86] == frames[i]
        assert rxn.kicks == before  # the device never waited
        await ha.request(TX, [_hdr() + frames[3]])  # the ring is empty now
        await _settle()
        last = hb.submit(RX, writable=[2048])
        assert rxn.kicks == before + 1  # the device asked for this one
        assert (await hb.wait_used(RX, last)).data[12:86] == frames[3]
        assert not any(b.errors.values())


async def test_set_link_down_drops_both_ways_and_clears_status():
    """``set-link`` (QEMU's set_link): VIRTIO_NET_S_LINK_UP follows it (§5.1.4); while
    down the port neither receives nor sends, counted; up again, both work."""
    _, a, b = _pair()
    async with DeviceHarness.start(a) as ha, DeviceHarness.start(b) as hb:
        await _settle()  # every queue served
        assert b.control_commands()["set-link"].handler({"up": False}) == {
            "link": "down",
            "announced": False,  # the harness has no configuration change channel
        }
        assert struct.unpack_from("<H", b.config_bytes(), 6) == (0,)
        token = hb.submit(RX, writable=[2048])
        await ha.request(TX, [_hdr() + ether(BROADCAST, MAC_A, b"a" * 60)])
        await hb.request(TX, [_hdr() + ether(BROADCAST, MAC_B, b"b" * 60)])
        assert b.errors["link_down"] == 1 and b.errors["tx_link_down"] == 1
        assert b.statistics()["port"]["in_packets"] == 0  # b sent nothing into the switch
        assert a.statistics()["port"]["out_packets"] == 0  # and a got nothing
        with pytest.raises(ArgumentError, match="true or false"):
            b.control_commands()["set-link"].handler({"up": "maybe"})
        assert b.set_link(True) is False
        assert struct.unpack_from("<H", b.config_bytes(), 6) == (1,)
        frame = ether(BROADCAST, MAC_A, b"c" * 60)
        await ha.request(TX, [_hdr() + frame])
        assert (await hb.wait_used(RX, token)).data[12 : 12 + len(frame)] == frame
