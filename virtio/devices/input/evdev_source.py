"""evdev passthrough: serve a host ``/dev/input/eventN`` as a virtio-input device.

Everything the configuration space reports is read from the device through
python-evdev (``evdev`` on PyPI, which wraps the EVIOCG* ioctls): name, ``uniq``
(the serial), bus/vendor/product/version, INPUT_PROP_* bits, the codes of every
event type, and every absolute axis's min/max/fuzz/flat/resolution (ABS_INFO).
The device is grabbed (EVIOCGRAB) unless ``grab=False``, so the host's own
consumers stop seeing its events while a guest has it.

Events are read as they come and handed to the device in whole SYN_REPORT groups
(a group split across reads is completed first; after SYN_DROPPED, evdev's "events
were lost" marker, the incomplete group is discarded, as libevdev advises).  Status
events from the driver (LEDs, sounds, autorepeat) are written back to the evdev.

Those status types are not forwarded from the evdev to the driver: Linux's input
core passes an LED, sound or autorepeat change written to an evdev on to every
reader of it (the "pass to all" disposition), so what we read back is the driver's
own write, late.  Forwarded, it makes a guest that changed the state again meanwhile
(Caps Lock pressed twice) flip back and send that to the statusq, whose write echoes
again: the LEDs oscillate.  QEMU's input-linux forwards key, relative and absolute
events only; we drop EV_LED, EV_SND and EV_REP (counted: ``status_echoes``) and a
group they leave empty.
"""

from __future__ import annotations

import contextlib
import errno
import logging

import trio
from evdev import InputDevice
from evdev import ecodes as e

from virtio.devices.input.capabilities import AbsInfo, DeviceIds, InputCapabilities
from virtio.devices.input.device import Event, VirtioInput

log = logging.getLogger(__name__)

#: Types the driver sets (§5.8.6.2) that the kernel echoes to an evdev's readers.
ECHOED_TYPES = frozenset({e.EV_LED, e.EV_SND, e.EV_REP})


def capabilities_of(dev: InputDevice, *, name: str | None = None, serial: str | None = None):
    """An ``InputCapabilities`` with everything ``dev`` reports."""
    events: dict[int, frozenset[int]] = {}
    absinfo: dict[int, AbsInfo] = {}
    for type_, codes in dev.capabilities(absinfo=True, verbose=False).items():
        if type_ == e.EV_SYN:
            continue
        if type_ == e.EV_ABS:
            for code, info in codes:
                absinfo[code] = AbsInfo(info.min, info.max, info.fuzz, info.flat, info.resolution)
            events[type_] = frozenset(absinfo)
        else:
            events[type_] = frozenset(codes)
    info = dev.info
    return InputCapabilities(
        name=dev.name if name is None else name,
        serial=(dev.uniq or "") if serial is None else serial,
        ids=DeviceIds(info.bustype, info.vendor, info.product, info.version),
        properties=frozenset(dev.input_props()),
        events=events,
        absinfo=absinfo,
    )


class EvdevSource:
    """An opened (and grabbed) evdev; ``run(device)`` forwards its events.  ``dev``:
    an already opened ``InputDevice`` (tests pass one whose fd is a socket)."""

    def __init__(self, path: str, *, grab: bool = True, dev: InputDevice | None = None) -> None:
        self.path = path
        self.dev = InputDevice(path) if dev is None else dev
        self.grabbed = False
        self.events_read = 0
        self.groups_lost = 0
        self.status_echoes = 0  # EV_LED / EV_SND / EV_REP read and not forwarded
        if grab:
            try:
                self.dev.grab()
            except OSError as exc:
                self.dev.close()
                raise OSError(
                    exc.errno, f"cannot grab {path} (EVIOCGRAB): {exc.strerror}"
                ) from None
            self.grabbed = True

    def capabilities(self, *, name: str | None = None, serial: str | None = None):
        return capabilities_of(self.dev, name=name, serial=serial)

    def write_status(self, type_: int, code: int, value: int) -> None:
        """A driver status event (EV_LED, EV_SND, ...) written back to the evdev."""
        self.dev.write(type_, code, value)
        self.dev.write(e.EV_SYN, e.SYN_REPORT, 0)

    async def run(self, device: VirtioInput) -> None:
        """Forward events until cancelled or the device goes away (unplugged)."""
        partial: list[Event] = []
        fd = self.dev.fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                batch = list(self.dev.read())
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    log.error("%s: the input device went away", self.path)
                    return
                raise
            complete: list[Event] = []
            for ev in batch:
                self.events_read += 1
                if ev.type == e.EV_SYN and ev.code == e.SYN_DROPPED:
                    if partial:
                        self.groups_lost += 1
                    partial = []
                    continue
                if ev.type in ECHOED_TYPES:
                    self.status_echoes += 1
                    continue
                partial.append((ev.type, ev.code, ev.value))
                if ev.type == e.EV_SYN and ev.code == e.SYN_REPORT:
                    if len(partial) > 1:  # not a group of echoes alone
                        complete += partial
                    partial = []
            if complete:
                device.inject(complete)

    def close(self) -> None:
        if self.grabbed:
            with contextlib.suppress(OSError):  # already gone (unplugged)
                self.dev.ungrab()
            self.grabbed = False
        self.dev.close()
