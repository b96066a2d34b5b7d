"""Input events by name or number, and the event sequences of high-level actions.

Names are Linux's (``include/uapi/linux/input-event-codes.h``) as python-evdev's
``ecodes`` tables carry them: ``{"type": "EV_KEY", "code": "KEY_A", "value": 1}`` and
``{"type": 1, "code": 30, "value": 1}`` are the same event.  The sequences follow
what a real device of the kind emits: key down/up framed by SYN_REPORT, relative
motion, absolute pointer moves, and the multitouch type-B protocol (ABS_MT_SLOT,
ABS_MT_TRACKING_ID -1 on lift; Documentation/input/multi-touch-protocol.rst).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from evdev import ecodes as e

from virtio.devices.input.capabilities import InputCapabilities
from virtio.devices.input.device import Event

SYN: Event = (e.EV_SYN, e.SYN_REPORT, 0)


class EventError(ValueError):
    """An event that cannot be resolved or that the device does not support."""


def event_type(value: Any) -> int:
    if isinstance(value, bool):
        raise EventError(f"bad event type {value!r}")
    if isinstance(value, int):
        if value not in e.EV:
            raise EventError(f"unknown event type {value}")
        return value
    if isinstance(value, str) and value in e.ecodes and value.startswith("EV_"):
        return int(e.ecodes[value])
    raise EventError(f"unknown event type {value!r}")


def event_code(type_: int, value: Any) -> int:
    if isinstance(value, bool):
        raise EventError(f"bad event code {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= 0xFFFF:
            raise EventError(f"event code {value} out of range")
        return value
    if isinstance(value, str) and value in e.ecodes:
        code = int(e.ecodes[value])
        if code in e.bytype.get(type_, {}):
            names = e.bytype[type_][code]
            names = names if isinstance(names, (list, tuple)) else (names,)
            if value in names:
                return code
        raise EventError(f"{value} is not a code of {e.EV[type_]}")
    raise EventError(f"unknown event code {value!r}")


def parse_event(obj: Mapping[str, Any], caps: InputCapabilities | None = None) -> Event:
    """``{"type", "code", "value"}`` (names or numbers) -> ``(type, code, value)``;
    with ``caps``, an event the device does not report is refused."""
    if not isinstance(obj, Mapping):
        raise EventError(f"an event is an object, not {type(obj).__name__}")
    unknown = set(obj) - {"type", "code", "value"}
    if unknown:
        raise EventError(f"unknown event member(s) {sorted(unknown)}")
    t = event_type(obj.get("type"))
    c = event_code(t, obj.get("code", 0))
    v = obj.get("value", 0)
    if isinstance(v, bool) or not isinstance(v, int) or not -(2**31) <= v < 2**31:
        raise EventError(f"event value {v!r} is not a 32-bit integer")
    if caps is not None and not caps.supports(t, c):
        raise EventError(f"the device does not report {e.EV[t]} code {c}")
    return (t, c, v)


# -- keyboard -------------------------------------------------------------------------

_SHIFTED = {
    **{c: c.lower() for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
    "!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8",
    "(": "9", ")": "0", "_": "-", "+": "=", "{": "[", "}": "]", "|": "\\", ":": ";",
    '"': "'", "<": ",", ">": ".", "?": "/", "~": "`",
}  # fmt: skip
_PLAIN = {
    **{c: f"KEY_{c.upper()}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"},
    " ": "KEY_SPACE", "\n": "KEY_ENTER", "\t": "KEY_TAB", "-": "KEY_MINUS",
    "=": "KEY_EQUAL", "[": "KEY_LEFTBRACE", "]": "KEY_RIGHTBRACE", "\\": "KEY_BACKSLASH",
    ";": "KEY_SEMICOLON", "'": "KEY_APOSTROPHE", ",": "KEY_COMMA", ".": "KEY_DOT",
    "/": "KEY_SLASH", "`": "KEY_GRAVE",
}  # fmt: skip


def key(code: int, value: int) -> list[Event]:
    return [(e.EV_KEY, code, value), SYN]


def type_text(text: str) -> list[Event]:
    """Key presses typing ``text`` on a US layout (shift held for capitals/symbols)."""
    out: list[Event] = []
    for ch in text:
        shifted = ch in _SHIFTED
        name = _PLAIN.get(_SHIFTED.get(ch, ch))
        if name is None:
            raise EventError(f"no US-layout key types {ch!r}")
        code = int(e.ecodes[name])
        if shifted:
            out += key(e.KEY_LEFTSHIFT, 1)
        out += key(code, 1) + key(code, 0)
        if shifted:
            out += key(e.KEY_LEFTSHIFT, 0)
    return out


# -- pointers -------------------------------------------------------------------------

BUTTONS = {"left": e.BTN_LEFT, "right": e.BTN_RIGHT, "middle": e.BTN_MIDDLE}


def move(caps: InputCapabilities, x: int, y: int) -> list[Event]:
    """Relative motion (mouse) or an absolute position (tablet), one group."""
    if caps.supports(e.EV_ABS, e.ABS_X) and caps.supports(e.EV_ABS, e.ABS_Y):
        for axis, v in ((e.ABS_X, x), (e.ABS_Y, y)):
            info = caps.absinfo[axis]
            if not info.min <= v <= info.max:
                raise EventError(f"{e.ABS[axis]} {v} outside [{info.min}, {info.max}]")
        return [(e.EV_ABS, e.ABS_X, x), (e.EV_ABS, e.ABS_Y, y), SYN]
    if caps.supports(e.EV_REL, e.REL_X):
        return [(e.EV_REL, e.REL_X, x), (e.EV_REL, e.REL_Y, y), SYN]
    raise EventError("the device is not a pointer")


def click(caps: InputCapabilities, button: str = "left") -> list[Event]:
    code = BUTTONS.get(button)
    if code is None or not caps.supports(e.EV_KEY, code):
        raise EventError(f"no button {button!r} on this device")
    return key(code, 1) + key(code, 0)


# -- multitouch (type B) ------------------------------------------------------------


class TouchState:
    """Tracks which slots are down and hands out tracking IDs (type-B protocol)."""

    def __init__(self, caps: InputCapabilities) -> None:
        if not caps.supports(e.EV_ABS, e.ABS_MT_SLOT):
            raise EventError("the device is not a multitouch device")
        self.caps = caps
        self.slots = caps.absinfo[e.ABS_MT_SLOT].max + 1
        self.down: dict[int, int] = {}
        self.next_id = 0

    def _check(self, slot: int, x: int | None = None, y: int | None = None) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise EventError(f"slot {slot!r} outside 0..{self.slots - 1}")
        for axis, v in ((e.ABS_MT_POSITION_X, x), (e.ABS_MT_POSITION_Y, y)):
            info = self.caps.absinfo[axis]
            if v is not None and not (isinstance(v, int) and info.min <= v <= info.max):
                raise EventError(f"{e.ABS[axis]} {v!r} outside [{info.min}, {info.max}]")

    def _pointer(self) -> list[Event]:
        # Single-touch emulation for old clients: BTN_TOUCH and ABS_X/Y follow the
        # lowest slot that is down.
        return [(e.EV_KEY, e.BTN_TOUCH, 1 if self.down else 0)]

    def touch(self, action: str, points: Iterable[Mapping[str, Any]]) -> list[Event]:
        """One frame: ``down``/``move`` (slot, x, y) or ``up`` (slot) for each point."""
        out: list[Event] = []
        first: tuple[int, int] | None = None
        for p in points:
            slot = p.get("slot", 0)
            x, y = p.get("x"), p.get("y")
            if action == "up":
                self._check(slot)
                if slot not in self.down:
                    raise EventError(f"slot {slot} is not down")
                del self.down[slot]
                out += [(e.EV_ABS, e.ABS_MT_SLOT, slot), (e.EV_ABS, e.ABS_MT_TRACKING_ID, -1)]
                continue
            if x is None or y is None:
                raise EventError(f"{action} needs x and y")
            self._check(slot, x, y)
            out.append((e.EV_ABS, e.ABS_MT_SLOT, slot))
            if action == "down":
                if slot in self.down:
                    raise EventError(f"slot {slot} is already down")
                self.down[slot] = self.next_id
                out.append((e.EV_ABS, e.ABS_MT_TRACKING_ID, self.next_id))
                self.next_id = (self.next_id + 1) % 65536
            elif action == "move":
                if slot not in self.down:
                    raise EventError(f"slot {slot} is not down")
            else:
                raise EventError(f"unknown touch action {action!r} (down, move, up)")
            out += [(e.EV_ABS, e.ABS_MT_POSITION_X, x), (e.EV_ABS, e.ABS_MT_POSITION_Y, y)]
            if first is None:
                first = (x, y)
        out += self._pointer()
        if first is not None:
            out += [(e.EV_ABS, e.ABS_X, first[0]), (e.EV_ABS, e.ABS_Y, first[1])]
        out.append(SYN)
        return out
