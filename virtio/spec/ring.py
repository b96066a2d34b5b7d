"""Virtqueue memory layouts: split (virtio 1.4 §2.7) and packed (§2.8) rings.

Names follow Linux ``include/uapi/linux/virtio_ring.h`` (the spec's own names are
``VIRTQ_*``/``virtq_*``; §2.7.5 notes the ``VRING_*``/``vring_*`` names are the legacy
ones with identical layout and values).

One deliberate difference from the Linux header: ``PackedDescFlag`` members are flag
*masks* (``VRING_PACKED_DESC_F_AVAIL == 1 << 7``, as the spec's ``VIRTQ_DESC_F_AVAIL``),
whereas Linux defines ``VRING_PACKED_DESC_F_AVAIL``/``_USED`` as the bit *numbers* 7/15.

Version note: these layouts are unchanged since 1.1 (packed rings appeared in 1.1);
in 1.1 the split/packed sections were numbered 2.6/2.7, since 1.2 they are 2.7/2.8.
"""

from __future__ import annotations

from construct import Int16ul, Int32ul, Int64ul, Struct

from virtio.spec._base import Section, SpecIntEnum, SpecIntFlag
from virtio.spec.sections import (
    S_2_7,
    S_2_7_5,
    S_2_7_5_3,
    S_2_7_6,
    S_2_7_8,
    S_2_8,
    S_2_8_1,
    S_2_8_3,
    S_2_8_6,
    S_2_8_7,
    S_2_8_10,
    S_2_8_10_1,
    S_2_8_13,
    S_2_8_14,
)


class VringDescFlag(SpecIntFlag):
    """``struct virtq_desc.flags`` of a split ring (§2.7.5)."""

    VRING_DESC_F_NEXT = 1, S_2_7_5
    VRING_DESC_F_WRITE = 2, S_2_7_5
    VRING_DESC_F_INDIRECT = 4, S_2_7_5_3


class VringAvailFlag(SpecIntFlag):
    """``struct virtq_avail.flags`` (§2.7.6); used-buffer notification suppression §2.7.7."""

    VRING_AVAIL_F_NO_INTERRUPT = 1, S_2_7_6


class VringUsedFlag(SpecIntFlag):
    """``struct virtq_used.flags`` (§2.7.8); available-buffer notification suppression
    §2.7.10."""

    VRING_USED_F_NO_NOTIFY = 1, S_2_7_8


class PackedDescFlag(SpecIntFlag):
    """``struct pvirtq_desc.flags`` (§2.8), as masks."""

    VRING_PACKED_DESC_F_NEXT = 1, S_2_8_6
    VRING_PACKED_DESC_F_WRITE = 2, S_2_8_3
    VRING_PACKED_DESC_F_INDIRECT = 4, S_2_8_7
    VRING_PACKED_DESC_F_AVAIL = 1 << 7, S_2_8_1
    VRING_PACKED_DESC_F_USED = 1 << 15, S_2_8_1


class PackedEventFlag(SpecIntEnum):
    """Descriptor Ring Change Event Flags of ``struct pvirtq_event_suppress`` (§2.8.10,
    layout §2.8.14).  The value 3 is reserved."""

    VRING_PACKED_EVENT_FLAG_ENABLE = 0, S_2_8_10
    VRING_PACKED_EVENT_FLAG_DISABLE = 1, S_2_8_10
    VRING_PACKED_EVENT_FLAG_DESC = 2, S_2_8_10


VRING_PACKED_EVENT_F_WRAP_CTR = 15
"""Bit of ``off_wrap`` holding the Descriptor Ring Change Event Wrap Counter (§2.8.14)."""

VIRTQUEUE_MAX_SIZE_SPLIT = 32768
"""Largest split Queue Size; always a power of 2 (§2.7)."""
VIRTQUEUE_MAX_SIZE_PACKED = 32768
"""Packed virtqueues support up to 2**15 entries (§2.8); need not be a power of 2."""

# Minimum alignments, in bytes, of the three parts of a split virtqueue: the
# "Alignment" column of the table at the top of §2.7.
VRING_DESC_ALIGN = 16
VRING_AVAIL_ALIGN = 2
VRING_USED_ALIGN = 4
# Packed: table in §2.8.10.1 Structure Size and Alignment.
VRING_PACKED_DESC_ALIGN = 16
VRING_PACKED_EVENT_ALIGN = 4

vring_desc = Struct(
    "addr" / Int64ul,
    "len" / Int32ul,
    "flags" / Int16ul,
    "next" / Int16ul,
)
"""``struct virtq_desc`` (§2.7.5)."""

vring_avail = Struct("flags" / Int16ul, "idx" / Int16ul)
"""Fixed head of ``struct virtq_avail`` (§2.7.6); followed by ``le16 ring[Queue Size]``
and, with VIRTIO_F_EVENT_IDX, ``le16 used_event``."""

vring_used_elem = Struct("id" / Int32ul, "len" / Int32ul)
"""``struct virtq_used_elem`` (§2.7.8)."""

vring_used = Struct("flags" / Int16ul, "idx" / Int16ul)
"""Fixed head of ``struct virtq_used`` (§2.7.8); followed by ``struct virtq_used_elem
ring[Queue Size]`` and, with VIRTIO_F_EVENT_IDX, ``le16 avail_event``."""

vring_packed_desc = Struct(
    "addr" / Int64ul,
    "len" / Int32ul,
    "id" / Int16ul,
    "flags" / Int16ul,
)
"""``struct pvirtq_desc`` (§2.8.13)."""

vring_packed_desc_event = Struct("off_wrap" / Int16ul, "flags" / Int16ul)
"""``struct pvirtq_event_suppress`` (§2.8.14): ``off_wrap`` = desc_event_off:15 |
desc_event_wrap:1; ``flags`` = desc_event_flags:2 | reserved:14."""

VRING_DESC_SIZE = vring_desc.sizeof()  # 16
VRING_AVAIL_HDR_SIZE = vring_avail.sizeof()  # 4
VRING_USED_HDR_SIZE = vring_used.sizeof()  # 4
VRING_USED_ELEM_SIZE = vring_used_elem.sizeof()  # 8
VRING_PACKED_DESC_SIZE = vring_packed_desc.sizeof()  # 16
VRING_PACKED_DESC_EVENT_SIZE = vring_packed_desc_event.sizeof()  # 4

STRUCTS: dict[str, Struct] = {
    "vring_desc": vring_desc,
    "vring_avail": vring_avail,
    "vring_used_elem": vring_used_elem,
    "vring_used": vring_used,
    "vring_packed_desc": vring_packed_desc,
    "vring_packed_desc_event": vring_packed_desc_event,
}
STRUCT_SECTIONS: dict[str, Section] = {
    "vring_desc": S_2_7_5,
    "vring_avail": S_2_7_6,
    "vring_used_elem": S_2_7_8,
    "vring_used": S_2_7_8,
    "vring_packed_desc": S_2_8_13,
    "vring_packed_desc_event": S_2_8_14,
}
CONSTANTS: dict[str, tuple[int, Section]] = {
    "VRING_PACKED_EVENT_F_WRAP_CTR": (VRING_PACKED_EVENT_F_WRAP_CTR, S_2_8_14),
    "VIRTQUEUE_MAX_SIZE_SPLIT": (VIRTQUEUE_MAX_SIZE_SPLIT, S_2_7),
    "VIRTQUEUE_MAX_SIZE_PACKED": (VIRTQUEUE_MAX_SIZE_PACKED, S_2_8),
    "VRING_DESC_ALIGN": (VRING_DESC_ALIGN, S_2_7),
    "VRING_AVAIL_ALIGN": (VRING_AVAIL_ALIGN, S_2_7),
    "VRING_USED_ALIGN": (VRING_USED_ALIGN, S_2_7),
    "VRING_PACKED_DESC_ALIGN": (VRING_PACKED_DESC_ALIGN, S_2_8_10_1),
    "VRING_PACKED_EVENT_ALIGN": (VRING_PACKED_EVENT_ALIGN, S_2_8_10_1),
}
ENUMS = (VringDescFlag, VringAvailFlag, VringUsedFlag, PackedDescFlag, PackedEventFlag)


def split_ring_sizes(queue_size: int, event_idx: bool) -> tuple[int, int, int]:
    """Byte sizes of (descriptor table, available ring, used ring) of a split virtqueue.

    The §2.7 table gives ``16*qsz``, ``6 + 2*qsz`` and ``6 + 8*qsz``; the trailing 2
    bytes of the rings (``used_event``/``avail_event``) only exist with
    VIRTIO_F_EVENT_IDX, so without it the rings are ``4 + 2*qsz`` and ``4 + 8*qsz``
    (as Linux's ``vring_size()`` computes).
    """
    if not 1 <= queue_size <= VIRTQUEUE_MAX_SIZE_SPLIT or queue_size & (queue_size - 1):
        raise ValueError(f"split queue size must be a power of 2 in [1, 32768]: {queue_size}")
    event = 2 if event_idx else 0
    return (
        VRING_DESC_SIZE * queue_size,
        VRING_AVAIL_HDR_SIZE + 2 * queue_size + event,
        VRING_USED_HDR_SIZE + VRING_USED_ELEM_SIZE * queue_size + event,
    )


def packed_ring_sizes(queue_size: int) -> tuple[int, int, int]:
    """Byte sizes of (descriptor ring, driver event suppression, device event
    suppression) of a packed virtqueue (§2.8.10.1)."""
    if not 1 <= queue_size <= VIRTQUEUE_MAX_SIZE_PACKED:
        raise ValueError(f"packed queue size must be in [1, 32768]: {queue_size}")
    return (
        VRING_PACKED_DESC_SIZE * queue_size,
        VRING_PACKED_DESC_EVENT_SIZE,
        VRING_PACKED_DESC_EVENT_SIZE,
    )
