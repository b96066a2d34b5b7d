"""Host-side virtual input devices for tests, through ``/dev/uinput`` (python-evdev's
``UInput``): an evdev node with given capabilities that the passthrough then serves,
whose LEDs (set by the guest through the statusq) can be read back.

Skip when :func:`uinput_unavailable` returns a reason (no ``/dev/uinput``: the
``uinput`` module is not loaded or the kernel has none).
"""

from __future__ import annotations

import gzip
import os

from evdev import AbsInfo as EvdevAbsInfo
from evdev import UInput
from evdev import ecodes as e

from virtio.devices.input.capabilities import InputCapabilities

UINPUT = "/dev/uinput"


def uinput_unavailable() -> str | None:
    """Why uinput devices cannot be made here, or ``None``."""
    if not os.path.exists(UINPUT):
        release = os.uname().release
        try:
            with gzip.open("/proc/config.gz", "rt") as f:
                if "# CONFIG_INPUT_UINPUT is not set" in f.read():
                    return f"{UINPUT} absent: kernel {release} is built without uinput"
        except OSError:
            pass
        return f"{UINPUT} absent (kernel {release} without uinput, or `modprobe uinput` not run)"
    if not os.access(UINPUT, os.R_OK | os.W_OK):
        return f"{UINPUT} not writable"
    return None


def create_uinput(caps: InputCapabilities) -> UInput:
    """A host evdev device reporting ``caps`` (name, IDs, properties, every event
    code and ABS_INFO); ``.device`` is its ``InputDevice``, ``.write`` emits events."""
    events: dict[int, list] = {}
    for type_, codes in caps.events.items():
        if type_ == e.EV_ABS:
            events[type_] = [
                (c, EvdevAbsInfo(0, i.min, i.max, i.fuzz, i.flat, i.res))
                for c, i in sorted(caps.absinfo.items())
            ]
        else:
            events[type_] = sorted(codes)
    return UInput(
        events,
        name=caps.name,
        vendor=caps.ids.vendor,
        product=caps.ids.product,
        version=caps.ids.version,
        bustype=caps.ids.bustype,
        input_props=sorted(caps.properties),
    )
