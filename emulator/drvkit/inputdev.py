"""virtio-input under ``run-driver --device input``: the project's ``VirtioInput`` (the
built-in keyboard) and a host that types.

The device is ``virtio.devices.input.VirtioInput`` with ``builtin("keyboard")``
capabilities (what ``virtio serve input`` offers).  :class:`Typist` is the host side:
it types :data:`SCRIPT_GROUPS` key groups (EV_KEY + EV_SYN/SYN_REPORT, the sequence of
``emulator.virtio_input_paths.expected_event`` with seed 0), :data:`BURST` groups at
a time, whenever the guest halts with nothing pending or :data:`EVERY` exits after the
previous burst (a polling driver), once the eventq is being served.  Exits are the
clock, so a run is reproducible on either CPU.

Strict checks (:class:`RunDriverInput`): a status event on the statusq (§5.8.6) of a
type or code the device never advertised in its configuration (§5.8.4:
EV_BITS), or a statusq buffer that is not one device-readable event, is reported as
a driver error citing §5.8.6.1; the device still ignores the event, as it always does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.virtio_input_paths import expected_event
from virtio.devices.input import VirtioInput, builtin
from virtio.devices.input.device import EVENT, STATUS_TYPES
from virtio.errors import DriverError
from virtio.queues.chain import DescriptorChain
from virtio.spec.sections import S_5_8_6_1

if TYPE_CHECKING:
    from emulator.drvkit.session import Session

SCRIPT_GROUPS = 16
"""Key groups typed per run: 2 * SCRIPT_GROUPS events (the template's default)."""
BURST = 2
EVERY = 64


class RunDriverInput(VirtioInput):
    """``VirtioInput`` (keyboard) with the strict statusq checks."""

    def __init__(self) -> None:
        super().__init__(builtin("keyboard"))

    async def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        if self.strict:
            self._check_status(chain)
        return await super().handle(queue_index, chain)

    def _check_status(self, chain: DescriptorChain) -> None:
        if chain.readable_len < EVENT.size or chain.writable_len:
            self._violation(
                f"statusq buffer of {chain.readable_len} device-readable and"
                f" {chain.writable_len} device-writable bytes: a status event is one"
                f" device-readable {EVENT.size}-byte struct virtio_input_event"
            )
            return
        type_, code, value = EVENT.unpack(chain.reader().read(EVENT.size))
        if type_ not in STATUS_TYPES or not self.capabilities.supports(type_, code):
            self._violation(
                f"status event type {type_:#x} code {code:#x} value {value}: the device"
                " never advertised it (§5.8.4 EV_BITS)"
            )

    def _violation(self, message: str) -> None:
        self.strict_violation(DriverError(message, section=S_5_8_6_1))


class Typist:
    """The host typing :data:`SCRIPT_GROUPS` key groups into the device."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.events = [expected_event(i, 0) for i in range(2 * SCRIPT_GROUPS)]
        self.next = 0
        self.last = 0

    def _ready(self) -> bool:
        t = self.session.transport
        active = t.active
        return self.next < len(self.events) and active is not None and 0 in active.services

    def _type(self) -> bool:
        if not self._ready():
            return False
        s = self.session
        chunk = self.events[self.next : self.next + 2 * BURST]
        self.next += len(chunk)
        self.last = s.exits
        device = s.device
        active = s.transport.active
        assert isinstance(device, VirtioInput) and active is not None

        async def inject_and_settle() -> None:
            device.inject(chunk)
            await active.wait_settled()

        runner = s.transport.runner
        assert runner is not None
        runner.call(inject_and_settle)
        s.trace("host", note=f"typed events {self.next - len(chunk)}..{self.next - 1}")
        return True

    def on_exit(self, now: int) -> None:
        if now - self.last >= EVERY:
            self._type()

    def on_idle(self) -> bool:
        return self._type()

    def save_state(self) -> dict:
        device = self.session.device
        assert isinstance(device, VirtioInput)
        return {"next": self.next, "last": self.last, "delivered": device.events_delivered}

    def load_state(self, state: dict) -> None:
        """Where the script was; events typed and not delivered are typed again (whole
        groups: the device delivers nothing else)."""
        nxt, delivered = int(state["next"]), int(state["delivered"])
        if not 0 <= delivered <= nxt <= len(self.events):
            raise ValueError(f"typist state {delivered}/{nxt} out of range")
        self.next, self.last = nxt, int(state["last"])
        device = self.session.device
        assert isinstance(device, VirtioInput)
        device.events_delivered = delivered
        if nxt > delivered:
            device.inject(self.events[delivered:nxt])
