"""virtio-input (virtio 1.4 §5.8): an input device whose events come from a host source.

Two queues (§5.8.2): ``eventq`` (device → driver: a ``BUFFERS`` queue, each buffer
receives one ``struct virtio_input_event``) and ``statusq`` (driver → device: LED
and other status events, a ``REQUESTS`` queue).  No feature bits (§5.8.3).  The
configuration space (§5.8.4) answers the driver's ``select``/``subsel`` questions from
an ``InputCapabilities``.

Events arrive through ``inject(events)`` from any thread (an evdev reader, the
control socket, a test).  They are cut into groups, each ending with EV_SYN/
SYN_REPORT (added when missing), and a group is delivered only when the driver has
posted buffers for all of it: devicenormative §5.8.6.2 "SHOULD NOT drop individual
input events if they are part of a sequence forming one input device update ... A
device SHOULD either buffer or drop the entire sequence".  Groups wait in a bounded
queue (``max_held_events``); a group that does not fit is dropped whole and
counted.  A group longer than the whole eventq (QEMU's vhost-user-input front-end
gives it 4 entries) cannot go out whole: it is delivered in ring-sized pieces, which
a Linux driver's input core reassembles (it passes nothing on before SYN_REPORT).
While waiting for buffers the device holds none (``BufferQueue.next_buffers``), so
pausing the ring (vhost-user GET_VRING_BASE) or a reset never waits on it.

Latency (issue 11 §5): a group whose buffers are already posted, with no group
waiting before it, is delivered by ``inject`` itself (on the device's loop, before
it returns; from another thread, in the loop's first callback), not by waking the
eventq task, which then only handles groups that wait for buffers.  That delivery is
one native call per group (``native.NativeDelivery``: pop, check, write the events,
one used-index store, the notification decision); anything unusual takes the
Python path below, the reference (``native_delivery = False`` forces it).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import trio
from evdev import ecodes as e

from virtio.config_space import ConfigLayout
from virtio.device import VirtioDevice
from virtio.devices.input.capabilities import InputCapabilities
from virtio.devices.input.native import FALLBACK, MAX_EVENTS, NativeDelivery
from virtio.errors import DescriptorChainError, DriverError
from virtio.queues.chain import DescriptorChain
from virtio.ratelimit import LogRateLimiter
from virtio.service import BufferQueue, QueueRole
from virtio.spec.ids import DeviceId
from virtio.spec.input import VIRTIO_INPUT_CFG_UNION_SIZE, InputConfigSelect, virtio_input_config
from virtio.spec.sections import S_5_8_4, S_5_8_6_1

log = logging.getLogger(__name__)

EVENT = struct.Struct("<HHi")
"""``struct virtio_input_event`` (§5.8.6): le16 type, le16 code, le32 value."""
_pack = EVENT.pack
EVENTQ, STATUSQ = 0, 1
INPUT_CONFIG = ConfigLayout(virtio_input_config, writable={"select", "subsel"}, section=S_5_8_4)
STATUS_TYPES = frozenset({e.EV_LED, e.EV_SND, e.EV_REP, e.EV_FF})
"""Event types a driver may send on the statusq (what Linux's evdev passes back to a
device: LEDs, sounds, autorepeat settings, force feedback)."""
_SELECTS = frozenset(int(s) for s in InputConfigSelect)

Event = tuple[int, int, int]
StatusSink = Callable[[int, int, int], None]


def frame(events: Iterable[Event]) -> list[list[Event]]:
    """Cut ``events`` into SYN_REPORT-terminated groups; a trailing SYN_REPORT is
    added when the last group lacks one."""
    groups: list[list[Event]] = []
    group: list[Event] = []
    for ev in events:
        group.append(ev)
        if ev[0] == e.EV_SYN and ev[1] == e.SYN_REPORT:
            groups.append(group)
            group = []
    if group:
        group.append((e.EV_SYN, e.SYN_REPORT, 0))
        groups.append(group)
    return groups


class VirtioInput(VirtioDevice):
    """One virtio-input device reporting ``capabilities``; ``status_sink(type, code,
    value)`` receives the driver's status events (e.g. written back to an evdev)."""

    device_id = DeviceId.VIRTIO_ID_INPUT
    queue_max_sizes = (64, 64)
    queue_roles = (QueueRole.BUFFERS, QueueRole.REQUESTS)
    config_layout = INPUT_CONFIG
    max_held_events = 8192
    """Events held while the driver has posted too few buffers (then groups drop)."""

    def __init__(
        self, capabilities: InputCapabilities, *, status_sink: StatusSink | None = None
    ) -> None:
        super().__init__()
        self.capabilities = capabilities
        self.status_sink = status_sink
        self.select = 0
        self.subsel = 0
        self.leds: dict[int, int] = {}
        """LED code -> last value the driver set (statusq)."""
        self.status_events: list[Event] = []
        """Every accepted status event, in order (bounded to the last 1,024)."""
        self.events_delivered = 0
        self.groups_delivered = 0
        self.groups_dropped = 0
        self.events_dropped = 0
        self.status_unknown = 0
        self.groups_split = 0
        """Groups longer than the eventq, delivered in ring-sized pieces."""
        self.groups_native = 0
        """Groups delivered (every piece) by the native call."""
        self.record_latency = False
        self.latency_log: collections.deque[tuple[int, int, bool]] = collections.deque(
            maxlen=100_000
        )
        """``(injected, used, at_inject)`` of each group (with ``record_latency``):
        ``time.monotonic_ns()`` when ``inject`` took it and when the used index that
        holds its last event was stored (the driver is notified right after); whether it
        went out at injection (else it waited: for the driver's buffers, or behind a
        group that did)."""
        self.native_delivery = True
        """Deliver groups at injection with one native call (else the Python path)."""
        self._native = NativeDelivery()
        self._stored_ns = 0
        self._pending: collections.deque[tuple[list[Event], int]] = collections.deque()
        self._held = 0
        self._lock = threading.Lock()
        self._wakeup = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._buffers: BufferQueue | None = None
        """The eventq's service while ``fill_buffers`` runs."""
        self._failure: DriverError | None = None
        """A driver error ``_deliver_now`` met, for the eventq task to raise."""
        self._fill_idle = False
        """``fill_buffers`` is parked on ``_wakeup`` with nothing pending (only read and
        written on the loop's thread)."""
        self._limiter = LogRateLimiter(log)
        self._served = bytearray(INPUT_CONFIG.size)
        """The configuration bytes last read, per offset (see ``write_config``)."""
        self.config_ignored = 0
        """Driver writes to read-only configuration fields (ignored)."""

    # -- configuration space (§5.8.4) ------------------------------------------------
    def config_values(self) -> dict[str, Any]:
        data = self.capabilities.config_payload(self.select, self.subsel)
        return {
            "select": self.select,
            "subsel": self.subsel,
            "size": len(data),
            "reserved": bytes(5),
            "u": data.ljust(VIRTIO_INPUT_CFG_UNION_SIZE, b"\0"),
        }

    def read_config(self, offset: int, size: int) -> bytes:
        data = super().read_config(offset, size)
        self._served[offset : offset + len(data)] = data
        return data

    def write_config(self, offset: int, data: bytes) -> None:
        """Writable fields (select, subsel) go to ``config_field_written``; a change
        to a read-only field is ignored with a rate-limited log line, unless the
        written bytes are what this device last served there: QEMU's
        vhost-user-input front-end writes the whole struct (its copy, read before
        the driver changed ``select``) on every select, which is not a driver write."""
        layout = self.config_layout
        assert layout is not None
        layout.check(offset, len(data))
        image = self.config_bytes()
        new = image[:offset] + bytes(data) + image[offset + len(data) :]
        for f in layout.fields_in(offset, len(data)):
            value = new[f.offset : f.end]
            if f.writable:
                self.config_field_written(f.name, int.from_bytes(value, "little"))
            elif value != image[f.offset : f.end] and value != self._served[f.offset : f.end]:
                self.config_ignored += 1
                self._limiter.warning(
                    "config",
                    "virtio-input: driver wrote the read-only configuration field %s (ignored, %s)",
                    f.name,
                    S_5_8_4,
                )

    def config_field_written(self, name: str, value: Any) -> None:
        if name == "select" and value not in _SELECTS:
            self._limiter.warning(
                "select",
                "virtio-input: driver selected %#x, not a virtio_input_config_select"
                " value (%s): size reads 0",
                value,
                S_5_8_4,
            )
        setattr(self, name, value)

    # -- events from the host ---------------------------------------------------------
    @property
    def held_events(self) -> int:
        return self._held

    def inject(self, events: Iterable[Event]) -> int:
        """Queue ``events`` (any thread) for the driver, framed into SYN_REPORT groups;
        the number of groups accepted (the others were dropped: too many held)."""
        now = time.monotonic_ns()
        accepted = 0
        with self._lock:
            for group in frame(events):
                if self._held + len(group) > self.max_held_events:
                    self._drop(group, "too many events held")
                    continue
                self._pending.append((group, now))
                self._held += len(group)
                accepted += 1
        if accepted:
            self._wake()
        return accepted

    def _drop(self, group: Sequence[Event], why: str) -> None:
        self.groups_dropped += 1
        self.events_dropped += len(group)
        self._limiter.warning(
            "drop", "virtio-input: dropped a group of %d events (%s)", len(group), why
        )

    def _wake(self) -> None:
        token = self._token
        if token is None:
            return
        try:
            current = trio.lowlevel.current_trio_token()
        except RuntimeError:
            current = None
        if current is token:
            self._deliver_now()
        else:
            with contextlib.suppress(trio.RunFinishedError):  # the loop has ended
                token.run_sync_soon(self._deliver_now)

    def _deliver_now(self) -> None:
        """On the loop's thread, right after ``inject``: deliver the held groups the
        posted buffers already fit, here and now, rather than waking ``fill_buffers``
        and waiting for the scheduler to run it (a task switch and whatever else is
        runnable: a control-socket reply, other devices).  Only while that task is
        parked with nothing pending, so groups still go out in order; what does not
        fit yet is left to it (it waits for the driver's buffers)."""
        buffers = self._buffers
        if buffers is None or not self._fill_idle:
            return  # not running, or the task is delivering: it takes the new groups next
        while True:
            with self._lock:
                item = self._pending[0] if self._pending else None
            if item is None:
                return
            group, injected = item
            if len(group) > buffers.queue.size:
                break  # delivered in pieces by the task
            n = self._deliver_native(buffers, group)
            if n > 0:
                self.groups_native += 1
                self._delivered(group, injected, at_inject=True)
                continue
            if n == 0:
                break  # too few buffers: the task waits for them
            # FALLBACK (unusual, or native delivery off): the Python path decides
            try:
                chains = buffers.next_buffers_nowait(len(group))
            except DriverError as exc:
                # A malformed chain broke the queue: raised in the eventq task, so it
                # is reported (DEVICE_NEEDS_RESET) like any driver error, never into
                # the injector (a control-socket client, an evdev reader, a thread).
                self._failure = exc
                break
            if chains is None:
                break
            if not all(self._event_buffer_ok(c) for c in chains):
                buffers.give_back(chains)  # the task pops them again and fails the queue
                break
            buffers.complete_batch(
                (
                    (chain, chain.writer().write(EVENT.pack(*ev)))
                    for chain, ev in zip(chains, group, strict=True)
                ),
                on_stored=self._stamp,
            )
            self._delivered(group, injected, at_inject=True)
        self._fill_idle = False
        self._wakeup.set()

    def _deliver_native(self, buffers: BufferQueue, group: Sequence[Event]) -> int:
        """``group`` through the native call if the driver's buffers are there:
        ``NativeDelivery.deliver``'s answer (``FALLBACK`` when it is off)."""
        if not self.native_delivery or len(group) > MAX_EVENTS:
            return FALLBACK
        n = self._native.deliver(buffers, b"".join([_pack(*ev) for ev in group]), len(group))
        if n > 0:
            self._stored_ns = self._native.stored_ns
        return n

    def _stamp(self) -> None:
        """``complete_batch``'s probe: when the used index was stored."""
        if self.record_latency:
            self._stored_ns = time.monotonic_ns()

    def _delivered(self, group: Sequence[Event], injected: int, *, at_inject: bool) -> None:
        with self._lock:
            self._pending.popleft()
            self._held -= len(group)
        self.events_delivered += len(group)
        self.groups_delivered += 1
        if self.record_latency:
            self.latency_log.append((injected, self._stored_ns, at_inject))

    def clear(self) -> None:
        """Forget held events (a reset: they were meant for the previous driver)."""
        with self._lock:
            self._pending.clear()
            self._held = 0

    # -- eventq ------------------------------------------------------------------------
    async def fill_buffers(self, queue_index: int, buffers: BufferQueue) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._buffers = buffers
        self._fill_idle = False  # not parked yet (a ring restart: the old task's flag)
        self._failure = None  # an error of the previous ring is not this one's
        try:
            await self._fill(buffers)
        finally:
            if self._buffers is buffers:
                self._buffers = None
                self._fill_idle = False

    async def _fill(self, buffers: BufferQueue) -> None:
        size = buffers.queue.size
        while True:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            with self._lock:
                item = self._pending[0] if self._pending else None
            if item is None:
                # Parked: ``_deliver_now`` delivers what ``inject`` brings while the
                # buffers suffice, and wakes this task for the rest.
                self._wakeup = trio.Event()
                self._fill_idle = True
                await self._wakeup.wait()
                continue
            group, injected = item
            if len(group) > size:
                # It can never go out whole: send it in ring-sized pieces (a Linux
                # driver's input core still holds it until the SYN_REPORT).
                self.groups_split += 1
                self._limiter.warning(
                    "split",
                    "virtio-input: a group of %d events is longer than the %d-entry eventq:"
                    " delivered in pieces",
                    len(group),
                    size,
                )
            native = True
            for start in range(0, len(group), size):
                piece = group[start : start + size]
                if self._deliver_native(buffers, piece) > 0:
                    continue  # its buffers were there already (behind a group that waited)
                native = False
                chains = await buffers.next_buffers(len(piece))
                for chain in chains:
                    self._check_event_buffer(chain)
                buffers.complete_batch(
                    (
                        (chain, chain.writer().write(EVENT.pack(*ev)))
                        for chain, ev in zip(chains, piece, strict=True)
                    ),
                    on_stored=self._stamp,
                )
            self.groups_native += native
            self._delivered(group, injected, at_inject=False)

    @staticmethod
    def _event_buffer_ok(chain: DescriptorChain) -> bool:
        return not chain.readable_len and chain.writable_len >= EVENT.size

    @staticmethod
    def _check_event_buffer(chain: DescriptorChain) -> None:
        if not VirtioInput._event_buffer_ok(chain):
            raise DescriptorChainError(
                f"eventq buffer with {chain.readable_len} device-readable and"
                f" {chain.writable_len} device-writable bytes: buffers MUST be"
                f" device-writable and at least {EVENT.size} bytes [{S_5_8_6_1.label}]",
                section=S_5_8_6_1,
            )

    # -- statusq -----------------------------------------------------------------------
    async def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        data = chain.reader().read(EVENT.size)
        if len(data) < EVENT.size or chain.writable_len:
            self.status_unknown += 1
            self._limiter.warning(
                "status-buffer",
                "virtio-input: statusq buffer of %d readable / %d writable bytes ignored:"
                " it MUST hold one %d-byte device-readable event [%s]",
                chain.readable_len,
                chain.writable_len,
                EVENT.size,
                S_5_8_6_1.label,
            )
            return 0
        type_, code, value = EVENT.unpack(data)
        if type_ not in STATUS_TYPES or not self.capabilities.supports(type_, code):
            self.status_unknown += 1
            self._limiter.warning(
                "status",
                "virtio-input: status event type %#x code %#x value %d ignored: not an"
                " event this device supports (%s)",
                type_,
                code,
                value,
                S_5_8_6_1,
            )
            return 0
        if type_ == e.EV_LED:
            self.leds[code] = value
        self.status_events.append((type_, code, value))
        del self.status_events[:-1024]
        if self.status_sink is not None:
            try:
                self.status_sink(type_, code, value)
            except OSError as exc:
                self._limiter.warning("sink", "virtio-input: status event not written: %s", exc)
        return 0

    # -- lifecycle ---------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.select = self.subsel = 0
        self.clear()

    def statistics(self) -> dict[str, int]:
        return {
            "events": self.events_delivered,
            "groups": self.groups_delivered,
            "groups_dropped": self.groups_dropped,
            "groups_split": self.groups_split,
            "groups_native": self.groups_native,
            "events_dropped": self.events_dropped,
            "held": self._held,
            "status": len(self.status_events),
            "status_ignored": self.status_unknown,
            "config_ignored": self.config_ignored,
        }
