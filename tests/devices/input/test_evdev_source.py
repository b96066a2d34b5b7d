"""The evdev passthrough's event and LED paths against a fake evdev: an
``InputDevice`` whose fd is one end of a socket pair (the test writes and reads
``struct input_event`` records at the other end).  Not an integration test: the
real one (a uinput device served to a Linux guest) needs ``/dev/uinput``, which this
machine's kernel lacks (tests/integration/test_vu_input_qemu.py skips it, saying so).
"""

from __future__ import annotations

import contextlib
import socket
import struct

import trio
from evdev import InputDevice
from evdev import ecodes as e

from virtio.devices.input import VirtioInput, builtin
from virtio.devices.input.device import EVENT
from virtio.devices.input.evdev_source import EvdevSource
from virtio.testing.harness import DeviceHarness

RECORD = struct.Struct("@llHHi")  # struct input_event (timeval, type, code, value)


def _fake_evdev() -> tuple[InputDevice, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    dev = InputDevice.__new__(InputDevice)  # no ioctls: the fd is a socket
    dev.path, dev.fd = "fake-evdev", ours.detach()  # closed by dev.close()
    return dev, theirs


def _send(sock: socket.socket, *events: tuple[int, int, int]) -> None:
    sock.sendall(b"".join(RECORD.pack(0, 0, *ev) for ev in events))


@contextlib.asynccontextmanager
async def _served_keyboard():
    """A built-in keyboard fed by an ``EvdevSource`` over a fake evdev, its status
    events written back there: (source, device, harness, the evdev's other end)."""
    dev, theirs = _fake_evdev()
    source = EvdevSource("fake-evdev", grab=False, dev=dev)
    device = VirtioInput(builtin("keyboard"), status_sink=source.write_status)
    try:
        async with DeviceHarness.start(device) as h, trio.open_nursery() as nursery:
            nursery.start_soon(source.run, device)
            yield source, device, h, theirs
            nursery.cancel_scope.cancel()
    finally:
        source.close()
        theirs.close()


async def test_events_go_out_in_whole_groups_and_leds_come_back() -> None:
    async with _served_keyboard() as (source, device, h, theirs):
        tokens = [h.submit(0, writable=[8]) for _ in range(6)]
        _send(theirs, (e.EV_KEY, e.KEY_A, 1))  # half a group: not forwarded yet
        _send(theirs, (e.EV_SYN, e.SYN_REPORT, 0), (e.EV_KEY, e.KEY_Z, 1))
        # evdev's "events were lost": the partial KEY_Z group is discarded.
        _send(theirs, (e.EV_SYN, e.SYN_DROPPED, 0), (e.EV_KEY, e.KEY_A, 0))
        _send(theirs, (e.EV_SYN, e.SYN_REPORT, 0))
        used = [await h.wait_used(0, t) for t in tokens[:4]]
        assert [EVENT.unpack(u.data[:8]) for u in used] == [
            (e.EV_KEY, e.KEY_A, 1), (e.EV_SYN, e.SYN_REPORT, 0),
            (e.EV_KEY, e.KEY_A, 0), (e.EV_SYN, e.SYN_REPORT, 0),
        ]  # fmt: skip
        assert (source.events_read, source.groups_lost) == (6, 1)
        # The driver turns Caps Lock on: written back to the evdev, then a SYN_REPORT.
        await h.request(1, [EVENT.pack(e.EV_LED, e.LED_CAPSL, 1)])
        data = b""
        with trio.fail_after(10):
            while len(data) < 2 * RECORD.size:
                await trio.lowlevel.wait_readable(theirs)
                data += theirs.recv(4096)
        got = [RECORD.unpack_from(data, i)[2:] for i in (0, RECORD.size)]
        assert got == [(e.EV_LED, e.LED_CAPSL, 1), (e.EV_SYN, e.SYN_REPORT, 0)]
        assert device.leds == {e.LED_CAPSL: 1} and h.driver_errors == []


async def test_status_echoes_from_the_evdev_are_not_forwarded() -> None:
    """The kernel passes an LED (sound, autorepeat) change written to an evdev on to
    its readers: our own write comes back.  Forwarded, a guest that pressed Caps Lock
    twice would get "on" after it set "off", flip back and send it again (§5.8.6.2
    statusq): an oscillation.  The echoes are dropped and counted, a group they
    leave empty is dropped, and events around them still go out."""
    async with _served_keyboard() as (source, device, h, theirs):
        tokens = [h.submit(0, writable=[8]) for _ in range(4)]
        # Caps Lock on, then off: both written back to the evdev, which echoes them.
        await h.request(1, [EVENT.pack(e.EV_LED, e.LED_CAPSL, 1)])
        await h.request(1, [EVENT.pack(e.EV_LED, e.LED_CAPSL, 0)])
        _send(theirs, (e.EV_LED, e.LED_CAPSL, 1), (e.EV_SYN, e.SYN_REPORT, 0))
        _send(theirs, (e.EV_LED, e.LED_CAPSL, 0), (e.EV_SYN, e.SYN_REPORT, 0))
        # An echo inside a device's group (the kernel batches both into one report),
        # an autorepeat setting and a bell echoed alone, then a key group.
        _send(theirs, (e.EV_KEY, e.KEY_A, 1), (e.EV_LED, e.LED_NUML, 1))
        _send(theirs, (e.EV_SYN, e.SYN_REPORT, 0))
        _send(theirs, (e.EV_REP, e.REP_DELAY, 250), (e.EV_SND, e.SND_BELL, 1))
        _send(theirs, (e.EV_SYN, e.SYN_REPORT, 0))
        _send(theirs, (e.EV_KEY, e.KEY_A, 0), (e.EV_SYN, e.SYN_REPORT, 0))
        used = [await h.wait_used(0, t) for t in tokens]
        assert [EVENT.unpack(u.data[:8]) for u in used] == [
            (e.EV_KEY, e.KEY_A, 1), (e.EV_SYN, e.SYN_REPORT, 0),
            (e.EV_KEY, e.KEY_A, 0), (e.EV_SYN, e.SYN_REPORT, 0),
        ]  # fmt: skip
        assert (source.events_read, source.status_echoes, source.groups_lost) == (12, 5, 0)
        assert device.leds == {e.LED_CAPSL: 0}  # the driver's last word stands
        assert h.driver_errors == []
