"""virtio-input (§5.8) against in-memory driver queues and the vhost-user test front-end:
configuration space, SYN_REPORT-framed delivery, held groups, statusq, hostile drivers."""

from __future__ import annotations

import logging
import socket
import struct

import pytest
import trio
from evdev import ecodes as e

from virtio.devices.input import AbsInfo, VirtioInput, builtin, frame
from virtio.devices.input.device import EVENT
from virtio.errors import DescriptorChainError
from virtio.spec.input import InputConfigSelect as Sel
from virtio.testing.harness import DeviceHarness
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.server import VhostUserServer

MiB = 1 << 20


def select(dev: VirtioInput, sel: int, subsel: int = 0) -> bytes:
    dev.write_config(0, bytes([sel, subsel]))
    size = dev.read_config(2, 1)[0]
    return dev.read_config(8, size)


def test_config_space_reports_everything_of_a_multitouch_panel() -> None:
    dev = VirtioInput(builtin("multitouch", serial="MT-0042"))
    assert dev.config_size == 136
    assert select(dev, Sel.VIRTIO_INPUT_CFG_ID_NAME) == b"pyvirtio multitouch"
    assert select(dev, Sel.VIRTIO_INPUT_CFG_ID_SERIAL) == b"MT-0042"
    assert struct.unpack("<4H", select(dev, Sel.VIRTIO_INPUT_CFG_ID_DEVIDS)) == (
        e.BUS_VIRTUAL, 0x1AF4, 4, 1
    )  # fmt: skip
    assert select(dev, Sel.VIRTIO_INPUT_CFG_PROP_BITS) == bytes([1 << e.INPUT_PROP_DIRECT])
    absbits = int.from_bytes(select(dev, Sel.VIRTIO_INPUT_CFG_EV_BITS, e.EV_ABS), "little")
    assert {c for c in range(64) if absbits >> c & 1} == {
        e.ABS_X, e.ABS_Y, e.ABS_MT_SLOT, e.ABS_MT_TRACKING_ID,
        e.ABS_MT_POSITION_X, e.ABS_MT_POSITION_Y,
    }  # fmt: skip
    keys = select(dev, Sel.VIRTIO_INPUT_CFG_EV_BITS, e.EV_KEY)
    assert len(keys) == e.BTN_TOUCH // 8 + 1 and keys[-1] == 1 << (e.BTN_TOUCH % 8)
    assert struct.unpack("<5i", select(dev, Sel.VIRTIO_INPUT_CFG_ABS_INFO, e.ABS_MT_SLOT)) == (
        0, 9, 0, 0, 0
    )  # fmt: skip
    x = struct.unpack("<5i", select(dev, Sel.VIRTIO_INPUT_CFG_ABS_INFO, e.ABS_MT_POSITION_X))
    assert x == (0, 1919, 0, 0, 10)
    # §5.8.4: an unsupported select/subsel reads size 0.
    for sel, sub in (
        (Sel.VIRTIO_INPUT_CFG_UNSET, 0),
        (Sel.VIRTIO_INPUT_CFG_EV_BITS, e.EV_REL),
        (Sel.VIRTIO_INPUT_CFG_ABS_INFO, e.ABS_PRESSURE),
        (Sel.VIRTIO_INPUT_CFG_ID_NAME, 1),
    ):
        assert select(dev, sel, sub) == b"", (sel, sub)


def test_negative_abs_ranges_and_codes_beyond_the_bitmap() -> None:
    caps = builtin("tablet")
    caps.absinfo = {**caps.absinfo, e.ABS_X: AbsInfo(-100, 100, 1, 2, 3)}
    dev = VirtioInput(caps)
    got = struct.unpack("<5i", select(dev, Sel.VIRTIO_INPUT_CFG_ABS_INFO, e.ABS_X))
    assert got == (-100, 100, 1, 2, 3)
    with pytest.raises(ValueError, match="absolute axes without ABS_INFO"):
        type(caps)("x", events={e.EV_ABS: frozenset({e.ABS_Z})})


def test_hostile_config_writes_are_logged_and_change_nothing(caplog) -> None:
    dev = VirtioInput(builtin("keyboard"))
    with caplog.at_level(logging.WARNING):
        assert select(dev, 0x7F) == b""  # a select no spec value names
        dev.write_config(2, b"\x10")  # size is read-only
        dev.write_config(8, b"evil")  # so is the union
    assert "not a virtio_input_config_select" in caplog.text
    assert "read-only configuration field size" in caplog.text
    assert "read-only configuration field u" in caplog.text
    assert select(dev, Sel.VIRTIO_INPUT_CFG_ID_NAME) == b"pyvirtio keyboard"


def test_the_front_ends_whole_struct_echo_is_not_logged(caplog) -> None:
    """QEMU's vhost-user-input writes its whole copy of the struct (read before the
    driver changed ``select``) on every select: not a read-only write, no log line."""
    dev = VirtioInput(builtin("tablet"))
    with caplog.at_level(logging.WARNING):
        copy = bytearray(dev.read_config(0, len(dev.config_bytes())))
        for sel, sub in [(Sel.VIRTIO_INPUT_CFG_ID_NAME, 0), (Sel.VIRTIO_INPUT_CFG_ABS_INFO, 0)]:
            copy[0] = sel
            dev.write_config(0, bytes(copy))  # select changed, the rest stale
            copy[1] = sub
            dev.write_config(0, bytes(copy))
            copy = bytearray(dev.read_config(0, len(copy)))  # the front-end re-reads
            assert copy[2] > 0
    assert caplog.text == "" and dev.config_ignored == 0
    assert struct.unpack_from("<2i", copy, 8) == (0, 32767)


def test_a_config_write_storm_is_rate_limited_and_the_device_keeps_answering(caplog) -> None:
    dev = VirtioInput(builtin("keyboard"))
    with caplog.at_level(logging.WARNING):
        for i in range(1000):
            dev.write_config(2, bytes([i % 200 + 1]))  # size: read-only
            dev.write_config(0, bytes([0x80 + i % 64]))  # select out of range
            assert dev.read_config(2, 1) == b"\0"
    assert dev.config_ignored == 1000
    assert caplog.text.count("read-only configuration field size") == 5
    assert caplog.text.count("not a virtio_input_config_select") == 5
    assert select(dev, Sel.VIRTIO_INPUT_CFG_ID_NAME) == b"pyvirtio keyboard"


def test_frame_adds_a_missing_syn_report() -> None:
    a, syn = (e.EV_KEY, e.KEY_A, 1), (e.EV_SYN, e.SYN_REPORT, 0)
    assert frame([a]) == [[a, syn]]
    assert frame([a, syn, a]) == [[a, syn], [a, syn]]


def _events(used) -> list[tuple[int, int, int]]:
    return [EVENT.unpack(u.data[:8]) for u in used]


@pytest.mark.parametrize(("packed", "event_idx"), [(False, True), (False, False), (True, True)])
async def test_a_group_waits_until_the_driver_posted_buffers_for_all_of_it(
    packed, event_idx
) -> None:
    dev = VirtioInput(builtin("tablet"))
    async with DeviceHarness.start(dev, packed=packed, event_idx=event_idx) as h:
        group = [(e.EV_ABS, e.ABS_X, 100), (e.EV_ABS, e.ABS_Y, 200), (e.EV_SYN, 0, 0)]
        tokens = [h.submit(0, writable=[8]) for _ in range(2)]
        assert dev.inject(group) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert h.queues[0].get_used() == [] and dev.held_events == 3  # not split
        tokens.append(h.submit(0, writable=[8]))
        used = [await h.wait_used(0, t) for t in tokens]
        assert _events(used) == group and all(u.written == 8 for u in used)
        assert dev.held_events == 0 and dev.groups_delivered == 1
        # Many groups, buffers posted a group's worth at a time: whole and in order.
        clicks = [ev for i in range(20) for ev in ((e.EV_KEY, e.BTN_LEFT, i % 2), (0, 0, 0))]
        assert dev.inject(clicks) == 20
        got = []
        for _ in range(20):
            pair = [h.submit(0, writable=[8]) for _ in range(2)]
            got += _events([await h.wait_used(0, t) for t in pair])
        assert got == clicks
        assert dev.statistics()["events"] == 43 and h.driver_errors == []


async def test_held_events_are_bounded_and_oversized_groups_split(caplog) -> None:
    dev = VirtioInput(builtin("keyboard"))
    dev.max_held_events = 4
    async with DeviceHarness.start(dev, queue_size=8) as h:
        press = [(e.EV_KEY, e.KEY_A, 1), (e.EV_SYN, e.SYN_REPORT, 0)]
        with caplog.at_level(logging.WARNING):
            assert dev.inject(press * 3) == 2  # 3 groups of 2 events; the third dropped
            assert dev.groups_dropped == 1 and dev.events_dropped == 2
            # A group longer than the 8-entry eventq can never be delivered whole.
            dev.max_held_events = 100
            dev.inject([(e.EV_KEY, e.KEY_B, 1)] * 8 + [(0, 0, 0)])
            tokens = [h.submit(0, writable=[8]) for _ in range(4)]
            used = [await h.wait_used(0, t) for t in tokens]
            assert _events(used) == [(e.EV_KEY, e.KEY_A, 1), (0, 0, 0)] * 2
            # ... so it goes out in pieces of at most 8, in order.
            used = []
            for n in (8, 1):
                tokens = [h.submit(0, writable=[8]) for _ in range(n)]
                used += [await h.wait_used(0, t) for t in tokens]
        assert _events(used) == [(e.EV_KEY, e.KEY_B, 1)] * 8 + [(0, 0, 0)]
        assert dev.groups_dropped == 1 and dev.groups_split == 1
        assert "longer than the 8-entry eventq" in caplog.text


async def test_status_leds_and_hostile_status_events(caplog) -> None:
    seen = []
    dev = VirtioInput(builtin("keyboard"), status_sink=lambda *ev: seen.append(ev))
    async with DeviceHarness.start(dev) as h:
        caps_on = EVENT.pack(e.EV_LED, e.LED_CAPSL, 1)
        with caplog.at_level(logging.WARNING):
            assert (await h.request(1, [caps_on])).written == 0
            await h.request(1, [EVENT.pack(0x1F, 3, 7)])  # no such event type
            await h.request(1, [EVENT.pack(e.EV_LED, e.LED_KANA, 1)])  # not reported
            await h.request(1, [b"\x11\x00"])  # shorter than an event
        assert seen == [(e.EV_LED, e.LED_CAPSL, 1)] and dev.leds == {e.LED_CAPSL: 1}
        assert dev.status_unknown == 3 and caplog.text.count("ignored") == 3
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            for i in range(200):  # a storm of unknown status events: a few log lines
                await h.request(1, [EVENT.pack(0x10 + i % 16, 0x300 + i, i)])
        assert dev.status_unknown == 203 and caplog.text.count("ignored") <= 5
        # Still working: an event goes out.
        dev.inject([(e.EV_KEY, e.KEY_Q, 1)])
        tokens = [h.submit(0, writable=[8]) for _ in range(2)]
        used = [await h.wait_used(0, t) for t in tokens]
        assert _events(used)[0] == (e.EV_KEY, e.KEY_Q, 1) and h.driver_errors == []


async def test_an_eventq_buffer_smaller_than_an_event_is_a_driver_error() -> None:
    dev = VirtioInput(builtin("keyboard"))
    async with DeviceHarness.start(dev) as h:
        h.submit(0, writable=[4])
        dev.inject([(e.EV_KEY, e.KEY_Q, 1)])
        h.submit(0, writable=[8])
        with trio.fail_after(5):
            while not h.driver_errors:
                await h.notifiers[0].wait_interrupt()
        assert isinstance(h.driver_errors[0], DescriptorChainError)
        assert "5.8.6.1" in str(h.driver_errors[0])


async def test_get_vring_base_does_not_wait_for_a_group_that_does_not_fit() -> None:
    """The eventq holds no buffer while a group waits: GET_VRING_BASE answers at once
    (no drain timeout) and the base counts none of the buffers the driver posted."""
    dev = VirtioInput(builtin("tablet"))
    server = VhostUserServer(dev, drain_timeout=30.0)
    ram = GuestRam(4 * MiB)
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_connection, b)
            fe = VhostUserFrontend(a)
            await fe.negotiate()
            await fe.set_mem_table(ram)
            eventq = await fe.setup_vring(0, ram, size=16)
            await fe.setup_vring(1, ram, size=16, offset=2 * MiB)
            for _ in range(2):
                eventq.driver.add([], [8])
            eventq.publish_and_kick()
            dev.inject([(e.EV_ABS, e.ABS_X, 1), (e.EV_ABS, e.ABS_Y, 2)])  # 3 events
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(2):
                assert await fe.get_vring_base(0) == 0
            assert eventq.driver.get_used() == []
            # Restarted with one more buffer posted: the group goes out whole.
            eventq.driver.add([], [8])
            driver = eventq.driver
            eventq = await fe.setup_vring(0, ram, size=16, vring_base=0, driver=driver)
            eventq.publish_and_kick()
            used = await eventq.wait_used(3)
            assert [EVENT.unpack(u.data[:8]) for u in used] == [
                (e.EV_ABS, e.ABS_X, 1), (e.EV_ABS, e.ABS_Y, 2), (0, 0, 0)
            ]  # fmt: skip
            assert await fe.get_vring_base(0) == 3
            await fe.aclose()
            nursery.cancel_scope.cancel()
    finally:
        ram.close()
