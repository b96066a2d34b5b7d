"""virtio-pci, modern (non-transitional) device (virtio 1.4 §4.1).

``PciTransport`` is the virtio side of one PCI function, pure and independent of the
CPU: what a VMM's PCI model needs to expose it (IDs, one memory BAR, the capability
list) and the register file behind them.  The rules every transport shares (status
machine, feature negotiation, queue set-up, reset, driver-error bookkeeping) are
``virtio.transport.core.VirtioTransport``'s, the same code ``MmioTransport`` runs;
the device sits behind the same backend interface (``DeviceBackend`` for a
``VirtioDevice`` in process, ``emulator.vhost_user.VhostUserBackend`` for a
vhost-user back-end), so every device runs unchanged over both transports.

Layout (BAR 0, 32-bit memory, :data:`BAR_SIZE` bytes; QEMU uses the same 4 KiB
spacing)::

    0x0000  common configuration  struct virtio_pci_common_cfg (§4.1.4.3)
    0x1000  ISR status            one byte, read to clear (§4.1.4.5)
    0x2000  device configuration  the device's config space (§4.1.4.6)
    0x3000  notifications         queue q at 0x3000 + 4 q (notify_off_multiplier 4,
                                  queue_notify_off = q, §4.1.4.4)
    0x4000  MSI-X table           num_queues + 1 entries (``virtio.transport.msix``)
    0x5000  MSI-X PBA

Capabilities (configuration space, from :data:`CAP_BASE`): common, notify, ISR,
device (when the device has a config space), the PCI configuration access window
(§4.1.4.9), then MSI-X.  ``config_read``/``config_write`` serve offsets from
``CAP_BASE`` on; the VMM's PCI model owns the header before it.

Interrupts (§4.1.5.3-4).  MSI-X disabled: the ISR bits and ``intx(level)`` (the
function's INTx line; the PCI model reflects ``intx_status`` in its Status register).
MSI-X enabled: ``config_msix_vector`` / ``queue_msix_vector`` pick the table entry,
NO_VECTOR means no interrupt at all, and ``msi(address, data)`` sends the message.
The configuration-change ISR bit is set either way (§4.1.4.5.1).

Strict checks: every §4.1 rule the driver can break becomes a typed ``DriverError``
citing its clause, recorded and logged like on virtio-mmio: access widths of the
common configuration and device configuration (§4.1.3.1), writes to read-only fields
(§4.1.4.3.2), queue_size not a power of two for a split ring, 0 written to
queue_enable, a queue enabled before its rings were configured (§4.1.4.3.2), a
notification of the wrong width, value or address (§4.1.5.2.1), a vector beyond the
MSI-X table (§4.1.5.1.2.2), a write to a capability (§4.1.4.1), a misaligned or
out-of-structure PCI configuration access window (§4.1.4.9.2).  Access and vector
errors drop the access (reads return 0) without a reset, as on virtio-mmio; the rest
set DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from virtio.device import ActiveDevice, VirtioDevice
from virtio.errors import DriverError
from virtio.memory import GuestMemory
from virtio.spec import sections as sec
from virtio.spec.features import TransportFeature as TF
from virtio.spec.ids import DeviceId
from virtio.spec.pci import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_VENDOR_ID,
    PciCapType,
    PciCommonCfg,
    PciIsr,
    pci_device_id,
    virtio_pci_common_cfg,
)
from virtio.transport.core import (
    ALL_ONES_32,
    FeatureNegotiationError,
    MmioDevice,
    QueueSetupError,
    TrioRunner,
    VirtioTransport,
    _QueueRegs,
)
from virtio.transport.msix import CAP_ID_MSIX, MsixAccessError, MsixTable

C = PciCommonCfg
NO_VECTOR = VIRTIO_MSI_NO_VECTOR
ISR_QUEUE = int(PciIsr.VIRTIO_PCI_ISR_QUEUE)
ISR_CONFIG = int(PciIsr.VIRTIO_PCI_ISR_CONFIG)
F_RING_PACKED = TF.VIRTIO_F_RING_PACKED.mask

BAR = 0
COMMON_OFFSET, ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET = 0x4000, 0x5000
REGION = 0x1000
BAR_SIZE = 0x8000
COMMON_LENGTH = virtio_pci_common_cfg.sizeof()
NOTIFY_OFF_MULTIPLIER = 4
NOTIFY_WIDTH = 2  # without VIRTIO_F_NOTIFICATION_DATA (§4.1.5.2.1)

CAP_BASE = 0x40
"""First capability in configuration space (the standard header ends at 0x40)."""
PCI_CAP_ID_VNDR = 0x09
REVISION_ID = 1  # non-transitional devices SHOULD have revision 1 or higher (§4.1.2.1)
CLASS_CODES = {
    int(DeviceId.VIRTIO_ID_NET): 0x020000,  # network controller
    int(DeviceId.VIRTIO_ID_BLOCK): 0x010000,  # mass storage (QEMU: SCSI)
    int(DeviceId.VIRTIO_ID_INPUT): 0x098000,  # input device, other
}
CLASS_OTHER = 0xFF0000


class PciAccessError(DriverError):
    """An access the layout forbids: wrong width or alignment for the field
    (§4.1.3.1), a write to a read-only field (§4.1.4.3.2), an offset no structure
    covers (§4.1.4)."""

    spec_section = sec.S_4_1_3_1


class PciCapabilityError(DriverError):
    """A write to a virtio capability other than the PCI configuration access window's
    fields, or a window that addresses no virtio structure (§4.1.4.1, §4.1.4.9.2)."""

    spec_section = sec.S_4_1_4_1


class MsixVectorError(DriverError):
    """An event mapped to a vector outside the MSI-X table (§4.1.5.1.2.2); the field
    then reads NO_VECTOR, the device's way of reporting a failed mapping."""

    spec_section = sec.S_4_1_5_1_2_2


# -- the common configuration structure (§4.1.4.3): offset -> (field, width, writable) ---
def _common_fields() -> dict[int, tuple[str, int, bool]]:
    writable = {
        "device_feature_select",
        "driver_feature_select",
        "driver_feature",
        "config_msix_vector",
        "device_status",
        "queue_select",
        "queue_size",
        "queue_msix_vector",
        "queue_enable",
        "queue_desc",
        "queue_driver",
        "queue_device",
        "queue_reset",
    }
    out: dict[int, tuple[str, int, bool]] = {}
    offset = 0
    for sub in virtio_pci_common_cfg.subcons:
        size = sub.sizeof()
        if size == 8:  # 64-bit fields are two 32-bit fields, low part first (§4.1.3)
            out[offset] = (f"{sub.name}_lo", 4, sub.name in writable)
            out[offset + 4] = (f"{sub.name}_hi", 4, sub.name in writable)
        else:
            out[offset] = (sub.name, size, sub.name in writable)
        offset += size
    return out


COMMON_FIELDS = _common_fields()
assert COMMON_FIELDS[int(C.VIRTIO_PCI_COMMON_Q_RESET)][0] == "queue_reset"
_RO_WRITE_RULE = "the driver must not write to it"
_QUEUE_ADDRESS = {
    "queue_desc": "desc_addr",
    "queue_driver": "driver_addr",
    "queue_device": "device_addr",
}


def _cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytearray:
    """``struct virtio_pci_cap`` (+ extra fields); cap_next is patched in later."""
    body = bytearray(16 + len(extra))
    body[0] = PCI_CAP_ID_VNDR
    body[2] = len(body)
    body[3] = cfg_type
    body[4] = BAR
    body[8:12] = offset.to_bytes(4, "little")
    body[12:16] = length.to_bytes(4, "little")
    body[16:] = extra
    return body


class PciTransport(VirtioTransport):
    """One virtio-pci modern device (see the module doc).

    ``intx(level)``: the INTx line while MSI-X is off; ``msi(address, data)``: an
    MSI-X message.  ``msix_vectors``: table size (default num_queues + 1, at least 2,
    §4.1.5.1.2.1).  Other arguments as ``MmioTransport``.
    """

    REG: ClassVar[dict[str, str]] = {
        "status": "device_status",
        "driver_features": "driver_feature",
        "driver_features_sel": "driver_feature_select",
        "queue_sel": "queue_select",
        "queue_size": "queue_size",
        "queue_size_max": "queue_size",
        "queue_enable": "queue_enable",
        "queue_reset": "queue_reset",
        "queue_notify": "queue notification",
    }
    REGISTER_RULES = sec.S_4_1_4_3_2
    QUEUE_CONFIGURATION = sec.S_4_1_5_1_3
    NOTIFICATIONS = sec.S_4_1_5_2_1

    def __init__(
        self,
        device: VirtioDevice | MmioDevice,
        memory: GuestMemory | Callable[[], GuestMemory],
        *,
        intx: Callable[[bool], None] | None = None,
        msi: Callable[[int, int], None] | None = None,
        runner: TrioRunner | None = None,
        on_driver_ok: Callable[[ActiveDevice], None] | None = None,
        name: str = "virtio-pci",
        ring_reset: bool = True,
        msix_vectors: int | None = None,
    ) -> None:
        super().__init__(
            device,
            memory,
            runner=runner,
            on_driver_ok=on_driver_ok,
            name=name,
            ring_reset=ring_reset,
        )
        self.intx = intx or (lambda level: None)
        self.msi = msi or (lambda address, data: None)
        nvec = msix_vectors if msix_vectors is not None else max(2, len(self.queues) + 1)
        self.msix = MsixTable(nvec, self._send_msi)
        self.vendor_id = VIRTIO_PCI_VENDOR_ID
        self.device_id = pci_device_id(int(device.device_id))
        self.class_code = CLASS_CODES.get(int(device.device_id), CLASS_OTHER)
        self.revision = REVISION_ID
        self.subsystem_vendor_id = VIRTIO_PCI_VENDOR_ID
        self.subsystem_id = 0x1100  # QEMU's; the spec leaves it to the environment
        self._line = False
        self.msi_messages = 0
        self._build_capabilities()
        self._reset_state()

    # -- state ------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        super()._reset_state()
        self.isr = 0
        self.config_vector = NO_VECTOR  # every event unmapped on reset (§4.1.5.1.2.1)
        self.queue_vectors = [NO_VECTOR] * len(self.queues)
        self.configured = [set() for _ in self.queues]  # ring fields written since reset
        self._update_intx()

    def function_reset(self) -> None:
        """PCI function-level reset: the device, and MSI-X back to disabled/masked."""
        self.reset()
        self.msix.reset()
        self._cfg_window = [BAR, 0, 0, 0]

    # -- snapshots ----------------------------------------------------------------------------
    _SAVED_REGS = (
        "status", "device_features_sel", "driver_features_sel", "driver_features",
        "queue_sel", "config_generation", "interrupts_raised", "kicks", "isr",
        "config_vector", "msi_messages",
    )  # fmt: skip

    def _save_queue_extra(self, index: int) -> dict[str, Any]:
        return {
            "vector": self.queue_vectors[index],
            "configured": sorted(self.configured[index]),
        }

    def _save_extra(self) -> dict[str, Any]:
        """The INTx level, the PCI configuration access window and MSI-X."""
        return {
            "line": self._line,
            "cfg_window": list(self._cfg_window),
            "msix": self.msix.save_state(),
        }

    def _load_extra(self, state: dict[str, Any]) -> None:
        window = [int(v) for v in state["cfg_window"]]
        if len(window) != 4:
            raise ValueError(f"{self.name}: saved cfg_window is not 4 values")
        self._cfg_window = window
        self.msix.load_state(state["msix"])

    def _load_queue_extra(self, index: int, saved: dict[str, Any]) -> None:
        self.queue_vectors[index] = int(saved["vector"])
        self.configured[index] = {str(f) for f in saved["configured"]}

    def _load_interrupts(self, state: dict[str, Any]) -> None:
        self._line = not bool(state["line"])  # forces the level out again
        self._update_intx()
        self.interrupts_raised = int(state["interrupts_raised"])

    # -- identity and capabilities ---------------------------------------------------------
    def _build_capabilities(self) -> None:
        nq = len(self.queues)
        caps: list[tuple[str, bytearray]] = [
            ("common", _cap(PciCapType.VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LENGTH)),
            (
                "notify",
                _cap(
                    PciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG,
                    NOTIFY_OFFSET,
                    max(NOTIFY_WIDTH, (nq - 1) * NOTIFY_OFF_MULTIPLIER + NOTIFY_WIDTH),
                    NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little"),
                ),
            ),
            ("isr", _cap(PciCapType.VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1)),
        ]
        if self.device.config_size:
            length = self.device.config_size
            caps.append(
                ("device", _cap(PciCapType.VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, length))
            )
        caps.append(("pci_cfg", _cap(PciCapType.VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4))))
        msix = bytearray(12)
        msix[0] = CAP_ID_MSIX
        msix[4:8] = (MSIX_TABLE_OFFSET | BAR).to_bytes(4, "little")
        msix[8:12] = (MSIX_PBA_OFFSET | BAR).to_bytes(4, "little")
        caps.append(("msix", msix))
        self.cap_offsets: dict[str, int] = {}
        at = CAP_BASE
        for kind, body in caps:
            self.cap_offsets[kind] = at
            at += (len(body) + 3) & ~3  # capabilities are dword aligned
        blob = bytearray(at - CAP_BASE)
        offsets = list(self.cap_offsets.values())
        for i, (_kind, body) in enumerate(caps):
            body[1] = offsets[i + 1] if i + 1 < len(caps) else 0
            start = offsets[i] - CAP_BASE
            blob[start : start + len(body)] = body
        assert CAP_BASE + len(blob) <= 0x100
        self._caps = blob
        self._cfg_window = [BAR, 0, 0, 0]  # cap.bar, cap.offset, cap.length, pci_cfg_data

    @property
    def capability_pointer(self) -> int:
        return CAP_BASE

    @property
    def bars(self) -> list[tuple[int, int]]:
        """``[(index, size)]`` of the function's 32-bit memory BARs."""
        return [(BAR, BAR_SIZE)]

    # -- configuration space: the capability list ------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at configuration-space ``offset`` (>= ``CAP_BASE``)."""
        if self.broken is not None:
            raise self.broken
        data = bytearray(self._caps)
        cfg = self.cap_offsets["pci_cfg"] - CAP_BASE
        bar, off, length, _ = self._cfg_window
        data[cfg + 4] = bar
        data[cfg + 8 : cfg + 12] = off.to_bytes(4, "little")
        data[cfg + 12 : cfg + 16] = length.to_bytes(4, "little")
        if self._overlaps(offset, size, "pci_cfg", 16, 4):
            try:
                self._window_access(None)
            except DriverError as exc:
                self.driver_error(exc, needs_reset=False)
                self._cfg_window[3] = 0
        data[cfg + 16 : cfg + 20] = self._cfg_window[3].to_bytes(4, "little")
        mx = self.cap_offsets["msix"] - CAP_BASE
        data[mx + 2 : mx + 4] = self.msix.control.to_bytes(2, "little")
        rel = offset - CAP_BASE
        if rel < 0:
            raise ValueError(f"configuration offset {offset:#x} is the PCI header's")
        chunk = data[rel : rel + size].ljust(size, b"\0")
        return int.from_bytes(chunk, "little")

    def _overlaps(self, offset: int, size: int, cap: str, start: int, length: int) -> bool:
        lo = self.cap_offsets[cap] + start
        return offset < lo + length and lo < offset + size

    def config_write(self, offset: int, size: int, value: int) -> None:
        if self.broken is not None:
            raise self.broken
        try:
            self._config_write(offset, size, value)
        except DriverError as exc:
            self.driver_error(exc, needs_reset=False)

    def _config_write(self, offset: int, size: int, value: int) -> None:
        mx = self.cap_offsets["msix"]
        if (offset == mx + 2 and size == 2) or (offset == mx and size == 4):
            control = value >> 16 if size == 4 else value
            self.msix.write_control(control & 0xFFFF)
            return
        cfg = self.cap_offsets["pci_cfg"]
        fields = {cfg + 4: (0, 1), cfg + 8: (1, 4), cfg + 12: (2, 4), cfg + 16: (3, 4)}
        if offset in fields and size <= fields[offset][1]:
            index = fields[offset][0]
            if index == 3:
                mask = (1 << (8 * size)) - 1
                self._cfg_window[3] = (self._cfg_window[3] & ~mask) | (value & mask)
                self._window_access(value & mask)
            else:
                self._cfg_window[index] = value & ((1 << (8 * size)) - 1)
            return
        if CAP_BASE <= offset < CAP_BASE + len(self._caps):
            raise PciCapabilityError(
                f"{size}-byte write of {value:#x} at configuration offset {offset:#x}: the"
                " driver must not write a virtio capability (only the PCI configuration"
                " access window's bar, offset, length and data, and MSI-X Message Control)"
            )
        raise PciCapabilityError(f"write at configuration offset {offset:#x}, where nothing is")

    def _window_access(self, value: int | None) -> None:
        """The PCI configuration access capability (§4.1.4.9): ``pci_cfg_data`` reads or
        writes ``cap.length`` bytes at ``cap.offset`` of BAR ``cap.bar``."""
        bar, off, length, _ = self._cfg_window
        if length not in (1, 2, 4) or off % length:
            raise PciCapabilityError(
                f"PCI configuration access window with length {length} at offset {off:#x}:"
                " the length must be 1, 2 or 4 and the offset a multiple of it",
                section=sec.S_4_1_4_9_2,
            )
        inside = bar == BAR and any(
            start <= off and off + length <= start + size
            for start, size in self._structures().values()
        )
        if not inside:
            raise PciCapabilityError(
                f"PCI configuration access window at BAR {bar} +{off:#x} (+{length}) is"
                " not inside a structure another virtio capability describes",
                section=sec.S_4_1_4_9_2,
            )
        if value is None:
            self._cfg_window[3] = self.read(off, length)
        else:
            self.write(off, length, value)

    def _structures(self) -> dict[str, tuple[int, int]]:
        out = {
            "common": (COMMON_OFFSET, COMMON_LENGTH),
            "isr": (ISR_OFFSET, 1),
            "notify": (NOTIFY_OFFSET, max(NOTIFY_WIDTH, 4 * (len(self.queues) - 1) + 2)),
        }
        if self.device.config_size:
            out["device"] = (DEVICE_OFFSET, self.device.config_size)
        return out

    # -- interrupts -----------------------------------------------------------------------------
    @property
    def intx_status(self) -> bool:
        """What the PCI Status register's Interrupt Status bit shows (§4.1.4.5.1)."""
        return not self.msix.enabled and self.isr != 0

    def _update_intx(self) -> None:
        level = self.intx_status
        if level and not self._line:
            self.interrupts_raised += 1
        if level != self._line or level:
            self._line = level
            self.intx(level)

    def _send_msi(self, address: int, data: int) -> None:
        self.msi_messages += 1
        self.interrupts_raised += 1
        self.msi(address, data)

    def used_buffer_notification(self, index: int = 0) -> None:
        """Used Buffer Notification (§4.1.5.3): MSI-X through the queue's vector (none
        for NO_VECTOR, §4.1.5.3.1), else ISR bit 0 + INTx."""
        with self._lock:
            if self.msix.enabled:
                if index < len(self.queue_vectors):
                    vector = self.queue_vectors[index]
                    if vector != NO_VECTOR:
                        self.msix.signal(vector)
                return
            self.isr |= ISR_QUEUE
            self._update_intx()

    def config_change_notification(self) -> None:
        """Configuration change notification (§4.1.5.4): ISR bit 1 first (§4.1.4.5.1),
        then MSI-X through config_msix_vector, or INTx."""
        with self._lock:
            self.isr |= ISR_CONFIG
            if self.msix.enabled:
                if self.config_vector != NO_VECTOR:
                    self.msix.signal(self.config_vector)
                return
            self._update_intx()

    # -- BAR 0: bus protocol ----------------------------------------------------------------
    def register_name(self, offset: int, is_write: bool) -> str:
        region = offset // REGION
        if offset < COMMON_OFFSET + COMMON_LENGTH:
            field = COMMON_FIELDS.get(offset)
            return field[0] if field else f"common+{offset:#x}"
        return {
            ISR_OFFSET // REGION: "isr",
            DEVICE_OFFSET // REGION: "config",
            NOTIFY_OFFSET // REGION: "queue_notify",
            MSIX_TABLE_OFFSET // REGION: "msix_table",
            MSIX_PBA_OFFSET // REGION: "msix_pba",
        }.get(region, f"{offset:#x}")

    def read(self, offset: int, size: int) -> int:
        if self.broken is not None:
            raise self.broken
        try:
            return self._read(offset, size)
        except DriverError as exc:
            self.driver_error(exc, needs_reset=False)
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self.broken is not None:
            raise self.broken
        try:
            self._write(offset, size, value & ((1 << (8 * size)) - 1))
        except (FeatureNegotiationError, PciAccessError, MsixAccessError, MsixVectorError) as exc:
            self.driver_error(exc, needs_reset=False)
        except DriverError as exc:
            self.driver_error(exc)

    def _read(self, offset: int, size: int) -> int:
        if COMMON_OFFSET <= offset < COMMON_OFFSET + REGION:
            name = self._common_field(offset - COMMON_OFFSET, size, write=False)
            return self._read_common(name)
        if ISR_OFFSET <= offset < ISR_OFFSET + REGION:
            self._check_isr(offset - ISR_OFFSET, size)
            with self._lock:
                value, self.isr = self.isr, 0  # reading clears it (§4.1.4.5.1)
                self._update_intx()
            return value
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + REGION:
            rel = offset - DEVICE_OFFSET
            self._check_device_config(rel, size)
            return int.from_bytes(self.device.read_config(rel, size), "little")
        if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + REGION:
            return self.msix.read_table(offset - MSIX_TABLE_OFFSET, size)
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + REGION:
            return self.msix.read_pba(offset - MSIX_PBA_OFFSET, size)
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + REGION:
            raise PciAccessError(
                f"read of the notification area at +{offset - NOTIFY_OFFSET:#x}: it is"
                " written to notify, never read",
                section=sec.S_4_1_4_4,
            )
        raise PciAccessError(f"access to BAR offset {offset:#x}, which no capability describes")

    def _write(self, offset: int, size: int, value: int) -> None:
        if COMMON_OFFSET <= offset < COMMON_OFFSET + REGION:
            name = self._common_field(offset - COMMON_OFFSET, size, write=True)
            self._write_common(name, value)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + REGION:
            self._write_notify(offset - NOTIFY_OFFSET, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + REGION:
            rel = offset - DEVICE_OFFSET
            self._check_device_config(rel, size)
            self.device.write_config(rel, value.to_bytes(size, "little"))
        elif MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + REGION:
            self.msix.write_table(offset - MSIX_TABLE_OFFSET, size, value)
        elif MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + REGION:
            self.msix.write_pba(offset - MSIX_PBA_OFFSET, size, value)
        elif ISR_OFFSET <= offset < ISR_OFFSET + REGION:
            self._check_isr(offset - ISR_OFFSET, size)
            raise PciAccessError(
                "write to the ISR status, which the device owns", section=sec.S_4_1_4_5
            )
        else:
            raise PciAccessError(f"access to BAR offset {offset:#x}, which no capability describes")

    # -- access rules ---------------------------------------------------------------------------
    def _common_field(self, rel: int, size: int, *, write: bool) -> str:
        field = COMMON_FIELDS.get(rel)
        if field is None or field[1] != size:
            what = f"the {field[1] * 8}-bit field {field[0]}" if field else "no field start"
            raise PciAccessError(
                f"{size}-byte {'write' if write else 'read'} at common configuration"
                f" +{rel:#x} ({what}): 8-, 16- and 32-bit fields take accesses of exactly"
                " their width, aligned; 64-bit fields two 32-bit accesses"
            )
        name, _width, writable = field
        if write and not writable:
            raise PciAccessError(
                f"write of the read-only field {name}: {_RO_WRITE_RULE}",
                section=sec.S_4_1_4_3_2,
            )
        return name

    def _check_isr(self, rel: int, size: int) -> None:
        if rel != 0 or size != 1:
            raise PciAccessError(
                f"{size}-byte access at ISR status +{rel:#x}: the ISR status is one byte,"
                " read with an 8-bit access"
            )

    def _check_device_config(self, rel: int, size: int) -> None:
        length = self.device.config_size
        if size not in (1, 2, 4) or rel % size:
            raise PciAccessError(
                f"{size}-byte device configuration access at +{rel:#x}: only 8-, aligned"
                " 16- and aligned 32-bit accesses are allowed"
            )
        if rel + size > length:
            raise PciAccessError(
                f"device configuration access at +{rel:#x} (+{size}) beyond the"
                f" {length}-byte configuration space",
                section=sec.S_4_1_4_6,
            )

    # -- common configuration ---------------------------------------------------------------
    def _read_common(self, name: str) -> int:
        q = self.selected_queue()
        if name == "device_feature_select":
            return self.device_features_sel
        if name == "device_feature":
            return self.read_device_features()
        if name == "driver_feature_select":
            return self.driver_features_sel
        if name == "driver_feature":
            # valid bits the driver wrote (§4.1.4.3.1)
            shift = 32 * self.driver_features_sel
            return (self.driver_features & self.offered_features) >> shift & ALL_ONES_32
        if name == "config_msix_vector":
            return self.config_vector
        if name == "num_queues":
            return len(self.queues)
        if name == "device_status":
            self.backend.status_read()
            return self.status
        if name == "config_generation":
            return self.config_generation & 0xFF
        if name == "queue_select":
            return self.queue_sel
        if q is None:
            return 0  # queue_size 0: the queue is unavailable (§4.1.4.3.1)
        index = self.queue_sel
        if name == "queue_size":
            return q.config.size
        if name == "queue_msix_vector":
            return self.queue_vectors[index]
        if name == "queue_enable":
            return int(q.config.ready)
        if name == "queue_notify_off":
            return index
        if name in ("queue_desc_lo", "queue_desc_hi", "queue_driver_lo", "queue_driver_hi"):
            return self._queue_address_half(q, name)
        if name in ("queue_device_lo", "queue_device_hi"):
            return self._queue_address_half(q, name)
        if name == "queue_reset":
            return int(q.reset_pending)  # a reset completes at once: 0 after (§4.1.4.3.1)
        return 0  # queue_notif_config_data, admin_queue_index/num (not offered)

    def _queue_address_half(self, q: _QueueRegs, name: str) -> int:
        field, half = name.rsplit("_", 1)
        value = getattr(q.config, _QUEUE_ADDRESS[field])
        return (value >> (32 if half == "hi" else 0)) & ALL_ONES_32

    def _write_common(self, name: str, value: int) -> None:
        if name == "device_feature_select":
            self.device_features_sel = value
        elif name == "driver_feature_select":
            self.driver_features_sel = value
        elif name == "driver_feature":
            self.write_driver_features(value)
        elif name == "device_status":
            self.write_status(value)
        elif name == "queue_select":
            self.queue_sel = value
        elif name == "config_msix_vector":
            self.config_vector = self._map_vector(value, "config_msix_vector")
        elif name == "queue_msix_vector":
            q = self.selected_queue()
            if q is None:
                raise QueueSetupError(
                    f"queue_msix_vector written with queue_select {self.queue_sel}, but the"
                    f" device has {len(self.queues)} queue(s)",
                    section=self.QUEUE_CONFIGURATION,
                )
            self.queue_vectors[self.queue_sel] = self._map_vector(value, "queue_msix_vector")
        elif name == "queue_size":
            self._write_queue_size(value)
        elif name == "queue_enable":
            if value != 1:
                raise QueueSetupError(
                    f"queue_enable written with {value}: the driver must not write 0 (a"
                    " queue is stopped by a device or queue reset); 1 enables",
                    section=sec.S_4_1_4_3_2,
                )
            self.enable_queue()
        elif name == "queue_reset":
            self.write_queue_reset(value)
        else:
            field, half = name.rsplit("_", 1)
            self.write_queue_address(name, _QUEUE_ADDRESS[field], 32 if half == "hi" else 0, value)
            self.configured[self.queue_sel].add(field)

    def _map_vector(self, value: int, field: str) -> int:
        if value == NO_VECTOR or value < self.msix.size:
            return value
        # The mapping fails: the field reads NO_VECTOR (§4.1.5.1.2.1).
        self.driver_error(
            MsixVectorError(
                f"{field} written with {value}, outside the {self.msix.size}-entry MSI-X table"
            ),
            needs_reset=False,
        )
        return NO_VECTOR

    def _write_queue_size(self, value: int) -> None:
        packed = bool(self.negotiated & F_RING_PACKED)
        if not packed and value & (value - 1):
            self.selected_for_setup("queue_size")
            raise QueueSetupError(
                f"queue_size {value} for queue {self.queue_sel} is not a power of 2 and"
                " VIRTIO_F_RING_PACKED was not negotiated",
                section=sec.S_4_1_4_3_2,
            )
        if packed and value == 0:
            raise QueueSetupError(
                f"queue_size 0 for queue {self.queue_sel} with VIRTIO_F_RING_PACKED",
                section=sec.S_4_1_4_3_2,
            )
        self.write_queue_size(value)

    def _check_queue_config(self, q: _QueueRegs) -> None:
        missing = sorted(set(_QUEUE_ADDRESS) - self.configured[self.queue_sel])
        if missing:
            raise QueueSetupError(
                f"queue {self.queue_sel} enabled before {', '.join(missing)} was written:"
                " the driver must configure the other virtqueue fields before enabling"
                " the virtqueue",
                section=sec.S_4_1_4_3_2,
            )

    def write_queue_reset(self, value: int) -> None:
        super().write_queue_reset(value)
        self.configured[self.queue_sel].clear()

    # -- notifications ----------------------------------------------------------------------------
    def _write_notify(self, rel: int, size: int, value: int) -> None:
        index, off = divmod(rel, NOTIFY_OFF_MULTIPLIER)
        if off or index >= len(self.queues):
            raise PciAccessError(
                f"write at notification area +{rel:#x}, which is no queue's notify address"
                f" (cap.offset + queue_notify_off * {NOTIFY_OFF_MULTIPLIER})",
                section=sec.S_4_1_5_2_1,
            )
        if size != NOTIFY_WIDTH:
            raise PciAccessError(
                f"{size * 8}-bit notification for queue {index}: without"
                " VIRTIO_F_NOTIFICATION_DATA it must be a 16-bit write",
                section=sec.S_4_1_5_2_1,
            )
        if value != index:
            raise PciAccessError(
                f"notification value {value} at queue {index}'s notify address: without"
                " VIRTIO_F_NOTIF_CONFIG_DATA it must be the virtqueue index",
                section=sec.S_4_1_5_2_1,
            )
        self.notify_queue(index)

    def notify_address(self, index: int) -> int:
        """BAR offset of queue ``index``'s Queue Notify address (§4.1.4.4)."""
        return NOTIFY_OFFSET + index * NOTIFY_OFF_MULTIPLIER
