"""The transport-independent half of a virtio transport (virtio 1.4 §2, §3.1).

``VirtioTransport`` is the one implementation of what every transport's register file
does to the device, whatever the register layout: the device status state machine
(§2.1, §3.1.1; writing 0 resets, §2.4), feature negotiation in 32-bit windows (§2.2,
FEATURES_OK checked by the device, §3.1.1 step 6), queue set-up and enabling
(``QueueConfig.activate`` with the negotiated ring features), virtqueue reset
(§2.6.1), available buffer notifications handed to the backend, configuration
generation, and the typed ``DriverError`` bookkeeping (recorded in ``errors``, logged,
DEVICE_NEEDS_RESET + a configuration change notification unless recoverable, §2.1.2).

A transport subclass decodes its register layout into these operations and supplies
the interrupt model: ``used_buffer_notification`` / ``config_change_notification``
(virtio-mmio: InterruptStatus + a line, §4.2.3.4; virtio-pci: ISR status + INTx, or
MSI-X vectors, §4.1.5.3-4).  ``REG`` names the registers in error messages and
``REGISTER_RULES`` is the clause that register-level misuse cites.

What runs the queues is a *backend* (``MmioBackend``, named after the first transport
that had it; every transport uses the same one): ``DeviceBackend`` serves a
``VirtioDevice`` in process (synchronously through a ``TrioRunner``, or in a trio
nursery), ``emulator.vhost_user.VhostUserBackend`` hands the rings to another process.
See ``virtio.transport.mmio`` for the execution model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import trio

from virtio.device import ActiveDevice, VirtioDevice
from virtio.errors import DriverError, FeaturesRefused, QueueConfigError
from virtio.memory import GuestMemory
from virtio.queues.state import QueueState
from virtio.queues.virtqueue import QueueConfig, Virtqueue
from virtio.spec import sections as sec
from virtio.spec._base import Section
from virtio.spec.features import TransportFeature as TF
from virtio.spec.status import DeviceStatus as S

log = logging.getLogger(__name__)

ALL_ONES_32 = 0xFFFF_FFFF
F_VERSION_1 = TF.VIRTIO_F_VERSION_1.mask
F_RING_RESET = TF.VIRTIO_F_RING_RESET.mask
F_RING_PACKED = TF.VIRTIO_F_RING_PACKED.mask
F_EVENT_IDX = TF.VIRTIO_F_EVENT_IDX.mask
F_INDIRECT = TF.VIRTIO_F_INDIRECT_DESC.mask
TRANSPORT_FEATURES = F_VERSION_1 | F_RING_RESET
"""Bits the transport itself offers on top of the device's."""

ACK, DRIVER, FEATURES_OK, DRIVER_OK = (
    int(S.ACKNOWLEDGE),
    int(S.DRIVER),
    int(S.FEATURES_OK),
    int(S.DRIVER_OK),
)
FAILED, NEEDS_RESET = int(S.FAILED), int(S.DEVICE_NEEDS_RESET)
DRIVER_BITS = ACK | DRIVER | FEATURES_OK | DRIVER_OK | FAILED


# -- typed driver errors (the transport passes ``section=`` where its clause differs) --------
class DeviceStatusError(DriverError):
    """A Status write out of the initialization order (§3.1.1) or clearing a bit
    (§2.1.1)."""

    spec_section = sec.S_3_1_1


class FeatureNegotiationError(DriverError):
    """Features the device did not offer, VERSION_1 not accepted, or feature
    writes after FEATURES_OK (§2.2.1, §3.1.1, §6.1)."""

    spec_section = sec.S_2_2_1


class QueueSetupError(DriverError):
    """Queue registers used out of order: a queue size above the maximum, queue set-up
    while the queue is enabled, enabling before FEATURES_OK, a queue index beyond the
    device's queues (§4.2.2.2, §4.2.3.2, §4.1.4.3.2)."""

    spec_section = sec.S_4_2_3_2


class NotificationError(DriverError):
    """An available-buffer notification before DRIVER_OK, for a queue that does not
    exist or is not ready, or with the wrong value or width (§3.1.1, §4.2.3.3,
    §4.1.5.2.1)."""

    spec_section = sec.S_4_2_3_3


# -- a trio loop for synchronous callers ---------------------------------------------------
class TrioRunner:
    """One trio event loop in a daemon thread; ``call`` runs an async function there and
    blocks the calling (vCPU) thread until it returns (or re-raises its exception)."""

    def __init__(self, name: str = "virtio-trio") -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        self.calls = 0

    def _main(self) -> None:
        async def amain() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()

        trio.run(amain)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._token is None:
            raise RuntimeError("TrioRunner is closed")
        self.calls += 1
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._token is None:
            return
        token, stop = self._token, self._stop
        self._token = None
        assert stop is not None
        trio.from_thread.run_sync(stop.set, trio_token=token)
        self._thread.join(timeout=5)

    def __enter__(self) -> TrioRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QueueNotifier:
    """``QueueNotifier`` for the asynchronous mode: a notification sets a trio event."""

    def __init__(self, transport: VirtioTransport, index: int) -> None:
        self._transport = transport
        self.index = index
        self._event = trio.Event()
        self.kicks = 0

    def kick(self) -> None:
        self.kicks += 1
        self._event.set()

    async def wait_kick(self) -> None:
        await self._event.wait()
        self._event = trio.Event()

    def notify_used(self) -> None:
        self._transport.used_buffer_notification(self.index)


@runtime_checkable
class MmioDevice(Protocol):
    """The device model a transport exposes (``VirtioDevice`` is one): identity,
    features, configuration space, reset (§2.4)."""

    device_id: int
    queue_max_sizes: Sequence[int]
    needs_reset: bool

    def offered_features(self) -> int: ...

    def ack_features(self, features: int) -> None: ...

    def config_bytes(self) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def reset(self) -> None: ...


@runtime_checkable
class MmioBackend(Protocol):
    """What runs the queues behind a transport (``MmioTransport``, ``PciTransport``).
    Every call comes after the transport applied its rules; a backend raises
    ``DriverError`` to refuse (the transport then sets DEVICE_NEEDS_RESET), or another
    exception when it cannot go on (it propagates out of the register access)."""

    def start_queue(self, index: int, vq: Virtqueue) -> None:
        """QueueReady=1 accepted: ``vq`` is the validated ring (size, addresses, ring
        features); it runs once the device is live."""

    def stop_queue(self, index: int) -> None:
        """QueueReady=0 or QueueReset: stop using queue ``index``."""

    def driver_ok(self, features: int) -> None:
        """DRIVER_OK (§3.1.1 step 8) with the negotiated ``features``: go live."""

    def notify(self, index: int) -> None:
        """An available buffer notification for a ready queue of a live device
        (§4.2.3.3, §4.1.5.2)."""

    def status_read(self) -> None:
        """The driver is about to read Status (drivers poll it)."""


class DeviceBackend:
    """The in-process backend: a ``VirtioDevice`` served in this process, synchronously
    through the runner (``service_queue``) or by ``device.run`` (asynchronous mode)."""

    def __init__(self, transport: VirtioTransport) -> None:
        self.transport = transport

    def start_queue(self, index: int, vq: Virtqueue) -> None:
        active = self.transport.active
        if active is not None:  # re-enabled after a virtqueue reset (§2.6.1)
            active.queues[index] = vq
            active.notifiers[index] = self.transport.notifiers[index]

    def stop_queue(self, index: int) -> None:
        if self.transport.active is not None:
            self.transport.active.queues.pop(index, None)

    def driver_ok(self, features: int) -> None:
        t = self.transport
        queues = {i: q.vq for i, q in enumerate(t.queues) if q.vq is not None}
        t.active = ActiveDevice(
            t.memory,
            features,
            queues,
            {i: t.notifiers[i] for i in queues},
            on_driver_error=t.driver_error,
            on_config_change=t.config_changed,
            on_driver_report=t.driver_report,
        )
        if t.runner is None and t.on_driver_ok is not None:
            t.on_driver_ok(t.active)

    def notify(self, index: int) -> None:
        t = self.transport
        if t.runner is None:
            t.notifiers[index].kick()
            return
        vq = t.queues[index].vq
        assert vq is not None
        t.runner.call(t.service_queue, index, vq)

    def status_read(self) -> None:
        pass


class _QueueRegs:
    """Per-queue transport state: the registers plus the running queue."""

    def __init__(self, max_size: int) -> None:
        self.config = QueueConfig(max_size)
        self.reset_pending = False  # QueueReset reads 1 after a reset until re-enabled
        self.vq: Virtqueue | None = None

    def reset(self) -> None:
        self.config.reset()
        self.vq = None


class VirtioTransport:
    """The state and rules every transport shares (see the module doc).

    ``device``: a ``VirtioDevice`` (served in process by a ``DeviceBackend``), or an
    object that is both ``MmioDevice`` and ``MmioBackend`` (e.g. a vhost-user
    front-end).  ``memory`` is a ``GuestMemory`` or a callable returning one (called
    when the first queue starts, e.g. to map the VMM's RAM lazily).  ``runner``: a
    ``TrioRunner`` for the synchronous mode; ``None`` for the asynchronous mode, where
    ``on_driver_ok`` receives the ``ActiveDevice``.
    """

    REG: ClassVar[dict[str, str]] = {
        "status": "Status",
        "driver_features": "DriverFeatures",
        "driver_features_sel": "DriverFeaturesSel",
        "queue_sel": "QueueSel",
        "queue_size": "QueueNum",
        "queue_size_max": "QueueNumMax",
        "queue_enable": "QueueReady",
        "queue_reset": "QueueReset",
        "queue_notify": "QueueNotify",
    }
    """Register names for error messages (the spec's names for this transport)."""
    REGISTER_RULES: ClassVar[Section] = sec.S_4_2_2_2
    """The driver-normative clause of the register layout."""
    QUEUE_CONFIGURATION: ClassVar[Section] = sec.S_4_2_3_2
    """The transport's virtqueue configuration section."""
    NOTIFICATIONS: ClassVar[Section] = sec.S_4_2_3_3
    """The transport's available buffer notification section."""

    def __init__(
        self,
        device: VirtioDevice | MmioDevice,
        memory: GuestMemory | Callable[[], GuestMemory],
        *,
        runner: TrioRunner | None = None,
        on_driver_ok: Callable[[ActiveDevice], None] | None = None,
        name: str = "virtio",
        ring_reset: bool = True,
    ) -> None:
        self.device = device
        self.backend: MmioBackend = (
            DeviceBackend(self) if isinstance(device, VirtioDevice) else device  # type: ignore[assignment]
        )
        self.name = name
        self._lock = threading.RLock()  # interrupt and status bits: backends use threads
        self.broken: BaseException | None = None
        self._memory_source = memory
        self._memory: GuestMemory | None = memory if isinstance(memory, GuestMemory) else None
        self.runner = runner
        self.on_driver_ok = on_driver_ok
        self.transport_features = F_VERSION_1 | (F_RING_RESET if ring_reset else 0)
        self.errors: list[DriverError] = []
        self.queues = [_QueueRegs(n) for n in device.queue_max_sizes]
        self.notifiers = [QueueNotifier(self, i) for i in range(len(self.queues))]
        self.active: ActiveDevice | None = None
        self.config_generation = 0
        self.interrupts_raised = 0
        self.kicks = 0

    # -- state ----------------------------------------------------------------------------
    def _reset_state(self) -> None:
        """Every register back to its reset value (§2.4); subclasses extend it."""
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        for q in self.queues:
            q.reset()
            q.reset_pending = False
        self.active = None

    def reset(self) -> None:
        """Device reset (§2.4): the device first (a backend stops its rings, so nothing
        notifies after), then status, features, queues and interrupts."""
        self.device.reset()
        with self._lock:
            self._reset_state()

    # -- machine snapshots (the emulator's run-driver --save / --load) ------------------------
    _SAVED_REGS: ClassVar[tuple[str, ...]] = ()
    """Integer registers a snapshot keeps (each transport lists its own)."""

    def save_state(self) -> dict[str, Any]:
        """The registers, every queue (configuration and ring positions, §2.7 / §2.8
        state as ``QueueState``) and the device's own state, as plain data.  Only
        between exits of the synchronous mode, when the device has settled (no chain
        popped and not yet used); an external (vhost-user) device keeps its state in
        another process and cannot be saved here."""
        if not isinstance(self.backend, DeviceBackend) or self.runner is None:
            raise RuntimeError(
                f"{self.name}: only an in-process device in synchronous mode can be saved"
            )
        queues = []
        for i, q in enumerate(self.queues):
            c = q.config
            queues.append({
                "size": c.size, "ready": c.ready, "desc_addr": c.desc_addr,
                "driver_addr": c.driver_addr, "device_addr": c.device_addr,
                "reset_pending": q.reset_pending,
                "vq": q.vq.state().to_dict() if q.vq is not None else None,
                **self._save_queue_extra(i),
            })  # fmt: skip
        return {
            **{name: getattr(self, name) for name in self._SAVED_REGS},
            **self._save_extra(),
            "queues": queues,
            "errors": [str(e) for e in self.errors],
            "device": self.device.save_state(),  # type: ignore[union-attr]
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Apply ``save_state()`` output to a freshly built transport with the same
        device: registers, queues rebuilt with ``Virtqueue.restore`` (validated,
        untrusted input), the features replayed to the device, DRIVER_OK's activation
        redone, then the interrupt state as it was."""
        device = self.device
        assert isinstance(device, VirtioDevice)
        device.reset()
        if len(state["queues"]) != len(self.queues):
            raise ValueError(
                f"{self.name}: the snapshot has {len(state['queues'])} queues,"
                f" the device {len(self.queues)}"
            )
        with self._lock:
            self._reset_state()
            for name in self._SAVED_REGS:
                value = state[name]
                if not isinstance(value, int):
                    raise ValueError(f"{self.name}: saved {name} is not an integer")
                setattr(self, name, value)
            self._load_extra(state)
        self.errors = [DriverError(f"(before the snapshot) {msg}") for msg in state["errors"]]
        if self.status & FEATURES_OK:
            device.ack_features(self.driver_features & device.offered_features())
        device.load_state(state["device"])
        for i, (q, saved) in enumerate(zip(self.queues, state["queues"], strict=True)):
            c = q.config
            c.size, c.ready = int(saved["size"]), bool(saved["ready"])
            c.desc_addr, c.driver_addr = int(saved["desc_addr"]), int(saved["driver_addr"])
            c.device_addr = int(saved["device_addr"])
            q.reset_pending = bool(saved["reset_pending"])
            self._load_queue_extra(i, saved)
            if saved["vq"] is not None:
                q.vq = Virtqueue.restore(
                    self.memory, QueueState.from_dict(saved["vq"]), f"{self.name}.q{i}"
                )
        if self.status & DRIVER_OK and not self.status & NEEDS_RESET:
            self.backend.driver_ok(self.negotiated)
        with self._lock:
            self._load_interrupts(state)

    def _save_queue_extra(self, index: int) -> dict[str, Any]:
        """A transport's own per-queue fields in a snapshot (e.g. an MSI-X vector)."""
        return {}

    def _save_extra(self) -> dict[str, Any]:
        """A transport's own non-integer state in a snapshot."""
        return {}

    def _load_extra(self, state: dict[str, Any]) -> None:
        """Restore ``_save_extra``'s part (under the lock, after the registers)."""

    def _load_queue_extra(self, index: int, saved: dict[str, Any]) -> None:
        """Restore ``_save_queue_extra``'s part of queue ``index``."""

    def _load_interrupts(self, state: dict[str, Any]) -> None:
        """Drive the interrupt outputs to the restored state (under the lock, last)."""

    @property
    def memory(self) -> GuestMemory:
        if self._memory is None:
            source = self._memory_source
            assert callable(source)
            self._memory = source()
        return self._memory

    @property
    def offered_features(self) -> int:
        return self.device.offered_features() | self.transport_features

    @property
    def negotiated(self) -> int:
        """The accepted features (meaningful once FEATURES_OK is set)."""
        return self.driver_features if self.status & FEATURES_OK else 0

    def has(self, mask: int) -> bool:
        return bool(self.negotiated & mask)

    # -- interrupts (the transport's model) -------------------------------------------------
    def used_buffer_notification(self, index: int = 0) -> None:
        """Used Buffer Notification for queue ``index`` (§2.3)."""
        raise NotImplementedError

    def config_change_notification(self) -> None:
        """Configuration Change Notification (§2.3)."""
        raise NotImplementedError

    def config_changed(self) -> None:
        """The device changed its configuration space: bump the configuration
        generation (§2.5) and notify the driver if it is running."""
        self.config_generation = (self.config_generation + 1) & ALL_ONES_32
        if self.status & DRIVER_OK:
            self.config_change_notification()

    # -- errors -------------------------------------------------------------------------------
    def driver_error(self, exc: DriverError, *, needs_reset: bool = True) -> None:
        """Record a driver error; unless recoverable, DEVICE_NEEDS_RESET (§2.1.2)."""
        with self._lock:
            self.errors.append(exc)
            log.error("%s: driver error: %s", self.name, exc)
            if not needs_reset or self.status & NEEDS_RESET:
                return
            self.status |= NEEDS_RESET
            self.device.needs_reset = True
            if self.status & DRIVER_OK:
                self.config_change_notification()

    def driver_report(self, exc: DriverError) -> None:
        """A driver error the device answered itself (strict mode): recorded and
        logged, no DEVICE_NEEDS_RESET."""
        self.driver_error(exc, needs_reset=False)

    def backend_failed(self, exc: BaseException) -> None:
        """The backend cannot go on (e.g. its process died): ``exc`` is raised out of
        every later register access, so out of the VMM's run loop."""
        self.broken = exc

    # -- features -------------------------------------------------------------------------------
    def read_device_features(self) -> int:
        """The 32 offered feature bits the device feature select picks (§2.2)."""
        return (self.offered_features >> (32 * self.device_features_sel)) & ALL_ONES_32

    def write_driver_features(self, value: int) -> None:
        reg = self.REG["driver_features"]
        if self.status & FEATURES_OK:
            raise FeatureNegotiationError(
                f"{reg} written after FEATURES_OK: the driver must not accept new"
                " features once the device accepted the set",
                section=sec.S_3_1_1,
            )
        if not self.status & DRIVER:
            raise DeviceStatusError(
                f"{reg} written before Status has DRIVER (feature negotiation is"
                " step 4 of the initialization)",
                section=sec.S_3_1_1,
            )
        if self.driver_features_sel > 3:
            raise FeatureNegotiationError(
                f"{self.REG['driver_features_sel']} {self.driver_features_sel} selects bits"
                " above 127, which are reserved",
                section=sec.S_2_2,
            )
        shift = 32 * self.driver_features_sel
        mask = ALL_ONES_32 << shift
        self.driver_features = (self.driver_features & ~mask) | (value << shift)

    def _features_acceptable(self) -> None:
        """Device side of FEATURES_OK (§2.2.1, §3.1.1); raises if not acceptable."""
        extra = self.driver_features & ~self.offered_features
        if extra:
            raise FeatureNegotiationError(
                f"driver accepted feature bits {extra:#x} the device did not offer"
            )
        if not self.driver_features & F_VERSION_1:
            raise FeatureNegotiationError(
                "VIRTIO_F_VERSION_1 not accepted: this transport has no legacy interface",
                section=sec.S_6_1,
            )
        self.device.ack_features(self.driver_features & self.device.offered_features())

    # -- status ---------------------------------------------------------------------------------
    def write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        value &= ~(self.status & NEEDS_RESET)  # the driver may echo NEEDS_RESET back
        old = self.status & DRIVER_BITS
        if value & ~(DRIVER_BITS):
            raise DeviceStatusError(
                f"driver wrote Status bits {value & ~DRIVER_BITS:#x}: only ACKNOWLEDGE,"
                " DRIVER, FEATURES_OK, DRIVER_OK and FAILED are the driver's",
                section=sec.S_2_1_1,
            )
        if old & ~value:
            raise DeviceStatusError(
                f"Status {value:#x} clears bits {old & ~value:#x}: the driver must not clear"
                " a device status bit (only a reset, writing 0, does)",
                section=sec.S_2_1_1,
            )
        new = value & ~old
        if new & FAILED:
            self.status |= FAILED
            log.info("%s: driver set FAILED", self.name)
            new &= ~FAILED
        order = ((ACK, 0), (DRIVER, ACK), (FEATURES_OK, DRIVER), (DRIVER_OK, FEATURES_OK))
        for bit, needed in order:
            if not new & bit:
                continue
            if needed and not (self.status | (new & needed)) & needed:
                raise DeviceStatusError(
                    f"Status bit {S(bit).name} set before {S(needed).name} (initialization order)"
                )
            if bit == FEATURES_OK:
                try:
                    self._features_acceptable()  # a DriverError: FEATURES_OK stays clear
                except FeaturesRefused as exc:
                    log.info("%s: FEATURES_OK refused by the device: %s", self.name, exc)
                    return
            with self._lock:
                self.status |= bit
            if bit == DRIVER_OK and not self.status & NEEDS_RESET:
                # live (a refusal is a driver error: NEEDS_RESET + config interrupt)
                self.backend.driver_ok(self.negotiated)

    # -- queues ---------------------------------------------------------------------------------
    def selected_queue(self) -> _QueueRegs | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def selected_for_setup(self, what: str) -> _QueueRegs:
        q = self.selected_queue()
        if q is None:
            raise QueueSetupError(
                f"{what} written with {self.REG['queue_sel']} {self.queue_sel}, but the device"
                f" has {len(self.queues)} queue(s) ({self.REG['queue_size_max']} reads 0)",
                section=self.QUEUE_CONFIGURATION,
            )
        if q.config.ready:
            raise QueueSetupError(
                f"{what} written for queue {self.queue_sel} while"
                f" {self.REG['queue_enable']} is 1: the driver must not access the queue"
                " configuration registers then",
                section=self.REGISTER_RULES,
            )
        return q

    def write_queue_size(self, value: int) -> None:
        q = self.selected_for_setup(self.REG["queue_size"])
        if not 0 < value <= q.config.max_size:
            raise QueueSetupError(
                f"{self.REG['queue_size']} {value} for queue {self.queue_sel} outside"
                f" 1..{self.REG['queue_size_max']} ({q.config.max_size})",
                section=self.REGISTER_RULES,
            )
        q.config.size = value

    def write_queue_address(self, what: str, attr: str, shift: int, value: int) -> None:
        """One 32-bit half (``shift`` 0 or 32) of a ring address (``desc_addr``,
        ``driver_addr``, ``device_addr``) of the selected queue."""
        c = self.selected_for_setup(what).config
        old = getattr(c, attr)
        setattr(c, attr, (old & ~(ALL_ONES_32 << shift)) | (value << shift))

    def disable_queue(self) -> None:
        """Stop using the selected queue (virtio-mmio QueueReady=0, §4.2.2)."""
        q = self.selected_queue()
        if q is None:
            raise QueueSetupError(
                f"{self.REG['queue_enable']} written for queue {self.queue_sel}, which does"
                " not exist",
                section=self.QUEUE_CONFIGURATION,
            )
        q.config.ready = False
        if q.vq is not None:
            q.vq = None
            self.backend.stop_queue(self.queue_sel)

    def enable_queue(self) -> None:
        """The selected queue's configuration is complete: validate and start it."""
        reg = self.REG["queue_enable"]
        q = self.selected_queue()
        if q is None:
            raise QueueSetupError(
                f"{reg} written for queue {self.queue_sel}, which does not exist",
                section=self.QUEUE_CONFIGURATION,
            )
        if q.config.ready:
            return
        if not self.status & FEATURES_OK:
            raise QueueSetupError(
                f"{reg}=1 before FEATURES_OK: virtqueues are set up after feature"
                " negotiation (step 7 of the initialization)",
                section=sec.S_3_1_1,
            )
        if self.status & DRIVER_OK and not q.reset_pending:
            raise QueueSetupError(
                f"queue {self.queue_sel} enabled after DRIVER_OK: a live device takes a new"
                f" queue only after a virtqueue reset (VIRTIO_F_RING_RESET,"
                f" {self.REG['queue_reset']})",
                section=sec.S_2_6_1,
            )
        if self.status & NEEDS_RESET:
            return
        self._check_queue_config(q)
        feats = self.negotiated
        try:
            vq = q.config.activate(
                self.memory,
                packed=bool(feats & F_RING_PACKED),
                event_idx=bool(feats & F_EVENT_IDX),
                indirect=bool(feats & F_INDIRECT),
                name=f"{self.name}.q{self.queue_sel}",
            )
        except QueueConfigError as exc:
            raise QueueConfigError(
                f"queue {self.queue_sel}: {exc.message}", section=exc.section
            ) from exc
        q.config.ready = True
        q.reset_pending = False
        q.vq = vq
        self.backend.start_queue(self.queue_sel, vq)

    def _check_queue_config(self, q: _QueueRegs) -> None:
        """Transport rules on a queue's configuration at enable time (none here)."""

    def write_queue_reset(self, value: int) -> None:
        reg = self.REG["queue_reset"]
        if not self.has(F_RING_RESET):
            raise QueueSetupError(
                f"{reg} written but VIRTIO_F_RING_RESET was not negotiated",
                section=self.REGISTER_RULES,
            )
        q = self.selected_queue()
        if q is None:
            raise QueueSetupError(
                f"{reg} for queue {self.queue_sel}, which does not exist",
                section=self.QUEUE_CONFIGURATION,
            )
        if value != 1:
            raise QueueSetupError(
                f"{reg} written with {value}: the driver resets a queue by writing 1",
                section=self.REGISTER_RULES,
            )
        was_running = q.vq is not None
        q.reset()
        q.reset_pending = True
        if was_running:
            self.backend.stop_queue(self.queue_sel)

    # -- notifications ----------------------------------------------------------------------------
    def notify_queue(self, index: int) -> None:
        """An available buffer notification for queue ``index`` (already decoded)."""
        reg = self.REG["queue_notify"]
        if self.status & NEEDS_RESET:
            return  # the device stopped; the driver has to reset it
        if not self.status & DRIVER_OK:
            raise NotificationError(
                f"{reg}({index}) before DRIVER_OK: the driver must not notify before"
                " the device is live",
                section=sec.S_3_1_1,
            )
        if index >= len(self.queues) or self.queues[index].vq is None:
            raise NotificationError(
                f"{reg} for queue {index}, which is not ready", section=self.NOTIFICATIONS
            )
        self.kicks += 1
        self.backend.notify(index)

    async def service_queue(self, index: int, vq: Virtqueue) -> None:
        """A notification in the synchronous mode.  The device's queue services (the
        framework's loop, ``VirtioDevice.serve_queue``: the same code the asynchronous
        mode and vhost-user run) live as tasks of the runner's loop (``ServiceRun``,
        stopped by the device reset); this kicks queue ``index`` and returns once the
        device has settled: every chain the driver made available is handled and
        returned, with the notifications the driver asked for."""
        active = self.active
        if active is None or active.queues.get(index) is not vq:
            return  # reset or queue reset since the notify was decoded
        run = self.device.service_run(active)
        await run.ensure(index)
        self.notifiers[index].kick()
        await run.settle()
