"""evdev passthrough against a real kernel evdev, run inside a Linux guest.

Where the host kernel has no input subsystem (no ``/dev/uinput``), the passthrough is
checked in the QEMU test guest instead (tests/integration/test_input_evdev_in_guest.py):
the guest mounts the host's root file system read-only over 9p, chroots into it and
runs ``python -m virtio.testing.evdev_in_guest`` with the project's venv.  This script:

1. creates a uinput device with the capabilities of :data:`DECLARED` (name, IDs,
   INPUT_PROP_* bits, keys, LEDs, MSC_SCAN and absolute axes with full ABS_INFO);
2. serves it with what ``virtio serve input --evdev-path`` builds
   (``build_input_device``: ``EvdevSource`` grabbed, ``VirtioInput``; then
   ``VhostUserServer``) and connects the testing kit's
   ``VhostUserFrontend`` to it (no VM in the VM);
3. reads every select/subsel of the configuration space (virtio 1.4 §5.8.4:
   ``select``/``subsel`` written with SET_CONFIG, ``size`` and ``u`` read back);
4. writes event groups to uinput and collects them from the eventq (§5.8.6.1), one
   of them while the driver has posted fewer buffers than the group has events;
5. checks EVIOCGRAB: a second opener cannot grab and receives nothing while the
   device is served; with ``grab=False`` a second opener can grab;
6. posts a status event (EV_LED LED_CAPSL 1) on the statusq (§5.8.6.2) and reads
   what reaches the uinput file descriptor; once the source has read the kernel's
   echo of that LED change (the evdev passes it to its readers), writes a key group
   and records what comes on the eventq next (the key group: the echo is dropped).

It reports observations, not verdicts: one line ``@@EVDEV-RESULT <json>@@`` that the
host test compares with :data:`DECLARED` by its own encoding of the spec's structs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import sys
import tempfile
from typing import Any

import trio
from evdev import AbsInfo, InputDevice, UInput
from evdev import ecodes as e

from virtio.cli.serve_input import build_input_device
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.messages import ConfigSpace
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.server import VhostUserServer

MARKER = "@@EVDEV-RESULT"
MiB = 1 << 20
QUEUE = 64
EVENT_SIZE = 8  # struct virtio_input_event: le16 type, le16 code, le32 value

#: What the uinput device declares (and what the configuration space must report).
DECLARED: dict[str, Any] = {
    "name": "pyvirtio uinput pen tablet",
    "ids": {"bustype": e.BUS_USB, "vendor": 0x1234, "product": 0x5678, "version": 0x0111},
    "properties": [e.INPUT_PROP_POINTER, e.INPUT_PROP_DIRECT],
    "events": {
        e.EV_KEY: [e.KEY_A, e.KEY_CAPSLOCK, e.BTN_TOUCH, e.BTN_TOOL_PEN, e.BTN_STYLUS],
        e.EV_LED: [e.LED_NUML, e.LED_CAPSL],
        e.EV_MSC: [e.MSC_SCAN],
    },
    # axis: (min, max, fuzz, flat, resolution)
    "absinfo": {
        e.ABS_X: (0, 32767, 4, 8, 100),
        e.ABS_Y: (-500, 1500, 2, 0, 50),
        e.ABS_PRESSURE: (0, 1023, 0, 0, 0),
    },
}

#: Event groups written to uinput, in order (SYN_REPORT appended to each).  Values
#: differ from the previous ones by more than the fuzz, so the kernel passes them on.
GROUP_HELD = [(e.EV_ABS, e.ABS_X, 1000), (e.EV_ABS, e.ABS_Y, -200), (e.EV_KEY, e.BTN_TOUCH, 1)]
GROUPS = [
    [(e.EV_MSC, e.MSC_SCAN, 0x70004), (e.EV_KEY, e.KEY_A, 1)],
    [(e.EV_KEY, e.KEY_A, 0)],
    *[[(e.EV_ABS, e.ABS_X, 2000 + 100 * i), (e.EV_ABS, e.ABS_PRESSURE, 10 + i)] for i in range(20)],
    [(e.EV_KEY, e.BTN_TOUCH, 0)],
]
#: Written after the status event: the next group on the eventq.
AFTER_STATUS = [(e.EV_KEY, e.KEY_CAPSLOCK, 1)]

#: (select, subsel) pairs read from the configuration space (§5.8.4): every select the
#: spec defines over the subsel range it can take, and an undefined select.
SELECTS = [
    (0x01, 0),  # VIRTIO_INPUT_CFG_ID_NAME
    (0x02, 0),  # VIRTIO_INPUT_CFG_ID_SERIAL
    (0x03, 0),  # VIRTIO_INPUT_CFG_ID_DEVIDS
    (0x10, 0),  # VIRTIO_INPUT_CFG_PROP_BITS
    *[(0x11, t) for t in range(e.EV_CNT)],  # VIRTIO_INPUT_CFG_EV_BITS
    *[(0x12, a) for a in range(e.ABS_CNT)],  # VIRTIO_INPUT_CFG_ABS_INFO
    (0x00, 0),  # VIRTIO_INPUT_CFG_UNSET
    (0x7F, 0),  # not a select value
]


def create_device() -> UInput:
    events: dict[int, list] = {t: list(c) for t, c in DECLARED["events"].items()}
    events[e.EV_ABS] = [
        (axis, AbsInfo(0, *info)) for axis, info in sorted(DECLARED["absinfo"].items())
    ]
    ids = DECLARED["ids"]
    return UInput(
        events,
        name=DECLARED["name"],
        bustype=ids["bustype"],
        vendor=ids["vendor"],
        product=ids["product"],
        version=ids["version"],
        input_props=DECLARED["properties"],
    )


def _pack(ev: tuple[int, int, int]) -> bytes:
    return ev[0].to_bytes(2, "little") + ev[1].to_bytes(2, "little") + ev[2].to_bytes(4, "little")


def _unpack(data: bytes) -> list[int]:
    return [
        int.from_bytes(data[0:2], "little"),
        int.from_bytes(data[2:4], "little"),
        int.from_bytes(data[4:8], "little", signed=True),
    ]


def _serve_options(path: str, *, no_grab: bool) -> tuple[Any, Any]:
    """(VirtioInput, EvdevSource) as ``virtio serve input --evdev-path PATH
    [--no-grab]`` builds them (name and serial from the device)."""
    args = argparse.Namespace(evdev_path=path, kind=None, no_grab=no_grab, name=None, serial=None)
    return build_input_device(args)


def _try_grab(path: str) -> int:
    """0 if a second opener could grab ``path`` (released again), else the errno."""
    other = InputDevice(path)
    try:
        other.grab()
    except OSError as exc:
        return exc.errno or -1
    else:
        other.ungrab()
        return 0
    finally:
        other.close()


async def _read_config(fe: VhostUserFrontend) -> dict[str, str]:
    out: dict[str, str] = {}
    for sel, sub in SELECTS:
        await fe.request(R.SET_CONFIG, ConfigSpace(0, 0, bytes([sel, sub])))
        raw = await fe.get_config(0, 8 + 128)
        if raw[0] != sel or raw[1] != sub:
            raise AssertionError(f"select/subsel read back as {raw[:2].hex()}")
        size = raw[2]
        if size:
            out[f"{sel:#04x}/{sub:#04x}"] = raw[8 : 8 + size].hex()
    return out


async def run_checks(sock_dir: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    ui = create_device()
    path = ui.device.path
    result["evdev"] = path
    device, source = _serve_options(path, no_grab=False)  # grabbed
    ram = GuestRam(4 * MiB)
    watcher = InputDevice(path)  # a host consumer: must see nothing while grabbed
    try:
        result["uniq"] = source.dev.uniq or ""
        server = VhostUserServer(device, name="virtio-input")
        sock = os.path.join(sock_dir, "input.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_path, sock)
            nursery.start_soon(source.run, device)
            fe = await VhostUserFrontend.connect(sock)
            await fe.negotiate()
            result["config"] = await _read_config(fe)
            await fe.set_mem_table(ram)
            eventq = await fe.setup_vring(0, ram, size=QUEUE)
            statusq = await fe.setup_vring(1, ram, size=QUEUE, offset=2 * MiB)
            result["grab_errno_while_served"] = _try_grab(path)

            # A group longer than the buffers posted: held whole, not split (§5.8.6.1).
            for _ in range(2):
                eventq.driver.add([], [EVENT_SIZE])
            eventq.publish_and_kick()
            for ev in GROUP_HELD:
                ui.write(*ev)
            ui.syn()
            with trio.fail_after(60):
                while device.held_events < len(GROUP_HELD) + 1:
                    await trio.sleep(0.01)
            result["used_while_held"] = len(eventq.driver.get_used())
            for _ in range(QUEUE - 2):
                eventq.driver.add([], [EVENT_SIZE])
            eventq.publish_and_kick()
            received = [
                _unpack(u.data) for u in await eventq.wait_used(len(GROUP_HELD) + 1, timeout=60)
            ]

            # The other groups, one at a time, each buffer reposted once used.
            for group in GROUPS:
                for ev in group:
                    ui.write(*ev)
                ui.syn()
                used = await eventq.wait_used(len(group) + 1, timeout=60)
                received += [_unpack(u.data) for u in used]
                for _ in used:
                    eventq.driver.add([], [EVENT_SIZE])
                eventq.publish_and_kick()
            result["received"] = received
            try:
                result["watcher_events"] = len(list(watcher.read()))
            except BlockingIOError:
                result["watcher_events"] = 0

            # A status event from the driver, written back to the evdev (§5.8.6.2).
            statusq.driver.add([_pack((e.EV_LED, e.LED_CAPSL, 1))], [])
            statusq.publish_and_kick()
            await statusq.wait_used(1, timeout=60)
            result["uinput_fd_events"] = _read_uinput(ui)
            # Linux passes an LED change written to an evdev to its readers too (the
            # input core's EV_LED disposition is "pass to all" when the state changes):
            # the grabbed source reads it back and drops it (EvdevSource docstring).
            with trio.fail_after(60):
                while source.status_echoes < 1:
                    await trio.sleep(0.01)
            result["status_echoes"] = source.status_echoes
            for ev in AFTER_STATUS:
                ui.write(*ev)
            ui.syn()
            after = await eventq.wait_used(len(AFTER_STATUS) + 1, timeout=60)
            result["eventq_after_status"] = [_unpack(u.data) for u in after]
            result["leds"] = sorted(ui.device.leds())
            result["statistics"] = device.statistics()
            result["events_read"] = source.events_read
            await fe.aclose()
            nursery.cancel_scope.cancel()
    finally:
        watcher.close()
        source.close()
        ram.close()
    result["grab_errno_after_close"] = _try_grab(path)
    _, nograb = _serve_options(path, no_grab=True)
    try:
        result["grab_errno_no_grab"] = _try_grab(path)
    finally:
        nograb.close()
    ui.close()
    return result


def _read_uinput(ui: UInput, timeout: float = 30.0) -> list[list[int]]:
    """Events the kernel sent to the uinput fd (EV_LED, EV_UINPUT, ...) until EV_LED."""
    out: list[list[int]] = []
    while not any(ev[0] == e.EV_LED for ev in out):
        ready, _, _ = select.select([ui.fd], [], [], timeout)
        if not ready:
            break
        try:
            out += [[ev.type, ev.code, ev.value] for ev in ui.read()]
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
    return out


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-evdev-") as tmp:
        result = trio.run(run_checks, tmp)
    print(f"{MARKER} {json.dumps(result)}@@", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
