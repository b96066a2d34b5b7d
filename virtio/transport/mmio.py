"""virtio-mmio transport, version 2 (virtio 1.4 §4.2.2-§4.2.3).

``MmioTransport`` is the register file of one virtio-mmio device in front of any
``VirtioDevice``.  It is pure: ``read(offset, size)`` / ``write(offset, size, value)``
are what a VMM calls on an MMIO exit inside the device's window (it also has the
``name`` / ``register_name`` of the emulator's bus protocol, so it can be mapped
directly with ``bus.add_mmio``).

What it does:

* the register table of §4.2.2 (MagicValue, Version 2, DeviceID, VendorID, feature
  windows, queue selection and setup, QueueNotify, InterruptStatus/ACK, Status,
  SHM registers (no shared memory regions: length and base read as all ones),
  QueueReset (with VIRTIO_F_RING_RESET), ConfigGeneration, the device configuration
  space from 0x100);
* the device status state machine (§2.1, §3.1.1): ACKNOWLEDGE -> DRIVER ->
  FEATURES_OK -> DRIVER_OK, writing 0 resets (§2.4, §4.2.2.1).  At FEATURES_OK the
  device checks the features: the transport adds its own bits to what the device
  offers (VIRTIO_F_VERSION_1 is required, the modern interface has no legacy mode;
  VIRTIO_F_RING_RESET), bits the driver accepted without them being offered or a
  missing VERSION_1 leave FEATURES_OK clear (the driver reads Status back, §3.1.1
  step 6);
* queues are validated and started (``QueueConfig.activate`` with packed / event
  index / indirect from the negotiated features) when the driver writes QueueReady=1;
  at DRIVER_OK the transport builds the ``ActiveDevice``;
* notifications: a QueueNotify write kicks the queue; a used-buffer notification
  sets InterruptStatus bit 0 and raises the interrupt line (``interrupt(level)``);
  InterruptACK lowers it once no bit is left.

Driver errors never raise out of ``read``/``write``: every violation becomes a typed
``DriverError`` subclass (``MmioAccessError``, ``DeviceStatusError``,
``FeatureNegotiationError``, ``QueueSetupError``, ``NotificationError``, or the
engine's ``QueueConfigError``/``DescriptorChainError``) naming the spec section,
appended to ``transport.errors`` and logged.  Errors the device cannot recover from
set DEVICE_NEEDS_RESET and, if DRIVER_OK is set, send a configuration change
notification (InterruptStatus bit 1, §2.1.2).  Two kinds leave the device state
untouched and so do not need a reset: unacceptable features are answered the way
§3.1.1 provides (FEATURES_OK stays clear), and a forbidden register access is
dropped (reads return 0).

Execution model (why synchronous).  The emulator's VMM is single-threaded: one vCPU
loop that stops on every exit.  For exit counts to be deterministic (and equal on KVM
and the soft CPU) the device must have processed everything the driver made
available *before* the vCPU resumes after the QueueNotify write: otherwise how
often the guest polls the used ring depends on thread scheduling.  Device ``handle``
methods are ``async`` (trio): backends await checkpoints or worker threads
(``RawFileBackend`` batches ``preadv``/``pwritev`` through ``trio.to_thread``), so
they cannot be driven by ``coroutine.send`` without trio.  Running the vCPU loop in a
trio worker thread (``trio.to_thread`` around KVM_RUN) was rejected: the KVM
backend's deadline uses ``SIGALRM``/``ITIMER_REAL``, which only reaches the main
thread, so the vCPU has to stay on the main thread.  Hence ``TrioRunner``: one trio
loop in a background thread for the life of the machine; on a QueueNotify exit the
transport calls ``runner.call(service)``, which runs the §2.7.10 service loop
(disable notifications, pop every available chain, ``device.handle`` them
concurrently so backends can batch, one ``add_used_batch``, an interrupt if the
driver's suppression allows, re-enable and re-check) and blocks the vCPU thread
until it is done.  The cost is one thread hand-off per notify (tens of µs), paid
once per batch at queue depth 32.  A KVM ioeventfd on QueueNotify is deliberately not
used on this path: it would let the vCPU run on while the device works (that is the
vhost-user path's model).

Device backends.  The transport is the one implementation of the register file and of
the §3.1.1 / §4.2.2 rules; what runs the queues is a *backend* (``MmioBackend``), told
only the outcome of what the driver did: a validated queue started or stopped,
DRIVER_OK, a QueueNotify, a Status read.  A ``VirtioDevice`` gets the in-process
``DeviceBackend`` (below); the emulator's vhost-user front-end
(``emulator.vhost_user.VhostUserBackend``) hands the rings to another process.  A
backend may call ``used_buffer_notification``, ``driver_error`` and ``backend_failed``
from another thread (the register state they touch is locked).

Without a runner (``runner=None``) the transport is asynchronous: at DRIVER_OK it
calls ``on_driver_ok(active)`` so that the owner can run ``device.run(active)`` in a
trio nursery, and QueueNotify writes wake the queue's ``MmioQueueNotifier`` (call
``read``/``write`` from the trio thread).  That mode serves devices that override
``serve_queue`` (the synchronous service loop only uses ``handle``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import trio

from virtio.device import ActiveDevice, VirtioDevice
from virtio.errors import DriverError, FeaturesRefused, QueueConfigError
from virtio.memory import GuestMemory
from virtio.queues.state import QueueState
from virtio.queues.virtqueue import QueueConfig, Virtqueue
from virtio.spec import sections as sec
from virtio.spec.features import TransportFeature as TF
from virtio.spec.mmio import (
    VIRTIO_MMIO_MAGIC,
    VIRTIO_MMIO_VERSION_MODERN,
    MmioInterrupt,
    MmioReg,
)
from virtio.spec.status import DeviceStatus as S

log = logging.getLogger(__name__)

R = MmioReg
INT_VRING = int(MmioInterrupt.VIRTIO_MMIO_INT_VRING)
INT_CONFIG = int(MmioInterrupt.VIRTIO_MMIO_INT_CONFIG)
CONFIG_BASE = int(R.VIRTIO_MMIO_CONFIG)
VENDOR_ID = 0x554D4551  # "QEMU" as Linux/QEMU report it; any value is allowed (§4.2.2)
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


# -- typed driver errors -------------------------------------------------------------------
class MmioAccessError(DriverError):
    """A register access the register layout forbids: wrong width or alignment, an
    undefined offset, a write to a read-only or a read of a write-only register, a
    configuration access outside the configuration space (§4.2.2.2)."""

    spec_section = sec.S_4_2_2_2


class DeviceStatusError(DriverError):
    """A Status write out of the initialization order (§3.1.1) or clearing a bit
    (§2.1.1)."""

    spec_section = sec.S_3_1_1


class FeatureNegotiationError(DriverError):
    """Features the device did not offer, VERSION_1 not accepted, or feature
    writes after FEATURES_OK (§2.2.1, §3.1.1, §6.1)."""

    spec_section = sec.S_2_2_1


class QueueSetupError(DriverError):
    """Queue registers used out of order: QueueNum above QueueNumMax, queue setup
    while the queue is ready, QueueReady before FEATURES_OK, a QueueSel beyond the
    device's queues (§4.2.2.2, §4.2.3.2)."""

    spec_section = sec.S_4_2_3_2


class NotificationError(DriverError):
    """An available-buffer notification before DRIVER_OK or for a queue that does not
    exist or is not ready (§3.1.1, §4.2.3.3)."""

    spec_section = sec.S_4_2_3_3


# -- register access rules (§4.2.2) ----------------------------------------------------------
_READ = {
    R.VIRTIO_MMIO_MAGIC_VALUE,
    R.VIRTIO_MMIO_VERSION,
    R.VIRTIO_MMIO_DEVICE_ID,
    R.VIRTIO_MMIO_VENDOR_ID,
    R.VIRTIO_MMIO_DEVICE_FEATURES,
    R.VIRTIO_MMIO_QUEUE_NUM_MAX,
    R.VIRTIO_MMIO_QUEUE_READY,
    R.VIRTIO_MMIO_INTERRUPT_STATUS,
    R.VIRTIO_MMIO_STATUS,
    R.VIRTIO_MMIO_SHM_LEN_LOW,
    R.VIRTIO_MMIO_SHM_LEN_HIGH,
    R.VIRTIO_MMIO_SHM_BASE_LOW,
    R.VIRTIO_MMIO_SHM_BASE_HIGH,
    R.VIRTIO_MMIO_QUEUE_RESET,
    R.VIRTIO_MMIO_CONFIG_GENERATION,
}
_WRITE = {
    R.VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    R.VIRTIO_MMIO_DRIVER_FEATURES,
    R.VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    R.VIRTIO_MMIO_QUEUE_SEL,
    R.VIRTIO_MMIO_QUEUE_NUM,
    R.VIRTIO_MMIO_QUEUE_READY,
    R.VIRTIO_MMIO_QUEUE_NOTIFY,
    R.VIRTIO_MMIO_INTERRUPT_ACK,
    R.VIRTIO_MMIO_STATUS,
    R.VIRTIO_MMIO_QUEUE_DESC_LOW,
    R.VIRTIO_MMIO_QUEUE_DESC_HIGH,
    R.VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    R.VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    R.VIRTIO_MMIO_QUEUE_USED_LOW,
    R.VIRTIO_MMIO_QUEUE_USED_HIGH,
    R.VIRTIO_MMIO_SHM_SEL,
    R.VIRTIO_MMIO_QUEUE_RESET,
}
READ_REGISTERS = frozenset(int(r) for r in _READ)
WRITE_REGISTERS = frozenset(int(r) for r in _WRITE)


def _short_name(reg: MmioReg) -> str:
    name = reg.name.removeprefix("VIRTIO_MMIO_").lower()
    return name.replace("queue_avail", "queue_driver").replace("queue_used", "queue_device")


REGISTER_NAMES = {int(r): _short_name(r) for r in MmioReg}
REGISTER_NAMES[CONFIG_BASE] = "config"


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


class MmioQueueNotifier:
    """``QueueNotifier`` for the asynchronous mode: QueueNotify sets a trio event."""

    def __init__(self, transport: MmioTransport, index: int) -> None:
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
    """What runs the queues behind an ``MmioTransport``.  Every call comes after the
    transport applied its rules; a backend raises ``DriverError`` to refuse (the
    transport then sets DEVICE_NEEDS_RESET), or another exception when it cannot go on
    (it propagates out of the register access)."""

    def start_queue(self, index: int, vq: Virtqueue) -> None:
        """QueueReady=1 accepted: ``vq`` is the validated ring (size, addresses, ring
        features); it runs once the device is live."""

    def stop_queue(self, index: int) -> None:
        """QueueReady=0 or QueueReset: stop using queue ``index``."""

    def driver_ok(self, features: int) -> None:
        """DRIVER_OK (§3.1.1 step 8) with the negotiated ``features``: go live."""

    def notify(self, index: int) -> None:
        """An available buffer notification for a ready queue of a live device (§4.2.3.3)."""

    def status_read(self) -> None:
        """The driver is about to read Status (drivers poll it)."""


class DeviceBackend:
    """The in-process backend: a ``VirtioDevice`` served in this process, synchronously
    through the runner (``service_queue``) or by ``device.run`` (asynchronous mode)."""

    def __init__(self, transport: MmioTransport) -> None:
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


class MmioTransport:
    """One virtio-mmio (version 2) device.

    ``device``: a ``VirtioDevice`` (served in process by a ``DeviceBackend``), or an
    object that is both ``MmioDevice`` and ``MmioBackend`` (e.g. a vhost-user
    front-end).  ``memory`` is a ``GuestMemory`` or a callable returning one (called when the first
    queue starts, e.g. to map the VMM's RAM lazily).  ``interrupt(level)`` drives the
    device's interrupt line.  ``runner``: a ``TrioRunner`` for the synchronous mode
    (see the module doc); ``None`` for the asynchronous mode, where ``on_driver_ok``
    receives the ``ActiveDevice``.
    """

    def __init__(
        self,
        device: VirtioDevice | MmioDevice,
        memory: GuestMemory | Callable[[], GuestMemory],
        interrupt: Callable[[bool], None] | None = None,
        *,
        runner: TrioRunner | None = None,
        on_driver_ok: Callable[[ActiveDevice], None] | None = None,
        name: str = "virtio-mmio",
        vendor_id: int = VENDOR_ID,
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
        self.interrupt = interrupt or (lambda level: None)
        self.runner = runner
        self.on_driver_ok = on_driver_ok
        self.vendor_id = vendor_id
        self.transport_features = F_VERSION_1 | (F_RING_RESET if ring_reset else 0)
        self.errors: list[DriverError] = []
        self.queues = [_QueueRegs(n) for n in device.queue_max_sizes]
        self.notifiers = [MmioQueueNotifier(self, i) for i in range(len(self.queues))]
        self.active: ActiveDevice | None = None
        self.config_generation = 0
        self.interrupts_raised = 0
        self.kicks = 0
        self._line = False
        self._reset_state()

    # -- state ----------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.interrupt_status = 0
        for q in self.queues:
            q.reset()
            q.reset_pending = False
        self.active = None
        self._update_line()

    def reset(self) -> None:
        """Device reset (§2.4, §4.2.2.1): the device first (a backend stops its rings, so
        nothing notifies after), then status, features, queues and interrupts."""
        self.device.reset()
        with self._lock:
            self._reset_state()

    # -- snapshots ------------------------------------------------------------------------------
    _SAVED_REGS = (
        "status", "device_features_sel", "driver_features_sel", "driver_features",
        "queue_sel", "shm_sel", "interrupt_status", "config_generation",
        "interrupts_raised", "kicks",
    )  # fmt: skip

    def save_state(self) -> dict[str, Any]:
        """The transport's registers, every queue (configuration and ring positions, §2.7
        / §2.8 state as ``QueueState``) and the device's own state, as plain data for a
        machine snapshot.  Only between exits of the synchronous mode, when the device
        has settled (no chain popped and not yet used); an external (vhost-user) device
        keeps its state in another process and cannot be saved here."""
        if not isinstance(self.backend, DeviceBackend) or self.runner is None:
            raise RuntimeError(
                f"{self.name}: only an in-process device in synchronous mode can be saved"
            )
        queues = []
        for q in self.queues:
            c = q.config
            queues.append({
                "size": c.size, "ready": c.ready, "desc_addr": c.desc_addr,
                "driver_addr": c.driver_addr, "device_addr": c.device_addr,
                "reset_pending": q.reset_pending,
                "vq": q.vq.state().to_dict() if q.vq is not None else None,
            })  # fmt: skip
        return {
            **{name: getattr(self, name) for name in self._SAVED_REGS},
            "queues": queues,
            "errors": [str(e) for e in self.errors],
            "device": self.device.save_state(),  # type: ignore[union-attr]
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Apply ``save_state()`` output to a freshly built transport with the same device:
        registers, queues rebuilt with ``Virtqueue.restore`` (validated, untrusted input),
        the features replayed to the device, and DRIVER_OK's activation redone."""
        device = self.device
        assert isinstance(device, VirtioDevice)
        device.reset()
        with self._lock:
            self._reset_state()
            for name in self._SAVED_REGS:
                value = state[name]
                if not isinstance(value, int):
                    raise ValueError(f"{self.name}: saved {name} is not an integer")
                setattr(self, name, value)
        if len(state["queues"]) != len(self.queues):
            raise ValueError(
                f"{self.name}: the snapshot has {len(state['queues'])} queues,"
                f" the device {len(self.queues)}"
            )
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
            if saved["vq"] is not None:
                q.vq = Virtqueue.restore(
                    self.memory, QueueState.from_dict(saved["vq"]), f"{self.name}.q{i}"
                )
        if self.status & DRIVER_OK and not self.status & NEEDS_RESET:
            self.backend.driver_ok(self.negotiated)
        with self._lock:
            self._update_line()

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

    # -- interrupts -------------------------------------------------------------------------
    def _update_line(self) -> None:
        level = self.interrupt_status != 0
        if level and not self._line:
            self.interrupts_raised += 1
        if level != self._line or level:
            self._line = level
            self.interrupt(level)

    def used_buffer_notification(self, index: int = 0) -> None:
        """Used Buffer Notification (§2.3, §4.2.3.4): InterruptStatus bit 0 + IRQ."""
        with self._lock:
            self.interrupt_status |= INT_VRING
            self._update_line()

    def config_change_notification(self) -> None:
        """Configuration Change Notification (§4.2.3.4): InterruptStatus bit 1 + IRQ."""
        with self._lock:
            self.interrupt_status |= INT_CONFIG
            self._update_line()

    def config_changed(self) -> None:
        """The device changed its configuration space: bump ConfigGeneration (§2.5)
        and notify the driver if it is running."""
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

    # -- bus protocol ----------------------------------------------------------------------------
    def register_name(self, offset: int, is_write: bool) -> str:
        if offset >= CONFIG_BASE:
            return "config"
        return REGISTER_NAMES.get(offset, f"{offset:#x}")

    def read(self, offset: int, size: int) -> int:
        if self.broken is not None:
            raise self.broken
        try:
            if offset >= CONFIG_BASE:
                return self._read_config(offset - CONFIG_BASE, size)
            self._check_control(offset, size, write=False)
            return self._read_reg(offset) & ALL_ONES_32
        except DriverError as exc:
            self.driver_error(exc, needs_reset=not isinstance(exc, MmioAccessError))
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self.broken is not None:
            raise self.broken
        try:
            if offset >= CONFIG_BASE:
                self._write_config(offset - CONFIG_BASE, size, value)
                return
            self._check_control(offset, size, write=True)
            self._write_reg(offset, value & ALL_ONES_32)
        except (FeatureNegotiationError, MmioAccessError) as exc:
            self.driver_error(exc, needs_reset=False)
        except DriverError as exc:
            self.driver_error(exc)

    def _check_control(self, offset: int, size: int, *, write: bool) -> None:
        if size != 4 or offset % 4:
            raise MmioAccessError(
                f"{size}-byte access at {offset:#x}: control registers take only 32-bit"
                " wide and aligned accesses"
            )
        allowed = WRITE_REGISTERS if write else READ_REGISTERS
        if offset in allowed:
            return
        other = READ_REGISTERS if write else WRITE_REGISTERS
        name = REGISTER_NAMES.get(offset)
        if offset in other:
            kind = "read-only" if write else "write-only"
            verb = "write to" if write else "read of"
            raise MmioAccessError(f"{verb} the {kind} register {name} ({offset:#x})")
        raise MmioAccessError(f"access to {offset:#x}, which is no register of the layout")

    # -- configuration space -------------------------------------------------------------------
    def _check_config(self, offset: int, size: int, length: int) -> None:
        if size not in (1, 2, 4) or offset % size:
            raise MmioAccessError(
                f"{size}-byte configuration access at +{offset:#x}: only 8-, 16- and"
                " aligned 32-bit accesses are allowed"
            )
        if offset + size > length:
            raise MmioAccessError(
                f"configuration access at +{offset:#x} (+{size}) beyond the"
                f" {length}-byte configuration space"
            )

    def _read_config(self, offset: int, size: int) -> int:
        self._check_config(offset, size, self.device.config_size)
        return int.from_bytes(self.device.read_config(offset, size), "little")

    def _write_config(self, offset: int, size: int, value: int) -> None:
        self._check_config(offset, size, self.device.config_size)
        self.device.write_config(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    # -- control registers ----------------------------------------------------------------------
    def _sel(self) -> _QueueRegs | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_reg(self, offset: int) -> int:
        if offset == R.VIRTIO_MMIO_MAGIC_VALUE:
            return VIRTIO_MMIO_MAGIC
        if offset == R.VIRTIO_MMIO_VERSION:
            return VIRTIO_MMIO_VERSION_MODERN
        if offset == R.VIRTIO_MMIO_DEVICE_ID:
            return int(self.device.device_id)
        if offset == R.VIRTIO_MMIO_VENDOR_ID:
            return self.vendor_id
        if offset == R.VIRTIO_MMIO_DEVICE_FEATURES:
            return (self.offered_features >> (32 * self.device_features_sel)) & ALL_ONES_32
        if offset == R.VIRTIO_MMIO_QUEUE_NUM_MAX:
            q = self._sel()
            return q.config.max_size if q else 0  # 0: queue not available (§4.2.3.2)
        if offset == R.VIRTIO_MMIO_QUEUE_READY:
            q = self._sel()
            return int(q.config.ready) if q else 0
        if offset == R.VIRTIO_MMIO_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == R.VIRTIO_MMIO_STATUS:
            self.backend.status_read()
            return self.status
        if offset in (
            R.VIRTIO_MMIO_SHM_LEN_LOW,
            R.VIRTIO_MMIO_SHM_LEN_HIGH,
            R.VIRTIO_MMIO_SHM_BASE_LOW,
            R.VIRTIO_MMIO_SHM_BASE_HIGH,
        ):
            return ALL_ONES_32  # no shared memory region with this id: length -1 (§4.2.2)
        if offset == R.VIRTIO_MMIO_QUEUE_RESET:
            q = self._sel()
            return int(bool(q and q.reset_pending))
        if offset == R.VIRTIO_MMIO_CONFIG_GENERATION:
            return self.config_generation
        raise AssertionError(offset)  # pragma: no cover - filtered by _check_control

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == R.VIRTIO_MMIO_STATUS:
            self._write_status(value)
        elif offset == R.VIRTIO_MMIO_QUEUE_NOTIFY:
            self._notify(value)
        elif offset == R.VIRTIO_MMIO_INTERRUPT_ACK:
            with self._lock:
                self.interrupt_status &= ~value
                self._update_line()
        elif offset == R.VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == R.VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == R.VIRTIO_MMIO_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == R.VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == R.VIRTIO_MMIO_SHM_SEL:
            self.shm_sel = value
        elif offset == R.VIRTIO_MMIO_QUEUE_READY:
            self._write_queue_ready(value)
        elif offset == R.VIRTIO_MMIO_QUEUE_RESET:
            self._write_queue_reset(value)
        else:
            self._write_queue_setup(offset, value)

    # -- features -------------------------------------------------------------------------------
    def _write_driver_features(self, value: int) -> None:
        if self.status & FEATURES_OK:
            raise FeatureNegotiationError(
                "DriverFeatures written after FEATURES_OK: the driver must not accept new"
                " features once the device accepted the set",
                section=sec.S_3_1_1,
            )
        if not self.status & DRIVER:
            raise DeviceStatusError(
                "DriverFeatures written before Status has DRIVER (feature negotiation is"
                " step 4 of the initialization)",
                section=sec.S_3_1_1,
            )
        if self.driver_features_sel > 3:
            raise FeatureNegotiationError(
                f"DriverFeaturesSel {self.driver_features_sel} selects bits above 127,"
                " which are reserved",
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
                "VIRTIO_F_VERSION_1 not accepted: a version 2 virtio-mmio device has no"
                " legacy interface",
                section=sec.S_6_1,
            )
        self.device.ack_features(self.driver_features & self.device.offered_features())

    # -- status ---------------------------------------------------------------------------------
    def _write_status(self, value: int) -> None:
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
    def _selected_for_setup(self, what: str) -> _QueueRegs:
        q = self._sel()
        if q is None:
            raise QueueSetupError(
                f"{what} written with QueueSel {self.queue_sel}, but the device has"
                f" {len(self.queues)} queue(s) (QueueNumMax reads 0)"
            )
        if q.config.ready:
            raise QueueSetupError(
                f"{what} written for queue {self.queue_sel} while QueueReady is 1: the"
                " driver must not access the queue configuration registers then",
                section=sec.S_4_2_2_2,
            )
        return q

    def _write_queue_setup(self, offset: int, value: int) -> None:
        name = REGISTER_NAMES[offset]
        q = self._selected_for_setup(name)
        c = q.config
        if offset == R.VIRTIO_MMIO_QUEUE_NUM:
            if not 0 < value <= c.max_size:
                raise QueueSetupError(
                    f"QueueNum {value} for queue {self.queue_sel} outside 1..QueueNumMax"
                    f" ({c.max_size})",
                    section=sec.S_4_2_2_2,
                )
            c.size = value
            return
        field = {
            R.VIRTIO_MMIO_QUEUE_DESC_LOW: ("desc_addr", 0),
            R.VIRTIO_MMIO_QUEUE_DESC_HIGH: ("desc_addr", 32),
            R.VIRTIO_MMIO_QUEUE_AVAIL_LOW: ("driver_addr", 0),
            R.VIRTIO_MMIO_QUEUE_AVAIL_HIGH: ("driver_addr", 32),
            R.VIRTIO_MMIO_QUEUE_USED_LOW: ("device_addr", 0),
            R.VIRTIO_MMIO_QUEUE_USED_HIGH: ("device_addr", 32),
        }[MmioReg(offset)]
        attr, shift = field
        old = getattr(c, attr)
        setattr(c, attr, (old & ~(ALL_ONES_32 << shift)) | (value << shift))

    def _write_queue_ready(self, value: int) -> None:
        q = self._sel()
        if q is None:
            raise QueueSetupError(
                f"QueueReady written for queue {self.queue_sel}, which does not exist"
            )
        if value == 0:
            # Stop using the queue (§4.2.2: the driver writes 0 and reads it back).
            q.config.ready = False
            if q.vq is not None:
                q.vq = None
                self.backend.stop_queue(self.queue_sel)
            return
        if value != 1:
            raise QueueSetupError(f"QueueReady written with {value}: only 0 and 1 are defined")
        if q.config.ready:
            return
        if not self.status & FEATURES_OK:
            raise QueueSetupError(
                "QueueReady=1 before FEATURES_OK: virtqueues are set up after feature"
                " negotiation (step 7 of the initialization)",
                section=sec.S_3_1_1,
            )
        if self.status & DRIVER_OK and not q.reset_pending:
            raise QueueSetupError(
                f"queue {self.queue_sel} enabled after DRIVER_OK: a live device takes a new"
                " queue only after a virtqueue reset (VIRTIO_F_RING_RESET, QueueReset)",
                section=sec.S_2_6_1,
            )
        if self.status & NEEDS_RESET:
            return
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

    def _write_queue_reset(self, value: int) -> None:
        if not self.has(F_RING_RESET):
            raise QueueSetupError(
                "QueueReset written but VIRTIO_F_RING_RESET was not negotiated",
                section=sec.S_4_2_2_2,
            )
        q = self._sel()
        if q is None:
            raise QueueSetupError(f"QueueReset for queue {self.queue_sel}, which does not exist")
        if value != 1:
            raise QueueSetupError(
                f"QueueReset written with {value}: the driver resets a queue by writing 1",
                section=sec.S_4_2_2_2,
            )
        was_running = q.vq is not None
        q.reset()
        q.reset_pending = True
        if was_running:
            self.backend.stop_queue(self.queue_sel)

    # -- notifications ----------------------------------------------------------------------------
    def _notify(self, value: int) -> None:
        index = value & 0xFFFF  # without NOTIFICATION_DATA the value is the queue index
        if self.status & NEEDS_RESET:
            return  # the device stopped; the driver has to reset it
        if not self.status & DRIVER_OK:
            raise NotificationError(
                f"QueueNotify({index}) before DRIVER_OK: the driver must not notify before"
                " the device is live",
                section=sec.S_3_1_1,
            )
        if index >= len(self.queues) or self.queues[index].vq is None:
            raise NotificationError(f"QueueNotify for queue {index}, which is not ready")
        self.kicks += 1
        self.backend.notify(index)

    async def service_queue(self, index: int, vq: Virtqueue) -> None:
        """QueueNotify in the synchronous mode.  The device's queue services (the
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
