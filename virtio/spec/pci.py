"""Virtio over PCI: IDs, capability types and structure layouts (virtio 1.4 §4.1).

Names follow Linux ``virtio_pci.h`` / ``virtio_ids.h``; field names follow the spec
(Linux calls ``driver_feature*`` ``guest_feature*``, ``config_msix_vector``
``msix_config`` and splits each le64 queue address into ``_lo``/``_hi`` halves).

Version notes (1.2 vs 1.4): ``queue_notify_data`` (VIRTIO_F_NOTIF_CONFIG_DATA) and
``queue_reset`` (VIRTIO_F_RING_RESET) end the 1.2 common configuration; 1.3 added
``admin_queue_index``/``admin_queue_num`` (VIRTIO_F_ADMIN_VQ) and the vendor data
capability (VIRTIO_PCI_CAP_VENDOR_CFG, §4.1.4.8), which renumbered the PCI
configuration access capability from 4.1.4.8 to 4.1.4.9.
"""

from __future__ import annotations

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from virtio.spec._base import Section, SpecIntEnum, SpecIntFlag
from virtio.spec.sections import (
    S_4_1_2,
    S_4_1_2_1,
    S_4_1_4,
    S_4_1_4_3,
    S_4_1_4_4,
    S_4_1_4_5,
    S_4_1_4_8,
    S_4_1_4_9,
    S_4_1_4_10,
    S_4_1_5_1_2,
)


class PciCapType(SpecIntEnum):
    """``virtio_pci_cap.cfg_type`` (§4.1.4); other values are reserved."""

    VIRTIO_PCI_CAP_COMMON_CFG = 1, S_4_1_4
    VIRTIO_PCI_CAP_NOTIFY_CFG = 2, S_4_1_4
    VIRTIO_PCI_CAP_ISR_CFG = 3, S_4_1_4
    VIRTIO_PCI_CAP_DEVICE_CFG = 4, S_4_1_4
    VIRTIO_PCI_CAP_PCI_CFG = 5, S_4_1_4
    VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8, S_4_1_4
    VIRTIO_PCI_CAP_VENDOR_CFG = 9, S_4_1_4  # 1.3+


class PciCapOffset(SpecIntEnum):
    """Byte offsets of the ``virtio_pci_cap`` / ``virtio_pci_notify_cap`` fields."""

    VIRTIO_PCI_CAP_VNDR = 0, S_4_1_4
    VIRTIO_PCI_CAP_NEXT = 1, S_4_1_4
    VIRTIO_PCI_CAP_LEN = 2, S_4_1_4
    VIRTIO_PCI_CAP_CFG_TYPE = 3, S_4_1_4
    VIRTIO_PCI_CAP_BAR = 4, S_4_1_4
    VIRTIO_PCI_CAP_OFFSET = 8, S_4_1_4
    VIRTIO_PCI_CAP_LENGTH = 12, S_4_1_4
    VIRTIO_PCI_NOTIFY_CAP_MULT = 16, S_4_1_4_4


class PciCommonCfg(SpecIntEnum):
    """Byte offsets of the ``virtio_pci_common_cfg`` fields (§4.1.4.3)."""

    VIRTIO_PCI_COMMON_DFSELECT = 0, S_4_1_4_3
    VIRTIO_PCI_COMMON_DF = 4, S_4_1_4_3
    VIRTIO_PCI_COMMON_GFSELECT = 8, S_4_1_4_3
    VIRTIO_PCI_COMMON_GF = 12, S_4_1_4_3
    VIRTIO_PCI_COMMON_MSIX = 16, S_4_1_4_3
    VIRTIO_PCI_COMMON_NUMQ = 18, S_4_1_4_3
    VIRTIO_PCI_COMMON_STATUS = 20, S_4_1_4_3
    VIRTIO_PCI_COMMON_CFGGENERATION = 21, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_SELECT = 22, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_SIZE = 24, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_MSIX = 26, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_ENABLE = 28, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_NOFF = 30, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_DESCLO = 32, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_DESCHI = 36, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_AVAILLO = 40, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_AVAILHI = 44, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_USEDLO = 48, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_USEDHI = 52, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_NDATA = 56, S_4_1_4_3
    VIRTIO_PCI_COMMON_Q_RESET = 58, S_4_1_4_3
    VIRTIO_PCI_COMMON_ADM_Q_IDX = 60, S_4_1_4_3  # 1.3+
    VIRTIO_PCI_COMMON_ADM_Q_NUM = 62, S_4_1_4_3  # 1.3+


class PciIsr(SpecIntFlag):
    """Bits of the ISR status byte (§4.1.4.5); reading it clears it."""

    VIRTIO_PCI_ISR_QUEUE = 0x1, S_4_1_4_5  # Queue Interrupt
    VIRTIO_PCI_ISR_CONFIG = 0x2, S_4_1_4_5  # Device Configuration Interrupt


class PciTransitionalId(SpecIntEnum):
    """Transitional PCI Device IDs (§4.1.2.1); Linux ``VIRTIO_TRANS_ID_*``."""

    VIRTIO_TRANS_ID_NET = 0x1000, S_4_1_2_1
    VIRTIO_TRANS_ID_BLOCK = 0x1001, S_4_1_2_1
    VIRTIO_TRANS_ID_BALLOON = 0x1002, S_4_1_2_1
    VIRTIO_TRANS_ID_CONSOLE = 0x1003, S_4_1_2_1
    VIRTIO_TRANS_ID_SCSI = 0x1004, S_4_1_2_1
    VIRTIO_TRANS_ID_RNG = 0x1005, S_4_1_2_1
    VIRTIO_TRANS_ID_9P = 0x1009, S_4_1_2_1


class PciLegacyReg(SpecIntEnum):
    """Legacy (I/O BAR0) register offsets (§4.1.4.10); the device-specific
    configuration follows at 20, or at 24 with MSI-X enabled."""

    VIRTIO_PCI_HOST_FEATURES = 0, S_4_1_4_10
    VIRTIO_PCI_GUEST_FEATURES = 4, S_4_1_4_10
    VIRTIO_PCI_QUEUE_PFN = 8, S_4_1_4_10
    VIRTIO_PCI_QUEUE_NUM = 12, S_4_1_4_10
    VIRTIO_PCI_QUEUE_SEL = 14, S_4_1_4_10
    VIRTIO_PCI_QUEUE_NOTIFY = 16, S_4_1_4_10
    VIRTIO_PCI_STATUS = 18, S_4_1_4_10
    VIRTIO_PCI_ISR = 19, S_4_1_4_10
    VIRTIO_MSI_CONFIG_VECTOR = 20, S_4_1_4_10
    VIRTIO_MSI_QUEUE_VECTOR = 22, S_4_1_4_10


VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
"""Modern PCI Device ID = 0x1040 + Virtio Device ID (§4.1.2)."""
VIRTIO_MSI_NO_VECTOR = 0xFFFF
"""Vector value that unmaps an event (§4.1.5.1.2)."""

virtio_pci_cap = Struct(
    "cap_vndr" / Int8ul,  # 0x09: vendor-specific capability
    "cap_next" / Int8ul,
    "cap_len" / Int8ul,
    "cfg_type" / Int8ul,  # PciCapType
    "bar" / Int8ul,
    "id" / Int8ul,
    "padding" / Bytes(2),
    "offset" / Int32ul,
    "length" / Int32ul,
)
virtio_pci_cap64 = Struct(
    "cap" / virtio_pci_cap,
    "offset_hi" / Int32ul,
    "length_hi" / Int32ul,
)
virtio_pci_notify_cap = Struct(
    "cap" / virtio_pci_cap,
    "notify_off_multiplier" / Int32ul,
)
virtio_pci_cfg_cap = Struct(
    "cap" / virtio_pci_cap,
    "pci_cfg_data" / Bytes(4),
)
virtio_pci_vndr_data = Struct(
    "cap_vndr" / Int8ul,
    "cap_next" / Int8ul,
    "cap_len" / Int8ul,
    "cfg_type" / Int8ul,
    "vendor_id" / Int16ul,
)
"""Head of the vendor data capability (§4.1.4.8, 1.3+)."""
virtio_pci_common_cfg = Struct(
    "device_feature_select" / Int32ul,
    "device_feature" / Int32ul,
    "driver_feature_select" / Int32ul,
    "driver_feature" / Int32ul,
    "config_msix_vector" / Int16ul,
    "num_queues" / Int16ul,
    "device_status" / Int8ul,
    "config_generation" / Int8ul,
    "queue_select" / Int16ul,
    "queue_size" / Int16ul,
    "queue_msix_vector" / Int16ul,
    "queue_enable" / Int16ul,
    "queue_notify_off" / Int16ul,
    "queue_desc" / Int64ul,
    "queue_driver" / Int64ul,
    "queue_device" / Int64ul,
    "queue_notify_data" / Int16ul,  # VIRTIO_F_NOTIF_CONFIG_DATA
    "queue_reset" / Int16ul,  # VIRTIO_F_RING_RESET
    "admin_queue_index" / Int16ul,  # VIRTIO_F_ADMIN_VQ (1.3+)
    "admin_queue_num" / Int16ul,  # VIRTIO_F_ADMIN_VQ (1.3+)
)
"""``struct virtio_pci_common_cfg`` (§4.1.4.3)."""

STRUCTS: dict[str, Struct] = {
    "virtio_pci_cap": virtio_pci_cap,
    "virtio_pci_cap64": virtio_pci_cap64,
    "virtio_pci_notify_cap": virtio_pci_notify_cap,
    "virtio_pci_cfg_cap": virtio_pci_cfg_cap,
    "virtio_pci_vndr_data": virtio_pci_vndr_data,
    "virtio_pci_common_cfg": virtio_pci_common_cfg,
}
STRUCT_SECTIONS: dict[str, Section] = {
    "virtio_pci_cap": S_4_1_4,
    "virtio_pci_cap64": S_4_1_4,
    "virtio_pci_notify_cap": S_4_1_4_4,
    "virtio_pci_cfg_cap": S_4_1_4_9,
    "virtio_pci_vndr_data": S_4_1_4_8,
    "virtio_pci_common_cfg": S_4_1_4_3,
}
CONSTANTS: dict[str, tuple[int, Section]] = {
    "VIRTIO_PCI_VENDOR_ID": (VIRTIO_PCI_VENDOR_ID, S_4_1_2),
    "VIRTIO_PCI_DEVICE_ID_BASE": (VIRTIO_PCI_DEVICE_ID_BASE, S_4_1_2),
    "VIRTIO_MSI_NO_VECTOR": (VIRTIO_MSI_NO_VECTOR, S_4_1_5_1_2),
}
ENUMS = (PciCapType, PciCapOffset, PciCommonCfg, PciIsr, PciTransitionalId, PciLegacyReg)
LEGACY = frozenset(m.name for m in PciLegacyReg)
NOT_IN_1_2 = frozenset(
    {
        "VIRTIO_PCI_CAP_VENDOR_CFG",
        "VIRTIO_PCI_COMMON_ADM_Q_IDX",
        "VIRTIO_PCI_COMMON_ADM_Q_NUM",
        "virtio_pci_vndr_data",
        "virtio_pci_common_cfg.admin_queue_index",
        "virtio_pci_common_cfg.admin_queue_num",
    }
)


def pci_device_id(device_id: int) -> int:
    """The modern PCI Device ID of a virtio device type (§4.1.2)."""
    return VIRTIO_PCI_DEVICE_ID_BASE + device_id
