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
the §4.2.2 rules; the §3.1.1 rules every transport shares are
``virtio.transport.core.VirtioTransport``'s.  What runs the queues is a *backend*
(``MmioBackend``, also behind ``virtio.transport.pci.PciTransport``), told
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

from collections.abc import Callable
from typing import Any

from virtio.device import ActiveDevice, VirtioDevice
from virtio.errors import DriverError
from virtio.memory import GuestMemory
from virtio.spec import sections as sec
from virtio.spec.mmio import (
    VIRTIO_MMIO_MAGIC,
    VIRTIO_MMIO_VERSION_MODERN,
    MmioInterrupt,
    MmioReg,
)
from virtio.transport.core import (
    ALL_ONES_32,
    TRANSPORT_FEATURES,
    DeviceBackend,
    DeviceStatusError,
    FeatureNegotiationError,
    MmioBackend,
    MmioDevice,
    NotificationError,
    QueueNotifier,
    QueueSetupError,
    TrioRunner,
    VirtioTransport,
)

__all__ = [
    "CONFIG_BASE",
    "INT_CONFIG",
    "INT_VRING",
    "TRANSPORT_FEATURES",
    "DeviceBackend",
    "DeviceStatusError",
    "FeatureNegotiationError",
    "MmioAccessError",
    "MmioBackend",
    "MmioDevice",
    "MmioQueueNotifier",
    "MmioTransport",
    "NotificationError",
    "QueueSetupError",
    "TrioRunner",
]

R = MmioReg
INT_VRING = int(MmioInterrupt.VIRTIO_MMIO_INT_VRING)
INT_CONFIG = int(MmioInterrupt.VIRTIO_MMIO_INT_CONFIG)
CONFIG_BASE = int(R.VIRTIO_MMIO_CONFIG)
VENDOR_ID = 0x554D4551  # "QEMU" as Linux/QEMU report it; any value is allowed (§4.2.2)
MmioQueueNotifier = QueueNotifier
"""The asynchronous mode's notifier (the name it had before the PCI transport)."""


# -- typed driver errors -------------------------------------------------------------------
class MmioAccessError(DriverError):
    """A register access the register layout forbids: wrong width or alignment, an
    undefined offset, a write to a read-only or a read of a write-only register, a
    configuration access outside the configuration space (§4.2.2.2)."""

    spec_section = sec.S_4_2_2_2


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


class MmioTransport(VirtioTransport):
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
        super().__init__(
            device,
            memory,
            runner=runner,
            on_driver_ok=on_driver_ok,
            name=name,
            ring_reset=ring_reset,
        )
        self.interrupt = interrupt or (lambda level: None)
        self.vendor_id = vendor_id
        self._line = False
        self._reset_state()

    # -- state ----------------------------------------------------------------------------
    def _reset_state(self) -> None:
        super()._reset_state()
        self.shm_sel = 0
        self.interrupt_status = 0
        self._update_line()

    # -- snapshots ------------------------------------------------------------------------------
    _SAVED_REGS = (
        "status", "device_features_sel", "driver_features_sel", "driver_features",
        "queue_sel", "shm_sel", "interrupt_status", "config_generation",
        "interrupts_raised", "kicks",
    )  # fmt: skip

    def _load_interrupts(self, state: dict[str, Any]) -> None:
        self._update_line()

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
            return self.read_device_features()
        if offset == R.VIRTIO_MMIO_QUEUE_NUM_MAX:
            q = self.selected_queue()
            return q.config.max_size if q else 0  # 0: queue not available (§4.2.3.2)
        if offset == R.VIRTIO_MMIO_QUEUE_READY:
            q = self.selected_queue()
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
            q = self.selected_queue()
            return int(bool(q and q.reset_pending))
        if offset == R.VIRTIO_MMIO_CONFIG_GENERATION:
            return self.config_generation
        raise AssertionError(offset)  # pragma: no cover - filtered by _check_control

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == R.VIRTIO_MMIO_STATUS:
            self.write_status(value)
        elif offset == R.VIRTIO_MMIO_QUEUE_NOTIFY:
            # without NOTIFICATION_DATA the value is the queue index
            self.notify_queue(value & 0xFFFF)
        elif offset == R.VIRTIO_MMIO_INTERRUPT_ACK:
            with self._lock:
                self.interrupt_status &= ~value
                self._update_line()
        elif offset == R.VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == R.VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == R.VIRTIO_MMIO_DRIVER_FEATURES:
            self.write_driver_features(value)
        elif offset == R.VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == R.VIRTIO_MMIO_SHM_SEL:
            self.shm_sel = value
        elif offset == R.VIRTIO_MMIO_QUEUE_READY:
            if value == 0:
                self.disable_queue()  # the driver writes 0 and reads it back (§4.2.2)
            elif value == 1:
                self.enable_queue()
            else:
                raise QueueSetupError(
                    f"QueueReady written with {value}: only 0 and 1 are defined",
                    section=self.QUEUE_CONFIGURATION,
                )
        elif offset == R.VIRTIO_MMIO_QUEUE_RESET:
            self.write_queue_reset(value)
        elif offset == R.VIRTIO_MMIO_QUEUE_NUM:
            self.write_queue_size(value)
        else:
            attr, shift = _QUEUE_ADDRESS[offset]
            self.write_queue_address(REGISTER_NAMES[offset], attr, shift, value)


_QUEUE_ADDRESS = {
    int(R.VIRTIO_MMIO_QUEUE_DESC_LOW): ("desc_addr", 0),
    int(R.VIRTIO_MMIO_QUEUE_DESC_HIGH): ("desc_addr", 32),
    int(R.VIRTIO_MMIO_QUEUE_AVAIL_LOW): ("driver_addr", 0),
    int(R.VIRTIO_MMIO_QUEUE_AVAIL_HIGH): ("driver_addr", 32),
    int(R.VIRTIO_MMIO_QUEUE_USED_LOW): ("device_addr", 0),
    int(R.VIRTIO_MMIO_QUEUE_USED_HIGH): ("device_addr", 32),
}
