"""What an input device reports about itself, as virtio-input's configuration space
serves it (virtio 1.4 §5.8.4): name, serial, IDs, properties, the codes of every
event type, and the range of every absolute axis.

``InputCapabilities.config_payload(select, subsel)`` answers one select/subsel
pair with the ``u`` union's bytes; an empty payload is "not supported" (size 0).
The built-in kinds (``keyboard``, ``mouse``, ``tablet``, ``multitouch``) report what
such real devices report, including the ABS_INFO ranges and INPUT_PROP_* bits that
tablets and touchscreens need to be usable.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Mapping

from evdev import ecodes as e

from virtio.spec.input import VIRTIO_INPUT_CFG_UNION_SIZE, InputConfigSelect
from virtio.spec.input import virtio_input_absinfo as _absinfo_struct

Sel = InputConfigSelect
BITMAP_CODES = VIRTIO_INPUT_CFG_UNION_SIZE * 8
"""Codes a 128-byte bitmap can describe (0..1023): KEY_MAX is 0x2ff."""


@dataclasses.dataclass(frozen=True)
class AbsInfo:
    """One absolute axis (``struct virtio_input_absinfo``, §5.8.4)."""

    min: int
    max: int
    fuzz: int = 0
    flat: int = 0
    res: int = 0

    def pack(self) -> bytes:
        # The spec's fields are le32; min may be negative (two's complement).
        return struct.pack("<5i", self.min, self.max, self.fuzz, self.flat, self.res)


assert _absinfo_struct.sizeof() == 20


@dataclasses.dataclass(frozen=True)
class DeviceIds:
    """``struct virtio_input_devids`` (§5.8.4)."""

    bustype: int = e.BUS_VIRTUAL
    vendor: int = 0
    product: int = 0
    version: int = 0

    def pack(self) -> bytes:
        return struct.pack("<4H", self.bustype, self.vendor, self.product, self.version)


def bitmap(codes: Iterable[int]) -> bytes:
    """Bits set at ``codes``, trimmed after the last non-zero byte (size = its length)."""
    out = bytearray(VIRTIO_INPUT_CFG_UNION_SIZE)
    for code in codes:
        if not 0 <= code < BITMAP_CODES:
            raise ValueError(f"code {code} does not fit a virtio-input bitmap")
        out[code // 8] |= 1 << (code % 8)
    return bytes(out).rstrip(b"\0")


@dataclasses.dataclass
class InputCapabilities:
    """Everything virtio-input's configuration space reports (§5.8.4)."""

    name: str
    serial: str = ""
    ids: DeviceIds = dataclasses.field(default_factory=DeviceIds)
    properties: frozenset[int] = frozenset()
    events: Mapping[int, frozenset[int]] = dataclasses.field(default_factory=dict)
    """Event type (EV_KEY, ...) -> its supported codes.  EV_SYN is implied."""
    absinfo: Mapping[int, AbsInfo] = dataclasses.field(default_factory=dict)
    """ABS_* axis -> its range; every code of ``events[EV_ABS]`` has one."""

    def __post_init__(self) -> None:
        missing = set(self.events.get(e.EV_ABS, ())) - set(self.absinfo)
        if missing:
            raise ValueError(f"absolute axes without ABS_INFO: {sorted(missing)}")
        self.events = {t: frozenset(c) for t, c in self.events.items() if c}
        self.properties = frozenset(self.properties)

    def supports(self, type_: int, code: int) -> bool:
        if type_ == e.EV_SYN:
            return True
        return code in self.events.get(type_, ())

    def config_payload(self, select: int, subsel: int) -> bytes:
        """The ``u`` bytes for ``select``/``subsel``; ``b""`` (size 0) when unsupported
        (§5.8.4: "If the device does not support the given select and subsel
        combination, it MUST set size to zero")."""
        if select == Sel.VIRTIO_INPUT_CFG_ID_NAME and subsel == 0:
            return _string(self.name)
        if select == Sel.VIRTIO_INPUT_CFG_ID_SERIAL and subsel == 0:
            return _string(self.serial)
        if select == Sel.VIRTIO_INPUT_CFG_ID_DEVIDS and subsel == 0:
            return self.ids.pack()
        if select == Sel.VIRTIO_INPUT_CFG_PROP_BITS and subsel == 0:
            return bitmap(self.properties)
        if select == Sel.VIRTIO_INPUT_CFG_EV_BITS:
            if subsel == e.EV_SYN:  # the type bitmap itself is not asked for (Linux: 0)
                return b""
            return bitmap(self.events.get(subsel, ()))
        if select == Sel.VIRTIO_INPUT_CFG_ABS_INFO:
            info = self.absinfo.get(subsel)
            if info is not None and subsel in self.events.get(e.EV_ABS, ()):
                return info.pack()
        return b""

    def describe(self) -> dict:
        """JSON-able summary (control socket ``query-input``)."""
        return {
            "name": self.name,
            "serial": self.serial,
            "ids": dataclasses.asdict(self.ids),
            "properties": sorted(_name(e.INPUT_PROP, p) for p in self.properties),
            "events": {
                _name(e.EV, t): sorted(_name(e.bytype.get(t, {}), c) for c in codes)
                for t, codes in sorted(self.events.items())
            },
            "absinfo": {
                _name(e.ABS, axis): dataclasses.asdict(info)
                for axis, info in sorted(self.absinfo.items())
            },
        }


def _string(text: str) -> bytes:
    data = text.encode()
    if len(data) > VIRTIO_INPUT_CFG_UNION_SIZE:
        data = data[:VIRTIO_INPUT_CFG_UNION_SIZE]
    return data


def _name(table: Mapping[int, object], code: int) -> str:
    n = table.get(code)
    if isinstance(n, (list, tuple)):
        n = n[0]
    return str(n) if n is not None else str(code)


# -- built-in kinds -------------------------------------------------------------------

PRODUCT_IDS = {"keyboard": 0x0001, "mouse": 0x0002, "tablet": 0x0003, "multitouch": 0x0004}
VENDOR_ID = 0x1AF4
"""Red Hat's (virtio's) PCI vendor ID, as QEMU's virtio-input devices report."""

TABLET_MAX = 32767
TOUCH_SLOTS = 10


def _keyboard_keys() -> frozenset[int]:
    # Every KEY_* a PC keyboard has (codes 1..KEY_MICMUTE), none of the BTN_* range.
    return frozenset(c for c in range(1, e.KEY_MICMUTE + 1) if c in e.KEY and c < e.BTN_MISC)


def builtin(kind: str, *, name: str | None = None, serial: str = "") -> InputCapabilities:
    """A built-in device: ``keyboard`` (keys, LEDs, autorepeat), ``mouse`` (relative,
    3 buttons + wheel), ``tablet`` (absolute 0..32767, INPUT_PROP_DIRECT off: a
    pointer), ``multitouch`` (type-B protocol, 10 slots, INPUT_PROP_DIRECT)."""
    ids = DeviceIds(e.BUS_VIRTUAL, VENDOR_ID, PRODUCT_IDS[kind], 1)
    default = f"pyvirtio {kind}"
    if kind == "keyboard":
        events = {
            e.EV_KEY: _keyboard_keys(),
            e.EV_LED: frozenset({e.LED_NUML, e.LED_CAPSL, e.LED_SCROLLL}),
            e.EV_REP: frozenset({e.REP_DELAY, e.REP_PERIOD}),
            e.EV_MSC: frozenset({e.MSC_SCAN}),
        }
        return InputCapabilities(name or default, serial, ids, frozenset(), events)
    if kind == "mouse":
        events = {
            e.EV_KEY: frozenset({e.BTN_LEFT, e.BTN_RIGHT, e.BTN_MIDDLE}),
            e.EV_REL: frozenset({e.REL_X, e.REL_Y, e.REL_WHEEL}),
        }
        return InputCapabilities(name or default, serial, ids, frozenset(), events)
    if kind == "tablet":
        axis = AbsInfo(0, TABLET_MAX)
        events = {
            e.EV_KEY: frozenset({e.BTN_LEFT, e.BTN_RIGHT, e.BTN_MIDDLE}),
            e.EV_ABS: frozenset({e.ABS_X, e.ABS_Y}),
            e.EV_REL: frozenset({e.REL_WHEEL}),
        }
        absinfo = {e.ABS_X: axis, e.ABS_Y: axis}
        return InputCapabilities(name or default, serial, ids, frozenset(), events, absinfo)
    if kind == "multitouch":
        # A 1920x1080 panel, 10 points per mm (res in units/mm, as Linux expects).
        x, y = AbsInfo(0, 1919, 0, 0, 10), AbsInfo(0, 1079, 0, 0, 10)
        absinfo = {
            e.ABS_X: x,
            e.ABS_Y: y,
            e.ABS_MT_SLOT: AbsInfo(0, TOUCH_SLOTS - 1),
            e.ABS_MT_TRACKING_ID: AbsInfo(0, 65535),
            e.ABS_MT_POSITION_X: x,
            e.ABS_MT_POSITION_Y: y,
        }
        events = {
            e.EV_KEY: frozenset({e.BTN_TOUCH}),
            e.EV_ABS: frozenset(absinfo),
        }
        props = frozenset({e.INPUT_PROP_DIRECT})
        return InputCapabilities(name or default, serial, ids, props, events, absinfo)
    raise ValueError(f"unknown input kind {kind!r} (keyboard, mouse, tablet, multitouch)")


KINDS = tuple(PRODUCT_IDS)
