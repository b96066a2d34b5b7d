"""virtio-mmio transport, version 2 (virtio 1.4 §4.2).

Register names follow Linux ``virtio_mmio.h``; the spec's register names are in the
comments.  Linux (and this module) call the Driver Area / Device Area registers
``QUEUE_AVAIL_*`` / ``QUEUE_USED_*``; ``VIRTIO_MMIO_QUEUE_DRIVER_*`` /
``VIRTIO_MMIO_QUEUE_DEVICE_*`` are aliases with the spec's names.

Version notes: QueueReset (0x0c0) exists since 1.2 (VIRTIO_F_RING_RESET); the SHM
registers since 1.2 (shared memory regions); §4.2.5 "Features reserved for future
use" (VIRTIO_F_ADMIN_VQ is not supported over MMIO) since 1.3.
"""

from __future__ import annotations

from virtio.spec._base import Section, SpecIntEnum, SpecIntFlag
from virtio.spec.sections import S_4_2_2, S_4_2_4


class MmioReg(SpecIntEnum):
    """Register offsets from the base of a virtio-mmio device (table in §4.2.2)."""

    VIRTIO_MMIO_MAGIC_VALUE = 0x000, S_4_2_2  # MagicValue, R
    VIRTIO_MMIO_VERSION = 0x004, S_4_2_2  # Version, R
    VIRTIO_MMIO_DEVICE_ID = 0x008, S_4_2_2  # DeviceID, R
    VIRTIO_MMIO_VENDOR_ID = 0x00C, S_4_2_2  # VendorID, R
    VIRTIO_MMIO_DEVICE_FEATURES = 0x010, S_4_2_2  # DeviceFeatures, R
    VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014, S_4_2_2  # DeviceFeaturesSel, W
    VIRTIO_MMIO_DRIVER_FEATURES = 0x020, S_4_2_2  # DriverFeatures, W
    VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024, S_4_2_2  # DriverFeaturesSel, W
    VIRTIO_MMIO_QUEUE_SEL = 0x030, S_4_2_2  # QueueSel, W
    VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034, S_4_2_2  # QueueNumMax, R
    VIRTIO_MMIO_QUEUE_NUM = 0x038, S_4_2_2  # QueueNum, W
    VIRTIO_MMIO_QUEUE_READY = 0x044, S_4_2_2  # QueueReady, RW
    VIRTIO_MMIO_QUEUE_NOTIFY = 0x050, S_4_2_2  # QueueNotify, W
    VIRTIO_MMIO_INTERRUPT_STATUS = 0x060, S_4_2_2  # InterruptStatus, R
    VIRTIO_MMIO_INTERRUPT_ACK = 0x064, S_4_2_2  # InterruptACK, W
    VIRTIO_MMIO_STATUS = 0x070, S_4_2_2  # Status, RW (writing 0 resets)
    VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080, S_4_2_2  # QueueDescLow, W
    VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084, S_4_2_2  # QueueDescHigh, W
    VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090, S_4_2_2  # QueueDriverLow, W
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094, S_4_2_2  # QueueDriverHigh, W
    VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0, S_4_2_2  # QueueDeviceLow, W
    VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4, S_4_2_2  # QueueDeviceHigh, W
    VIRTIO_MMIO_SHM_SEL = 0x0AC, S_4_2_2  # SHMSel, W
    VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0, S_4_2_2  # SHMLenLow, R
    VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4, S_4_2_2  # SHMLenHigh, R
    VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8, S_4_2_2  # SHMBaseLow, R
    VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC, S_4_2_2  # SHMBaseHigh, R
    VIRTIO_MMIO_QUEUE_RESET = 0x0C0, S_4_2_2  # QueueReset, RW
    VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC, S_4_2_2  # ConfigGeneration, R
    VIRTIO_MMIO_CONFIG = 0x100, S_4_2_2  # Config, RW: device-specific config space
    # Aliases with the spec's register names (same values as AVAIL/USED above):
    VIRTIO_MMIO_QUEUE_DRIVER_LOW = 0x090, S_4_2_2
    VIRTIO_MMIO_QUEUE_DRIVER_HIGH = 0x094, S_4_2_2
    VIRTIO_MMIO_QUEUE_DEVICE_LOW = 0x0A0, S_4_2_2
    VIRTIO_MMIO_QUEUE_DEVICE_HIGH = 0x0A4, S_4_2_2


class MmioLegacyReg(SpecIntEnum):
    """Registers only in the legacy (version 1) layout (§4.2.4)."""

    VIRTIO_MMIO_GUEST_PAGE_SIZE = 0x028, S_4_2_4  # GuestPageSize, W
    VIRTIO_MMIO_QUEUE_ALIGN = 0x03C, S_4_2_4  # QueueAlign, W
    VIRTIO_MMIO_QUEUE_PFN = 0x040, S_4_2_4  # QueuePFN, RW


class MmioInterrupt(SpecIntFlag):
    """Bits of InterruptStatus / InterruptACK (§4.2.2)."""

    VIRTIO_MMIO_INT_VRING = 1 << 0, S_4_2_2  # Used Buffer Notification
    VIRTIO_MMIO_INT_CONFIG = 1 << 1, S_4_2_2  # Configuration Change Notification


VIRTIO_MMIO_MAGIC = 0x74726976
"""``MagicValue``: "virt" read as a little-endian 32-bit value."""
VIRTIO_MMIO_VERSION_MODERN = 2
VIRTIO_MMIO_VERSION_LEGACY = 1
VIRTIO_MMIO_REGION_SIZE = 0x200
"""Register block size used by the spec's device-tree example (``reg = <0x1e000
0x200>``, §4.2.1); the config space may need more for some devices."""

CONSTANTS: dict[str, tuple[int, Section]] = {
    "VIRTIO_MMIO_MAGIC": (VIRTIO_MMIO_MAGIC, S_4_2_2),
    "VIRTIO_MMIO_VERSION_MODERN": (VIRTIO_MMIO_VERSION_MODERN, S_4_2_2),
    "VIRTIO_MMIO_VERSION_LEGACY": (VIRTIO_MMIO_VERSION_LEGACY, S_4_2_4),
}
ENUMS = (MmioReg, MmioLegacyReg, MmioInterrupt)
LEGACY = frozenset(m.name for m in MmioLegacyReg) | {"VIRTIO_MMIO_VERSION_LEGACY"}
NOT_IN_1_2: frozenset[str] = frozenset()
STRUCTS: dict = {}
STRUCT_SECTIONS: dict = {}
