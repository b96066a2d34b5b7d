"""The device-author API: write a device once, run it under any transport.

A device declares its ID, its queues' maximum sizes and roles, its own feature bits
and its configuration space (a spec struct, ``config_layout``), and handles
descriptor chains.  The framework owns the ring and transport feature bits
(``VIRTIO_F_VERSION_1``, ``INDIRECT_DESC``, ``EVENT_IDX``, ``RING_PACKED``), guest
memory, notifications in both directions and the queue-service loop
(``virtio.service``: virtio 1.4 §2.7.10's disable / pop / add_used / notify /
re-enable dance).  Transports (vhost-user, virtio-mmio) build an ``ActiveDevice``
at DRIVER_OK (§3.1.1) and call ``VirtioDevice.run`` or ``serve_queue`` per queue;
a reset cancels them (§2.4).

A request device (the driver sends requests, ``QueueRole.REQUESTS``)::

    class Echo(VirtioDevice):
        device_id = DeviceId.VIRTIO_ID_CONSOLE
        queue_max_sizes = (256,)

        async def handle(self, queue_index, chain):
            data = chain.reader().read()
            return chain.writer().write(data)

A buffer-filling device (``QueueRole.BUFFERS``: net receive, input events, rng)
implements ``fill_buffers`` instead (see ``virtio/devices/rng``).  A running device
can raise a configuration change notification (``active.config_changed()``, §2.5.2)
or set DEVICE_NEEDS_RESET itself (``active.set_needs_reset(reason)``, §2.1.2).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, NamedTuple, Protocol

import trio

from virtio.config_space import ConfigAccessError, ConfigLayout
from virtio.errors import DeviceUsageError, DriverError, QueueBrokenError, VirtioError
from virtio.memory import GuestMemory
from virtio.queues.chain import DescriptorChain
from virtio.queues.virtqueue import Virtqueue
from virtio.service import (
    BufferQueue,
    CompletionGate,
    QueueRole,
    QueueService,
    RequestService,
    ServiceRun,
    wait_quiescent,
)
from virtio.spec import sections as sec
from virtio.spec.features import TransportFeature as TF
from virtio.spec.ids import DeviceId
from virtio.spec.sections import S_2_1_2
from virtio.stats import DEFAULT_KINDS, DEFAULT_STATUSES, LATENCY_SAMPLE, DeviceStats

log = logging.getLogger(__name__)

FRAMEWORK_FEATURES = (
    TF.VIRTIO_F_VERSION_1.mask | TF.VIRTIO_F_INDIRECT_DESC.mask | (TF.VIRTIO_F_EVENT_IDX.mask)
)
"""Ring/transport bits every device offers through the framework."""
PACKED_FEATURE = TF.VIRTIO_F_RING_PACKED.mask


class QueueNotifier(Protocol):
    """How one queue's notifications travel (eventfds, MMIO, in-memory for tests)."""

    async def wait_kick(self) -> None:
        """Wait for an available buffer notification from the driver (§2.3)."""

    def notify_used(self) -> None:
        """Send a used buffer notification to the driver (an interrupt, §2.3)."""


class DeviceNeedsReset(VirtioError):
    """The device itself entered an error state a reset must clear (DEVICE_NEEDS_RESET,
    §2.1.2); raised nowhere, handed to the transport by ``ActiveDevice.set_needs_reset``."""

    section = S_2_1_2.number


class ActiveDevice:
    """What a running device is given at DRIVER_OK: memory, features, queues and
    their notifiers, and the transport's hooks for events in the other direction.

    ``on_driver_error(exc)``: the driver broke the spec (DEVICE_NEEDS_RESET);
    ``on_config_change()``: send a configuration change notification (virtio-mmio:
    InterruptStatus bit 1, §4.2.3.4; vhost-user: CONFIG_CHANGE_MSG);
    ``on_needs_reset(exc)``: the device failed by itself (default: ``on_driver_error``).
    """

    def __init__(
        self,
        memory: GuestMemory,
        features: int,
        queues: dict[int, Virtqueue],
        notifiers: dict[int, QueueNotifier],
        on_driver_error: Callable[[DriverError], None] | None = None,
        *,
        on_config_change: Callable[[], object] | None = None,
        on_needs_reset: Callable[[VirtioError], None] | None = None,
        on_driver_report: Callable[[DriverError], None] | None = None,
    ) -> None:
        self.memory = memory
        self.features = features
        self.queues = queues
        self.notifiers = notifiers
        self.on_driver_error = on_driver_error
        self.on_config_change = on_config_change
        self.on_needs_reset = on_needs_reset
        self.on_driver_report = on_driver_report
        self.services: dict[int, QueueService] = {}
        """The running queue services (``virtio.service``), by queue index."""

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> int(bit) & 1)

    def config_changed(self) -> bool:
        """The device changed its configuration space: notify the driver (§2.5.2:
        "the device MUST send a configuration change notification").  ``False`` if
        the transport has no way to (logged)."""
        if self.on_config_change is None:
            log.warning("configuration change not announced: the transport has no channel")
            return False
        return self.on_config_change() is not False

    def report_driver_error(self, exc: DriverError) -> None:
        """A violation the device answered by itself (a status byte) and that needs
        no reset: handed to the transport's error list (strict mode, §5.2.6.1...)."""
        log.warning("driver error (answered, no reset): %s", exc)
        if self.on_driver_report is not None:
            self.on_driver_report(exc)

    def set_needs_reset(self, reason: str) -> None:
        """The device cannot go on: set DEVICE_NEEDS_RESET (§2.1.2); the transport
        stops the device and, with DRIVER_OK, notifies the driver (§2.1.2.1)."""
        exc = DeviceNeedsReset(reason)
        log.error("device needs reset: %s", reason)
        hook = self.on_needs_reset or self.on_driver_error
        if hook is not None:
            hook(exc)  # type: ignore[arg-type]

    async def wait_settled(self) -> None:
        """Until the device has nothing left to do: every request queue parked with
        nothing in flight, and every task of this trio loop blocked."""
        while True:
            for service in list(self.services.values()):
                await service.wait_idle()
            await wait_quiescent()
            if all(s.idle for s in self.services.values()):
                return


class VirtioDevice:
    """Base class of device models.  Subclasses set the class attributes and
    implement ``handle`` (``REQUESTS`` queues) and/or ``fill_buffers`` (``BUFFERS``
    queues), or override ``serve_queue`` for more control."""

    device_id: ClassVar[DeviceId]
    queue_max_sizes: tuple[int, ...] = (256,)
    queue_roles: tuple[QueueRole, ...] = ()
    """Role of each queue by index; queues not listed are ``REQUESTS``."""
    device_features: int = 0
    """Device-type feature bits this device offers (bits 0-23, 50+)."""
    config_layout: ClassVar[ConfigLayout | None] = None
    """The configuration space (§2.5) as a spec struct; ``None``: no configuration."""
    max_inflight: int = 128
    """Chains handled concurrently per queue."""
    supports_packed: bool = True
    strict: bool = False
    """Report the device-type MUSTs a driver breaks and the device answers with a
    status anyway (e.g. virtio-blk's §5.2.6.1) as driver errors
    (``ActiveDevice.report_driver_error``); off by default, on under ``run-driver``."""
    completion_gate: CompletionGate | None = None
    """A device-timing model for the completions of every queue (``virtio.service``);
    ``None``: inline, as the service loop returns them."""
    stats_kinds: ClassVar[tuple[str, ...]] = DEFAULT_KINDS
    """Names of the request kinds the device counts (``stats.queue(i).record``), at
    most ``VQS_KINDS``; the default counts every request as ``requests``."""
    stats_statuses: ClassVar[tuple[str, ...]] = DEFAULT_STATUSES
    """Names of the statuses the device counts, at most ``VQS_STATUSES``."""
    stats_latency_sample: ClassVar[int] = LATENCY_SAMPLE
    """Latency is measured for one popped batch in this many (a power of two)."""

    def __init__(self) -> None:
        self.driver_features = 0
        self.needs_reset = False
        self.active: ActiveDevice | None = None
        """The ``ActiveDevice`` serving this device (the latest), for device-initiated
        events: ``self.active.config_changed()``; ``None`` before DRIVER_OK and after
        a reset."""
        self._runs: list[ServiceRun | trio.CancelScope] = []

    # -- statistics and control ------------------------------------------------------------
    @property
    def stats(self) -> DeviceStats:
        """This device's statistics, per queue, across every connection and reset
        (``virtio.stats``)."""
        stats = self.__dict__.get("_stats")
        if stats is None:
            stats = self._stats = DeviceStats(
                tuple(self.queue_max_sizes),
                self.stats_kinds,
                self.stats_statuses,
                self.stats_latency_sample,
            )
        return stats

    @contextlib.contextmanager
    def counting(self, active: ActiveDevice, index: int) -> Iterator[None]:
        """While serving queue ``index``: its ring counts into ``stats``."""
        queue = active.queues[index]
        stats = self.stats.queue(index)
        stats.attach(queue)
        try:
            yield
        finally:
            stats.detach(queue)

    def control_commands(self) -> dict[str, ControlCommand]:
        """Control-socket commands this device adds (``virtio.control``): name ->
        ``ControlCommand(handler, help)``; a handler takes the request's arguments and
        returns a JSON-able value (or raises ``ArgumentError``).  Several exports may
        offer the same name: the request's ``export`` argument picks one (see
        ``virtio.control.exports``).  Default: none."""
        return {}

    def describe_config(self) -> dict[str, Any]:
        """What ``query-config`` shows of this device (JSON-able); subclasses add to it."""
        return {
            "device": self.device_id.name.removeprefix("VIRTIO_ID_").lower(),
            "queues": self.num_queues,
            "queue_sizes": list(self.queue_max_sizes),
            "features": f"{self.offered_features():#x}",
            "driver_features": f"{self.driver_features:#x}",
            "needs_reset": self.needs_reset,
        }

    # -- configuration -------------------------------------------------------------------
    @property
    def num_queues(self) -> int:
        return len(self.queue_max_sizes)

    def queue_role(self, index: int) -> QueueRole:
        roles = self.queue_roles
        return roles[index] if index < len(roles) else QueueRole.REQUESTS

    def offered_features(self) -> int:
        """All feature bits offered to the driver (framework + device)."""
        bits = FRAMEWORK_FEATURES | self.device_features
        if self.supports_packed:
            bits |= PACKED_FEATURE
        return bits

    def ack_features(self, features: int) -> None:
        """The driver accepted ``features`` (FEATURES_OK, §3.1.1); must be a subset."""
        extra = features & ~self.offered_features()
        if extra:
            raise DriverError(
                f"driver accepted feature bits {extra:#x} the device did not offer",
                section=sec.S_2_2_1,
            )
        self.driver_features = features

    def config_values(self) -> Mapping[str, Any]:
        """The current value of every field of ``config_layout`` (devices with a
        configuration space implement this)."""
        raise NotImplementedError

    def config_bytes(self) -> bytes:
        """The device configuration space as the driver reads it (§2.5)."""
        layout = self.config_layout
        return layout.build(self.config_values()) if layout is not None else b""

    @property
    def config_size(self) -> int:
        layout = self.config_layout
        return layout.size if layout is not None else len(self.config_bytes())

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (any range inside the space);
        ``ConfigAccessError`` outside."""
        data = self.config_bytes()
        if self.config_layout is not None:
            self.config_layout.check(offset, size)
        elif offset < 0 or size < 0 or offset + size > len(data):
            raise ConfigAccessError(f"configuration access [{offset:#x}, +{size}) outside")
        return data[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write into the configuration space: writable fields it touches go
        to ``config_field_written``; changes to read-only fields are logged and ignored."""
        layout = self.config_layout
        name = type(self).__name__
        if layout is None:
            log.warning("%s: driver wrote read-only config at %#x", name, offset)
            return
        for field, value in layout.merge(self.config_bytes(), offset, data, name).items():
            self.config_field_written(field, value)

    def config_field_written(self, name: str, value: Any) -> None:
        """The driver wrote the writable field ``name`` (an ``int`` for integer
        fields); the device updates its state (later reads may differ, §5.8.4)."""
        raise NotImplementedError(f"{type(self).__name__} declares {name} writable")

    # -- snapshots (the emulator's save/restore) --------------------------------------
    def save_state(self) -> dict[str, Any]:
        """Device-type state a snapshot must carry beyond the negotiated features and
        the queues (which the transport saves): e.g. blk's write-cache mode and disk
        contents.  Called only when no request is in flight.  Default: nothing."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Apply ``save_state()`` output (untrusted: it comes from a file)."""

    def reset(self) -> None:
        """Device reset (§2.4): stop serving, forget negotiated state."""
        runs, self._runs = self._runs, []
        for run in runs:
            run.cancel()
        self.driver_features = 0
        self.needs_reset = False
        self.active = None

    # -- operation -------------------------------------------------------------------------
    async def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        """Process one chain of a ``REQUESTS`` queue; return the bytes written into
        its writable part."""
        raise NotImplementedError

    async def fill_buffers(self, queue_index: int, buffers: BufferQueue) -> None:
        """Serve a ``BUFFERS`` queue: take chains from ``buffers`` when there is data,
        fill them, ``buffers.complete(chain, written)``.  Runs until cancelled."""
        raise NotImplementedError

    async def run(self, active: ActiveDevice) -> None:
        """Serve every active queue until cancelled (by the caller or by ``reset``)
        or a driver error."""
        with trio.CancelScope() as scope:
            self._runs.append(scope)
            try:
                async with trio.open_nursery() as nursery:
                    for index in active.queues:
                        nursery.start_soon(self.serve_queue, active, index)
            finally:
                if scope in self._runs:
                    self._runs.remove(scope)

    def service_run(self, active: ActiveDevice) -> ServiceRun:
        """The background ``ServiceRun`` serving ``active`` on the current trio loop
        (created on first use; one for an older ``ActiveDevice`` is stopped)."""
        for run in self._runs:
            if isinstance(run, ServiceRun) and run.active is active:
                return run
        for run in [r for r in self._runs if isinstance(r, ServiceRun)]:
            run.cancel()
            self._runs.remove(run)
        run = ServiceRun(self, active)
        self._runs.append(run)
        return run

    async def serve_queue(self, active: ActiveDevice, index: int) -> None:
        """Serve queue ``index`` by its role until cancelled; a driver error ends it
        and sets DEVICE_NEEDS_RESET."""
        self.active = active
        try:
            gate = self.completion_gate
            with self.counting(active, index):
                if self.queue_role(index) is QueueRole.BUFFERS:
                    await self.fill_buffers(index, BufferQueue(active, index, gate))
                else:
                    service = RequestService(active, index, gate)
                    await service.run(self.handle, self.max_inflight)
        except* DriverError as group:  # also when trio groups it with a Cancelled
            self._driver_error(active, _first(group))
        except* QueueBrokenError:
            pass

    def strict_violation(self, exc: DriverError) -> None:
        """In strict mode, report ``exc`` (a rule the device answered with a status)."""
        if self.strict and self.active is not None:
            self.active.report_driver_error(exc)

    def _driver_error(self, active: ActiveDevice, exc: DriverError) -> None:
        log.error("%s: driver error, device needs reset: %s", type(self).__name__, exc)
        self.needs_reset = True
        if active.on_driver_error is not None:
            active.on_driver_error(exc)


class ControlCommand(NamedTuple):
    """A control-socket command a device offers (``VirtioDevice.control_commands``)."""

    handler: Callable[[dict[str, Any]], Any]
    help: str = ""


def _first(group: BaseExceptionGroup) -> Any:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def check_subset(features: int, offered: int) -> None:
    if features & ~offered:
        raise DeviceUsageError(f"features {features & ~offered:#x} were not offered")
