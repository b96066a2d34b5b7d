"""Fault injection (``run-driver --inject SPEC``): device behaviour a driver must cope
with, each logged in the trace and the JSON result.

``SPEC`` is ``KIND[=VALUE][@TRIGGER]``, ``TRIGGER`` ``req=N`` (when the device
finishes its N-th request, counting from 1 over all queues), ``exit=N`` (after the
guest's N-th exit; a guest that sleeps before it lets the time jump there, as the
timing model does) or ``pkt=N`` (net: the N-th frame the driver transmits):

==========================  ===============================================================
``spurious-irq@T``          a used buffer notification with nothing new in the ring (§2.3)
``config-change@T``         a configuration change + notification (§2.5.2; blk: capacity
                            grows by 1 MiB)
``needs-reset@T``           the device sets DEVICE_NEEDS_RESET by itself (§2.1.2); at
                            ``req=N`` that request is never completed
``features-ok-refused[=N]`` FEATURES_OK stays clear (§3.1.1 step 6) for the first N tries
                            (default: every try)
``queue-num-max=N``         QueueNumMax reads N (§4.2.3.2)
``ioerr@req=N``,            the request completes with that status (blk: VIRTIO_BLK_S_*,
``unsupp@req=N``            §5.2.6) in its last device-writable byte
``link-down@T``,            net: ``status`` VIRTIO_NET_S_LINK_UP cleared / set (§5.1.4)
``link-up@T``               with a configuration change notification; frames sent while
                            the link is down are lost
``drop@pkt=N``,             net: the N-th transmitted frame is lost on the wire /
``dup@pkt=N``               reaches the peer twice (so comes back twice)
==========================  ===============================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from virtio.errors import FeaturesRefused
from virtio.queues.chain import DescriptorChain
from virtio.service import QueueService
from virtio.spec.status import DeviceStatus

if TYPE_CHECKING:
    from emulator.drvkit.session import Session

_SPEC = re.compile(
    r"^(?P<kind>[a-z-]+)(?:=(?P<value>\d+))?(?:@(?P<when>req|exit|pkt)=(?P<at>\d+))?$"
)
EVENTS = ("link-down", "link-up")
"""Device-specific events (``DeviceKind.events``)."""
WIRE = ("drop", "dup")
TRIGGERED = ("spurious-irq", "config-change", "needs-reset", "ioerr", "unsupp", *EVENTS)
SETUP = ("features-ok-refused", "queue-num-max")
KINDS = TRIGGERED + SETUP + WIRE


class InjectSpecError(ValueError):
    """An --inject SPEC that does not parse or does not apply to the device."""


@dataclass(frozen=True)
class Injection:
    kind: str
    value: int | None = None
    when: str | None = None  # "req" | "exit"
    at: int = 0

    @property
    def text(self) -> str:
        s = self.kind + (f"={self.value}" if self.value is not None else "")
        return s + (f"@{self.when}={self.at}" if self.when else "")


def parse(spec: str) -> Injection:
    m = _SPEC.match(spec.strip())
    if not m or m["kind"] not in KINDS:
        raise InjectSpecError(
            f"bad --inject {spec!r}: KIND[=VALUE][@req=N|@exit=N], KIND one of {', '.join(KINDS)}"
        )
    value = int(m["value"]) if m["value"] else None
    inj = Injection(m["kind"], value, m["when"], int(m["at"] or 0))
    if inj.kind in WIRE and inj.when != "pkt":
        raise InjectSpecError(f"--inject {spec!r}: {inj.kind} applies to a frame: @pkt=N")
    if inj.kind in TRIGGERED and inj.when not in ("req", "exit"):
        raise InjectSpecError(f"--inject {spec!r}: {inj.kind} needs @req=N or @exit=N")
    if inj.kind in SETUP and inj.when is not None:
        raise InjectSpecError(f"--inject {spec!r}: {inj.kind} applies at set-up, no trigger")
    if inj.kind in ("ioerr", "unsupp") and inj.when != "req":
        raise InjectSpecError(f"--inject {spec!r}: a status applies to a request: @req=N")
    if inj.kind == "queue-num-max" and not inj.value:
        raise InjectSpecError("--inject queue-num-max=N needs N >= 1")
    if inj.when and inj.at < 1:
        raise InjectSpecError(f"--inject {spec!r}: N counts from 1")
    return inj


class Injector:
    """Applies a run's injections; ``log`` lists what was done (JSON ``injections``)."""

    def __init__(self, session: Session, injections: list[Injection]) -> None:
        self.session = session
        self.injections = injections
        self.log: list[dict] = []
        kind = session.kind
        for inj in injections:
            if inj.kind in ("ioerr", "unsupp") and inj.kind not in kind.statuses:
                raise InjectSpecError(f"--inject {inj.text}: no such status for {kind.name}")
            if inj.kind == "config-change" and kind.config_change is None:
                raise InjectSpecError(f"--inject {inj.text}: {kind.name} has no config to change")
            if inj.kind in EVENTS and inj.kind not in kind.events:
                raise InjectSpecError(f"--inject {inj.text}: not an event of {kind.name}")
            if inj.kind in WIRE and not kind.wire:
                raise InjectSpecError(f"--inject {inj.text}: {kind.name} has no wire")
        self._refusals = 0

    # -- set-up -----------------------------------------------------------------------------
    def setup_device(self) -> None:
        device = self.session.device
        for inj in self.injections:
            if inj.kind == "queue-num-max":
                assert inj.value is not None
                device.queue_max_sizes = (inj.value,) * device.num_queues
                self._done(inj, f"QueueNumMax {inj.value}")
            elif inj.kind == "features-ok-refused":
                self._wrap_ack_features(inj)
        if any(inj.kind in WIRE for inj in self.injections):
            device.wire.hook = self.on_frame  # type: ignore[attr-defined]

    def on_frame(self, n: int) -> str | None:
        """Net: the fault (``drop``/``dup``) for the driver's N-th transmitted frame."""
        fault = None
        for inj in self.injections:
            if inj.when == "pkt" and inj.at == n:
                fault = inj.kind
                what = "lost" if fault == "drop" else "sent twice"
                self._done(inj, f"transmitted frame {n} {what}")
        return fault

    def _wrap_ack_features(self, inj: Injection) -> None:
        device = self.session.device
        original = device.ack_features

        def ack_features(features: int) -> None:
            if inj.value is None or self._refusals < inj.value:
                self._refusals += 1
                self._done(inj, f"FEATURES_OK refused (try {self._refusals})")
                raise FeaturesRefused(f"injected: {inj.text}")
            original(features)

        device.ack_features = ack_features  # type: ignore[method-assign]

    # -- triggers ---------------------------------------------------------------------------
    def on_complete(self, n: int, service: QueueService, chain: DescriptorChain, written: int):
        keep = True
        for inj in self.injections:
            if inj.when == "req" and inj.at == n:
                keep = self._fire(inj, service, chain) and keep
        return keep

    def on_exit(self, n: int) -> None:
        for inj in self.injections:
            if inj.when == "exit" and inj.at == n:
                self._fire(inj, None, None)

    def next_exit(self, now: int) -> int | None:
        """The exit of the next ``@exit=N`` injection after ``now`` (a sleeping guest
        lets the time jump there), or ``None``."""
        due = [inj.at for inj in self.injections if inj.when == "exit" and inj.at > now]
        return min(due, default=None)

    def _fire(self, inj: Injection, service: QueueService | None, chain) -> bool:
        s = self.session
        t = s.transport
        if inj.kind == "spurious-irq":
            t.used_buffer_notification(service.index if service else 0)
            self._done(inj, "used buffer notification, nothing new in the ring")
        elif inj.kind == "config-change":
            assert s.kind.config_change is not None
            note = s.kind.config_change(s.device)
            t.config_changed()
            self._done(inj, note)
        elif inj.kind == "needs-reset":
            self._done(inj, "DEVICE_NEEDS_RESET set by the device")
            if s.device.active is not None:
                s.device.active.set_needs_reset(f"injected: {inj.text}")
            else:  # not live yet: only the status bit (§2.1.2)
                t.status |= int(DeviceStatus.DEVICE_NEEDS_RESET)
            return False
        elif inj.kind in EVENTS:
            note = s.kind.events[inj.kind](s.device)
            t.config_changed()
            self._done(inj, note)
        elif inj.kind in ("ioerr", "unsupp"):
            status = s.kind.statuses[inj.kind]
            w = chain.writer()
            w.seek_end(1)
            w.write(bytes((status,)))
            self._done(inj, f"request head {chain.head} status {status}")
        return True

    def _done(self, inj: Injection, note: str) -> None:
        s = self.session
        entry = {"inject": inj.text, "kind": inj.kind, "exit": s.exits, "note": note}
        if inj.when == "req":
            entry["request"] = inj.at
        elif inj.when == "pkt":
            entry["frame"] = inj.at
        self.log.append(entry)
        s.trace("inject", kind=inj.kind, spec=inj.text, note=note)
