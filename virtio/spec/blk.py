"""Block device (virtio 1.4 §5.2).

Names follow the spec / Linux ``virtio_blk.h``.  Field names follow the spec; Linux
differs for ``writeback`` (``wce``), ``unused0`` (``unused``), ``virtio_blk_outhdr.reserved``
(``ioprio``, its legacy name) and flattens ``topology``.

Version notes (1.2 vs 1.4):

* Zoned block devices (VIRTIO_BLK_F_ZONED, the VIRTIO_BLK_T_ZONE_* requests,
  VIRTIO_BLK_S_ZONE_* statuses, ``virtio_blk_config.zoned``) were added in 1.3; a 1.2
  ``virtio_blk_config`` ends after ``secure_erase_sector_alignment`` (72 bytes).
* VIRTIO_BLK_F_SECURE_ERASE / VIRTIO_BLK_T_SECURE_ERASE and VIRTIO_BLK_F_LIFETIME /
  VIRTIO_BLK_T_GET_LIFETIME are in 1.2 already (as far as we know; not re-checked
  against the 1.2 PDF).
"""

from __future__ import annotations

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from virtio.spec._base import FeatureBit, Section, SpecIntEnum, SpecIntFlag
from virtio.spec.sections import (
    S_5_2_3,
    S_5_2_3_1,
    S_5_2_4,
    S_5_2_6,
    S_5_2_6_1,
    S_5_2_6_3,
)


class BlkFeature(FeatureBit):
    VIRTIO_BLK_F_SIZE_MAX = 1, S_5_2_3
    VIRTIO_BLK_F_SEG_MAX = 2, S_5_2_3
    VIRTIO_BLK_F_GEOMETRY = 4, S_5_2_3
    VIRTIO_BLK_F_RO = 5, S_5_2_3
    VIRTIO_BLK_F_BLK_SIZE = 6, S_5_2_3
    VIRTIO_BLK_F_FLUSH = 9, S_5_2_3  # legacy name VIRTIO_BLK_F_WCE
    VIRTIO_BLK_F_TOPOLOGY = 10, S_5_2_3
    VIRTIO_BLK_F_CONFIG_WCE = 11, S_5_2_3
    VIRTIO_BLK_F_MQ = 12, S_5_2_3
    VIRTIO_BLK_F_DISCARD = 13, S_5_2_3
    VIRTIO_BLK_F_WRITE_ZEROES = 14, S_5_2_3
    VIRTIO_BLK_F_LIFETIME = 15, S_5_2_3
    VIRTIO_BLK_F_SECURE_ERASE = 16, S_5_2_3
    VIRTIO_BLK_F_ZONED = 17, S_5_2_3  # 1.3+
    # Legacy interface only (§5.2.3.1):
    VIRTIO_BLK_F_BARRIER = 0, S_5_2_3_1
    VIRTIO_BLK_F_SCSI = 7, S_5_2_3_1


class BlkReqType(SpecIntEnum):
    """``virtio_blk_req.type`` (§5.2.6)."""

    VIRTIO_BLK_T_IN = 0, S_5_2_6
    VIRTIO_BLK_T_OUT = 1, S_5_2_6
    VIRTIO_BLK_T_FLUSH = 4, S_5_2_6
    VIRTIO_BLK_T_GET_ID = 8, S_5_2_6
    VIRTIO_BLK_T_GET_LIFETIME = 10, S_5_2_6
    VIRTIO_BLK_T_DISCARD = 11, S_5_2_6
    VIRTIO_BLK_T_WRITE_ZEROES = 13, S_5_2_6
    VIRTIO_BLK_T_SECURE_ERASE = 14, S_5_2_6
    # Zoned block devices (1.3+), only with VIRTIO_BLK_F_ZONED:
    VIRTIO_BLK_T_ZONE_APPEND = 15, S_5_2_6
    VIRTIO_BLK_T_ZONE_REPORT = 16, S_5_2_6
    VIRTIO_BLK_T_ZONE_OPEN = 18, S_5_2_6
    VIRTIO_BLK_T_ZONE_CLOSE = 20, S_5_2_6
    VIRTIO_BLK_T_ZONE_FINISH = 22, S_5_2_6
    VIRTIO_BLK_T_ZONE_RESET = 24, S_5_2_6
    VIRTIO_BLK_T_ZONE_RESET_ALL = 26, S_5_2_6
    # Legacy interface only (§5.2.6.3):
    VIRTIO_BLK_T_SCSI_CMD = 2, S_5_2_6_3
    VIRTIO_BLK_T_SCSI_CMD_OUT = 3, S_5_2_6_3
    VIRTIO_BLK_T_FLUSH_OUT = 5, S_5_2_6_3


class BlkStatus(SpecIntEnum):
    """The final ``status`` byte of a request (§5.2.6)."""

    VIRTIO_BLK_S_OK = 0, S_5_2_6
    VIRTIO_BLK_S_IOERR = 1, S_5_2_6
    VIRTIO_BLK_S_UNSUPP = 2, S_5_2_6
    # Zoned block devices (1.3+):
    VIRTIO_BLK_S_ZONE_INVALID_CMD = 3, S_5_2_6
    VIRTIO_BLK_S_ZONE_UNALIGNED_WP = 4, S_5_2_6
    VIRTIO_BLK_S_ZONE_OPEN_RESOURCE = 5, S_5_2_6
    VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE = 6, S_5_2_6


class BlkZonedModel(SpecIntEnum):
    """``virtio_blk_config.zoned.model`` (§5.2.4)."""

    VIRTIO_BLK_Z_NONE = 0, S_5_2_4
    VIRTIO_BLK_Z_HM = 1, S_5_2_4
    VIRTIO_BLK_Z_HA = 2, S_5_2_4


class BlkZoneType(SpecIntEnum):
    """``virtio_blk_zone_descriptor.z_type`` (§5.2.6)."""

    VIRTIO_BLK_ZT_CONV = 1, S_5_2_6
    VIRTIO_BLK_ZT_SWR = 2, S_5_2_6
    VIRTIO_BLK_ZT_SWP = 3, S_5_2_6


class BlkZoneState(SpecIntEnum):
    """``virtio_blk_zone_descriptor.z_state`` (§5.2.6)."""

    VIRTIO_BLK_ZS_NOT_WP = 0, S_5_2_6
    VIRTIO_BLK_ZS_EMPTY = 1, S_5_2_6
    VIRTIO_BLK_ZS_IOPEN = 2, S_5_2_6
    VIRTIO_BLK_ZS_EOPEN = 3, S_5_2_6
    VIRTIO_BLK_ZS_CLOSED = 4, S_5_2_6
    VIRTIO_BLK_ZS_RDONLY = 13, S_5_2_6
    VIRTIO_BLK_ZS_FULL = 14, S_5_2_6
    VIRTIO_BLK_ZS_OFFLINE = 15, S_5_2_6


class BlkPreEolInfo(SpecIntEnum):
    """``virtio_blk_lifetime.pre_eol_info`` (§5.2.6); other values are reserved."""

    VIRTIO_BLK_PRE_EOL_INFO_UNDEFINED = 0, S_5_2_6
    VIRTIO_BLK_PRE_EOL_INFO_NORMAL = 1, S_5_2_6
    VIRTIO_BLK_PRE_EOL_INFO_WARNING = 2, S_5_2_6
    VIRTIO_BLK_PRE_EOL_INFO_URGENT = 3, S_5_2_6


class BlkDiscardFlag(SpecIntFlag):
    """``virtio_blk_discard_write_zeroes.flags`` (spec: ``le32 unmap:1; reserved:31``).
    ``unmap`` MUST be zero for discard commands (§5.2.6.1)."""

    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1, S_5_2_6


VIRTIO_BLK_ID_BYTES = 20
"""Length of the GET_ID data: a NUL-padded ASCII string up to 20 bytes (§5.2.6)."""
VIRTIO_BLK_SECTOR_SIZE = 512
"""The protocol's sector unit, whatever ``blk_size`` says (§5.2.4, §5.2.5)."""
VIRTIO_BLK_T_BARRIER = 0x80000000
"""Legacy: high bit of ``type`` marks a barrier request (§5.2.6.3)."""

virtio_blk_geometry = Struct(
    "cylinders" / Int16ul,
    "heads" / Int8ul,
    "sectors" / Int8ul,
)
virtio_blk_topology = Struct(
    "physical_block_exp" / Int8ul,  # # of logical blocks per physical block (log2)
    "alignment_offset" / Int8ul,  # offset of first aligned logical block
    "min_io_size" / Int16ul,  # suggested minimum I/O size in blocks
    "opt_io_size" / Int32ul,  # optimal (suggested maximum) I/O size in blocks
)
virtio_blk_zoned_characteristics = Struct(
    "zone_sectors" / Int32ul,
    "max_open_zones" / Int32ul,
    "max_active_zones" / Int32ul,
    "max_append_sectors" / Int32ul,
    "write_granularity" / Int32ul,
    "model" / Int8ul,
    "unused2" / Bytes(3),
)
virtio_blk_config = Struct(
    "capacity" / Int64ul,  # in 512-byte sectors, always present
    "size_max" / Int32ul,  # VIRTIO_BLK_F_SIZE_MAX
    "seg_max" / Int32ul,  # VIRTIO_BLK_F_SEG_MAX
    "geometry" / virtio_blk_geometry,  # VIRTIO_BLK_F_GEOMETRY
    "blk_size" / Int32ul,  # VIRTIO_BLK_F_BLK_SIZE
    "topology" / virtio_blk_topology,  # VIRTIO_BLK_F_TOPOLOGY
    "writeback" / Int8ul,  # VIRTIO_BLK_F_CONFIG_WCE
    "unused0" / Int8ul,
    "num_queues" / Int16ul,  # VIRTIO_BLK_F_MQ (the spec writes "u16"; it is le16)
    "max_discard_sectors" / Int32ul,  # VIRTIO_BLK_F_DISCARD
    "max_discard_seg" / Int32ul,
    "discard_sector_alignment" / Int32ul,
    "max_write_zeroes_sectors" / Int32ul,  # VIRTIO_BLK_F_WRITE_ZEROES
    "max_write_zeroes_seg" / Int32ul,
    "write_zeroes_may_unmap" / Int8ul,
    "unused1" / Bytes(3),
    "max_secure_erase_sectors" / Int32ul,  # VIRTIO_BLK_F_SECURE_ERASE
    "max_secure_erase_seg" / Int32ul,
    "secure_erase_sector_alignment" / Int32ul,
    "zoned" / virtio_blk_zoned_characteristics,  # VIRTIO_BLK_F_ZONED (1.3+)
)
"""``struct virtio_blk_config`` (§5.2.4)."""

virtio_blk_outhdr = Struct(
    "type" / Int32ul,
    "reserved" / Int32ul,  # legacy: ioprio
    "sector" / Int64ul,
)
"""The device-readable header of ``struct virtio_blk_req`` (§5.2.6): type, reserved,
sector; followed by ``data[]`` and the device-writable ``u8 status``."""

virtio_blk_discard_write_zeroes = Struct(
    "sector" / Int64ul,
    "num_sectors" / Int32ul,
    "flags" / Int32ul,  # BlkDiscardFlag
)
"""One segment of DISCARD / WRITE_ZEROES / SECURE_ERASE data (§5.2.6)."""

virtio_blk_lifetime = Struct(
    "pre_eol_info" / Int16ul,
    "device_lifetime_est_typ_a" / Int16ul,
    "device_lifetime_est_typ_b" / Int16ul,
)
"""Data of VIRTIO_BLK_T_GET_LIFETIME (§5.2.6)."""

virtio_blk_zone_descriptor = Struct(
    "z_cap" / Int64ul,
    "z_start" / Int64ul,
    "z_wp" / Int64ul,
    "z_type" / Int8ul,
    "z_state" / Int8ul,
    "reserved" / Bytes(38),
)
virtio_blk_zone_report = Struct(
    "nr_zones" / Int64ul,
    "reserved" / Bytes(56),
)
"""Header of a VIRTIO_BLK_T_ZONE_REPORT reply, followed by zone descriptors (§5.2.6)."""

STRUCTS: dict[str, Struct] = {
    "virtio_blk_config": virtio_blk_config,
    "virtio_blk_geometry": virtio_blk_geometry,
    "virtio_blk_topology": virtio_blk_topology,
    "virtio_blk_zoned_characteristics": virtio_blk_zoned_characteristics,
    "virtio_blk_outhdr": virtio_blk_outhdr,
    "virtio_blk_discard_write_zeroes": virtio_blk_discard_write_zeroes,
    "virtio_blk_lifetime": virtio_blk_lifetime,
    "virtio_blk_zone_descriptor": virtio_blk_zone_descriptor,
    "virtio_blk_zone_report": virtio_blk_zone_report,
}
STRUCT_SECTIONS: dict[str, Section] = {
    "virtio_blk_config": S_5_2_4,
    "virtio_blk_geometry": S_5_2_4,
    "virtio_blk_topology": S_5_2_4,
    "virtio_blk_zoned_characteristics": S_5_2_4,
    "virtio_blk_outhdr": S_5_2_6,
    "virtio_blk_discard_write_zeroes": S_5_2_6,
    "virtio_blk_lifetime": S_5_2_6,
    "virtio_blk_zone_descriptor": S_5_2_6,
    "virtio_blk_zone_report": S_5_2_6,
}
CONSTANTS: dict[str, tuple[int, Section]] = {
    "VIRTIO_BLK_ID_BYTES": (VIRTIO_BLK_ID_BYTES, S_5_2_6_1),
    "VIRTIO_BLK_SECTOR_SIZE": (VIRTIO_BLK_SECTOR_SIZE, S_5_2_4),
    "VIRTIO_BLK_T_BARRIER": (VIRTIO_BLK_T_BARRIER, S_5_2_6_3),
}
ENUMS = (
    BlkFeature,
    BlkReqType,
    BlkStatus,
    BlkZonedModel,
    BlkZoneType,
    BlkZoneState,
    BlkPreEolInfo,
    BlkDiscardFlag,
)
LEGACY = frozenset(
    {
        "VIRTIO_BLK_F_BARRIER",
        "VIRTIO_BLK_F_SCSI",
        "VIRTIO_BLK_T_SCSI_CMD",
        "VIRTIO_BLK_T_SCSI_CMD_OUT",
        "VIRTIO_BLK_T_FLUSH_OUT",
        "VIRTIO_BLK_T_BARRIER",
    }
)
NOT_IN_1_2 = frozenset(
    {
        "VIRTIO_BLK_F_ZONED",
        *(m.name for m in BlkReqType if m.name.startswith("VIRTIO_BLK_T_ZONE_")),
        *(m.name for m in BlkStatus if m.name.startswith("VIRTIO_BLK_S_ZONE_")),
        *(m.name for m in BlkZonedModel),
        *(m.name for m in BlkZoneType),
        *(m.name for m in BlkZoneState),
        "virtio_blk_zoned_characteristics",
        "virtio_blk_zone_descriptor",
        "virtio_blk_zone_report",
    }
)
