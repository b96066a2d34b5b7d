"""Control-socket commands of a virtio-input device (``virtio serve input --control``).

Raw event lines (no ``execute``) go to the registry's default handler::

    {"type": "EV_KEY", "code": "KEY_A", "value": 1}          # + SYN_REPORT added
    {"events": [{"type": "EV_ABS", "code": "ABS_X", "value": 5}, ...]}  # one line, framed

Commands (``{"execute": NAME, "arguments": {...}}``):

* ``inject`` ``{"events": [...]}``: raw events, SYN_REPORT added after the last
  when missing;
* ``type`` ``{"text": "Hello"}``: key presses (US layout);
* ``key`` ``{"key": "KEY_CAPSLOCK", "value": 1}`` (``value`` omitted: press + release);
* ``move`` ``{"x": N, "y": N}``: relative (mouse) or absolute (tablet);
* ``click`` ``{"button": "left"}``;
* ``touch`` ``{"action": "down"|"move"|"up", "points": [{"slot": 0, "x": N, "y": N}]}``
  (or one point's ``slot``/``x``/``y`` directly);
* ``query-input``: capabilities, LED state, statistics.

Every command answers ``{"groups": N, "events": N, "dropped": N}`` (groups refused
because too many events are held) or an ``ArgumentError`` naming what was wrong.
"""

from __future__ import annotations

from typing import Any

from evdev import ecodes as e

from virtio.control import ArgumentError, CommandRegistry
from virtio.devices.input import events as ev
from virtio.devices.input.device import Event, VirtioInput, frame


def register_input_commands(registry: CommandRegistry, device: VirtioInput) -> None:
    """Register the commands above (and the raw-line default handler) for ``device``."""
    caps = device.capabilities
    touch: ev.TouchState | None = None
    if caps.supports(e.EV_ABS, e.ABS_MT_SLOT):
        touch = ev.TouchState(caps)

    def send(events: list[Event]) -> dict[str, int]:
        groups = frame(events)
        accepted = device.inject(events)
        return {
            "groups": accepted,
            "events": sum(len(g) for g in groups),
            "dropped": len(groups) - accepted,
        }

    def parse_list(items: Any) -> list[Event]:
        if not isinstance(items, list) or not items:
            raise ArgumentError("'events' must be a non-empty list of events")
        try:
            return [ev.parse_event(item, caps) for item in items]
        except ev.EventError as exc:
            raise ArgumentError(str(exc)) from None

    def raw(obj: dict[str, Any]) -> dict[str, int]:
        if "events" in obj:
            if set(obj) - {"events", "id"}:
                raise ArgumentError("a line with 'events' has no other members")
            return send(parse_list(obj["events"]))
        try:
            return send([ev.parse_event({k: v for k, v in obj.items() if k != "id"}, caps)])
        except ev.EventError as exc:
            raise ArgumentError(str(exc)) from None

    def guarded(build):
        def handler(args: dict[str, Any]) -> dict[str, int]:
            try:
                return send(build(args))
            except ev.EventError as exc:
                raise ArgumentError(str(exc)) from None

        return handler

    def key(args: dict[str, Any]) -> list[Event]:
        code = ev.event_code(e.EV_KEY, args["key"])
        if not caps.supports(e.EV_KEY, code):
            raise ev.EventError(f"the device has no key {args['key']}")
        if "value" in args:
            return ev.key(code, int(args["value"]))
        return ev.key(code, 1) + ev.key(code, 0)

    def type_(args: dict[str, Any]) -> list[Event]:
        text = args["text"]
        if not isinstance(text, str):
            raise ev.EventError("'text' must be a string")
        events = ev.type_text(text)
        for t, c, _ in events:
            if not caps.supports(t, c):
                raise ev.EventError(f"the device has no key {e.KEY[c]}")
        return events

    def touch_(args: dict[str, Any]) -> list[Event]:
        if touch is None:
            raise ev.EventError("the device is not a multitouch device")
        points = args.get("points")
        if points is None:
            points = [{k: args[k] for k in ("slot", "x", "y") if k in args}]
        if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
            raise ev.EventError("'points' must be a list of {slot, x, y} objects")
        return touch.touch(args["action"], points)

    def query(args: dict[str, Any]) -> dict[str, Any]:
        return {
            **caps.describe(),
            "leds": {e.LED.get(c, str(c)): v for c, v in sorted(device.leds.items())},
            "statistics": device.statistics(),
            "driver": device.active is not None,
        }

    registry.set_default(raw)
    registry.register(
        "inject", guarded(lambda a: parse_list(a["events"])), help="inject raw events"
    )
    registry.register("type", guarded(type_), help="type a string (US layout)")
    registry.register("key", guarded(key), help="press/release a key")
    registry.register(
        "move", guarded(lambda a: ev.move(caps, a["x"], a["y"])), help="move the pointer"
    )
    registry.register(
        "click",
        guarded(lambda a: ev.click(caps, a.get("button", "left"))),
        help="click a button",
    )
    registry.register("touch", guarded(touch_), help="touch down/move/up per slot")
    registry.register("query-input", query, help="capabilities, LEDs, statistics")
