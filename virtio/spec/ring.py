"""Virtqueue layouts: split (§2.7) and packed (§2.8) rings."""

from __future__ import annotations

from construct import Int16ul, Int32ul, Int64ul, Struct

from virtio.spec._base import SpecIntEnum, SpecIntFlag
from virtio.spec.sections import S_2_6, S_2_7, S_2_7_5, S_2_7_5_3, S_2_7_6, S_2_7_7, S_2_7_8
from virtio.spec.sections import S_2_8, S_2_8_13, S_2_8_14


class VringDescFlag(SpecIntFlag):
    """``struct virtq_desc.flags`` (split ring)."""

    VRING_DESC_F_NEXT = 1, S_2_7_5
    VRING_DESC_F_WRITE = 2, S_2_7_5
    VRING_DESC_F_INDIRECT = 4, S_2_7_5_3


class VringAvailFlag(SpecIntFlag):
    VRING_AVAIL_F_NO_INTERRUPT = 1, S_2_7_6


class VringUsedFlag(SpecIntFlag):
    VRING_USED_F_NO_NOTIFY = 1, S_2_7_8


class PackedDescFlag(SpecIntFlag):
    VRING_PACKED_DESC_F_NEXT = 1, S_2_8_13
    VRING_PACKED_DESC_F_WRITE = 2, S_2_8_13
    VRING_PACKED_DESC_F_INDIRECT = 4, S_2_8_13
    VRING_PACKED_DESC_F_AVAIL = 1 << 7, S_2_8
    VRING_PACKED_DESC_F_USED = 1 << 15, S_2_8


class PackedEventFlag(SpecIntEnum):
    VRING_PACKED_EVENT_FLAG_ENABLE = 0, S_2_8_14
    VRING_PACKED_EVENT_FLAG_DISABLE = 1, S_2_8_14
    VRING_PACKED_EVENT_FLAG_DESC = 2, S_2_8_14


VRING_PACKED_EVENT_F_WRAP_CTR = 15
VIRTQUEUE_MAX_SIZE_SPLIT = 32768
VIRTQUEUE_MAX_SIZE_PACKED = 32768

VRING_DESC_ALIGN = 16
VRING_AVAIL_ALIGN = 2
VRING_USED_ALIGN = 4
VRING_PACKED_DESC_ALIGN = 16
VRING_PACKED_EVENT_ALIGN = 4

vring_desc = Struct("addr" / Int64ul, "len" / Int32ul, "flags" / Int16ul, "next" / Int16ul)
vring_used_elem = Struct("id" / Int32ul, "len" / Int32ul)
vring_packed_desc = Struct("addr" / Int64ul, "len" / Int32ul, "id" / Int16ul, "flags" / Int16ul)
vring_packed_desc_event = Struct("off_wrap" / Int16ul, "flags" / Int16ul)

VRING_DESC_SIZE = 16
VRING_USED_ELEM_SIZE = 8
VRING_PACKED_DESC_SIZE = 16
VRING_PACKED_DESC_EVENT_SIZE = 4


def split_ring_sizes(queue_size: int, event_idx: bool) -> tuple[int, int, int]:
    """Byte sizes of (descriptor table, available ring, used ring) of a split queue (§2.7)."""
    extra = 2 if event_idx else 0
    return (
        VRING_DESC_SIZE * queue_size,
        4 + 2 * queue_size + extra,
        4 + VRING_USED_ELEM_SIZE * queue_size + extra,
    )


_ = (S_2_6, S_2_7, S_2_7_7)
