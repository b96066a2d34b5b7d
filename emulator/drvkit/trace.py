"""Traces of a ``run-driver`` session (``--trace FILE``) and their replay
(``virtio trace show FILE``).

Line format (one event per line, UTF-8; ``#`` lines are comments)::

    SEQ EXIT T_US KIND key=value key=value ...

``SEQ`` numbers the events from 0, ``EXIT`` is the guest time in exits (the device
clock of ``--timing``; identical on KVM and the software CPU), ``T_US`` wall-clock
microseconds since the start.  Values are integers (decimal, or ``0x`` hex for
``value off isr old new`` above 9), bare words, or JSON strings in double quotes.
Kinds and their keys:

=============  ===================================================================
``read``       register read: ``reg off size value``
``write``      register write: ``reg off size value``
``notify``     available buffer notification: ``queue`` (§4.2.3.3)
``irq``        the interrupt line changed: ``level isr`` (§4.2.3.4)
``status``     device status changed: ``old new names`` (§2.1)
``pop``        the device took a chain: ``queue head ndesc ring segs`` (``segs``:
               ``ADDR+LEN:r|w`` comma-separated)
``defer``      a request the timing model lets the device process later: ``queue head until``
``hold``       a finished chain held by the timing model: ``queue head until``
``used``       used entries written: ``queue heads lens`` (comma-separated, in ring order)
``inject``     an injected fault: ``kind spec note``
``host``       the device's host side acted (input: keys typed): ``note``
``error``      a driver error: ``class clause label message`` (+ ``reg``/``rip``)
``result``     the program's result: ``value``
``halt``       the run ended otherwise: ``reason``
=============  ===================================================================

The JSON twin (``FILE.json``) is the Chrome trace-event format, which Perfetto and
chrome://tracing open: register accesses, notifications, errors and injections as
instant events, each request as an async slice from ``pop`` to ``used``, the
interrupt line as a counter.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from virtio.spec import sections as sec
from virtio.spec._base import Section

HEADER = "# pyvirtio trace v1: SEQ EXIT T_US KIND key=value ..."
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


@dataclass
class Event:
    seq: int
    exit: int
    t_us: int
    kind: str
    fields: dict = field(default_factory=dict)


_HEX_KEYS = frozenset({"value", "off", "isr", "old", "new"})


def _fmt(value: object, key: str = "") -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return hex(value) if key in _HEX_KEYS and value > 9 else str(value)
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def format_event(e: Event) -> str:
    pairs = " ".join(f"{k}={_fmt(v, k)}" for k, v in e.fields.items())
    return f"{e.seq} {e.exit} {e.t_us} {e.kind}" + (f" {pairs}" if pairs else "")


def _value(text: str) -> object:
    if text.startswith('"'):
        return json.loads(text)
    try:
        return int(text, 0)
    except ValueError:
        return text


def parse_line(line: str) -> Event | None:
    line = line.rstrip("\n")
    if not line.strip() or line.startswith("#"):
        return None
    parts = line.split(" ", 4)
    if len(parts) < 4:
        raise ValueError(f"not a trace line: {line!r}")
    rest = parts[4] if len(parts) > 4 else ""
    fields = {k: _value(v) for k, v in _PAIR.findall(rest)}
    return Event(int(parts[0]), int(parts[1]), int(parts[2]), parts[3], fields)


def read_trace(path: str | Path) -> Iterator[Event]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            e = parse_line(line)
            if e is not None:
                yield e


class Tracer:
    """Collects a session's events; ``write`` saves the line file and its JSON twin."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._t0 = time.perf_counter()

    def restart_clock(self) -> None:
        """T_US counts from now (the guest starts)."""
        self._t0 = time.perf_counter()

    def add(self, exit_: int, event: str, /, **fields: object) -> None:
        t = int((time.perf_counter() - self._t0) * 1e6)
        self.events.append(Event(len(self.events), exit_, t, event, fields))

    def write(self, path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        with open(path, "w", encoding="utf-8") as f:
            f.write(HEADER + "\n")
            for e in self.events:
                f.write(format_event(e) + "\n")
        json_path = path.with_name(path.name + ".json")
        json_path.write_text(json.dumps(chrome_trace(self.events)), encoding="utf-8")
        return path, json_path


def chrome_trace(events: Iterable[Event]) -> dict:
    """The Chrome trace-event JSON (``{"traceEvents": [...]}``) of ``events``."""
    out: list[dict] = [
        {"ph": "M", "pid": 1, "tid": 1, "name": "thread_name", "args": {"name": "driver"}},
        {"ph": "M", "pid": 1, "tid": 2, "name": "thread_name", "args": {"name": "device"}},
    ]
    open_reqs: dict[tuple[int, int], int] = {}
    for e in events:
        base = {"pid": 1, "ts": e.t_us, "args": {"exit": e.exit, **e.fields}}
        if e.kind == "pop":
            key = (e.fields.get("queue", 0), e.fields.get("head", 0))
            open_reqs[key] = e.seq
            name = f"q{key[0]} head {key[1]}"
            out.append({**base, "ph": "b", "cat": "request", "id": e.seq, "name": name, "tid": 2})
        elif e.kind == "used":
            q = e.fields.get("queue", 0)
            for head in str(e.fields.get("heads", "")).split(","):
                if head and (q, int(head, 0)) in open_reqs:
                    rid = open_reqs.pop((q, int(head, 0)))
                    out.append(
                        {**base, "ph": "e", "cat": "request", "id": rid,
                         "name": f"q{q} head {int(head, 0)}", "tid": 2}
                    )  # fmt: skip
            out.append({**base, "ph": "i", "s": "t", "name": "used", "tid": 2})
        elif e.kind == "irq":
            out.append({**base, "ph": "C", "name": "irq", "tid": 2,
                        "args": {"level": e.fields.get("level", 0)}})  # fmt: skip
        else:
            tid = 2 if e.kind in ("defer", "hold", "inject") else 1
            name = e.kind if e.kind not in ("read", "write") else f"{e.kind} {e.fields.get('reg')}"
            scope = "g" if e.kind in ("error", "inject", "status", "result", "halt") else "t"
            out.append({**base, "ph": "i", "s": scope, "name": name, "tid": tid})
    return {"traceEvents": out, "displayTimeUnit": "ns"}


# -- annotation (``virtio trace show``) ---------------------------------------------------------
_REG_SECTIONS = {
    "status": sec.S_3_1_1,
    "queue_notify": sec.S_4_2_3_3,
    "interrupt_status": sec.S_4_2_3_4,
    "interrupt_ack": sec.S_4_2_3_4,
    "config": sec.S_2_5,
    "config_generation": sec.S_2_5,
    "device_features": sec.S_2_2,
    "device_features_sel": sec.S_2_2,
    "driver_features": sec.S_2_2,
    "driver_features_sel": sec.S_2_2,
    "queue_reset": sec.S_2_6_1,
}
_INJECT_SECTIONS = {
    "spurious-irq": sec.S_2_3,
    "config-change": sec.S_2_5_2,
    "needs-reset": sec.S_2_1_2,
    "features-ok-refused": sec.S_3_1_1,
    "queue-num-max": sec.S_4_2_3_2,
    "ioerr": sec.S_5_2_6,
    "unsupp": sec.S_5_2_6,
    "link-down": sec.S_5_1_4,
    "link-up": sec.S_5_1_4,
    "drop": sec.S_5_1_9_2,
    "dup": sec.S_5_1_9_2,
}


def section_of(e: Event) -> Section | str:
    """The spec section a step follows (errors: the clause they cite)."""
    k, f = e.kind, e.fields
    if k in ("read", "write"):
        reg = str(f.get("reg", ""))
        if reg in _REG_SECTIONS:
            return _REG_SECTIONS[reg]
        if reg.startswith("queue_"):
            return sec.S_4_2_3_2
        return sec.S_4_2_2
    packed = f.get("ring") == "packed"
    return {
        "notify": sec.S_4_2_3_3,
        "irq": sec.S_4_2_3_4,
        "status": sec.S_2_1,
        "pop": sec.S_2_8_21 if packed else sec.S_2_7_13,
        "defer": sec.S_2_7_13,
        "hold": sec.S_2_7_8,
        "used": sec.S_2_7_8,
        "inject": _INJECT_SECTIONS.get(str(f.get("kind")), sec.S_2),
        "host": sec.S_5_8_6,
        "result": sec.S_3_1_1,
        "halt": sec.S_3_1_1,
    }.get(k, str(f.get("clause", "?")) if k == "error" else "?")


def annotate(e: Event) -> str:
    s = section_of(e)
    where = f"§{s.number} {s.title}" if isinstance(s, Section) else f"§{s}"
    if e.kind == "error" and e.fields.get("label"):
        where += f" [{e.fields['label']}]"
    pairs = " ".join(f"{k}={_fmt(v, k)}" for k, v in e.fields.items() if k != "label")
    return f"{e.exit:>7} {e.kind:<7} {pairs}  <- {where}"
