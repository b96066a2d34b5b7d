"""Device-independent ("reserved") feature bits: virtio 1.4 chapter 6, and the
allocation of feature bit numbers (§2.2).

§2.2 allocates: 0-23 and 50-127 to the device type; 24-41 to extensions of the queue
and feature-negotiation mechanisms (this module); 42-49 and 128+ are reserved.
(1.2 reserved only 24-40: VIRTIO_F_ADMIN_VQ (41) was added in 1.3.)

Linux names two of these ``VIRTIO_RING_F_INDIRECT_DESC`` / ``VIRTIO_RING_F_EVENT_IDX``
(``virtio_ring.h``); the spec calls them ``VIRTIO_F_*`` (chapter 6).  Bit 30 is
"UNUSED" (used by QEMU to detect broken early drivers, §6.3) and is not listed.
"""

from __future__ import annotations

from virtio.spec._base import FeatureBit
from virtio.spec.sections import S_2_2, S_6, S_6_3

TRANSPORT_FEATURES_FIRST = 24
TRANSPORT_FEATURES_LAST = 41
"""Inclusive range of bits reserved for queue / negotiation extensions (§2.2)."""


class TransportFeature(FeatureBit):
    # Legacy interface only (§6.3): transitional devices MAY offer NOTIFY_ON_EMPTY and
    # MUST offer ANY_LAYOUT.
    VIRTIO_F_NOTIFY_ON_EMPTY = 24, S_6_3
    VIRTIO_F_ANY_LAYOUT = 27, S_6_3
    VIRTIO_F_INDIRECT_DESC = 28, S_6
    VIRTIO_F_EVENT_IDX = 29, S_6
    VIRTIO_F_VERSION_1 = 32, S_6
    VIRTIO_F_ACCESS_PLATFORM = 33, S_6
    VIRTIO_F_RING_PACKED = 34, S_6
    VIRTIO_F_IN_ORDER = 35, S_6
    VIRTIO_F_ORDER_PLATFORM = 36, S_6
    VIRTIO_F_SR_IOV = 37, S_6
    VIRTIO_F_NOTIFICATION_DATA = 38, S_6
    VIRTIO_F_NOTIF_CONFIG_DATA = 39, S_6
    VIRTIO_F_RING_RESET = 40, S_6
    VIRTIO_F_ADMIN_VQ = 41, S_6  # 1.3+; PCI only (reserved for future use on MMIO, §4.2.5)


LEGACY = frozenset({"VIRTIO_F_NOTIFY_ON_EMPTY", "VIRTIO_F_ANY_LAYOUT"})
"""Bits that only exist for the legacy interface."""

NOT_IN_1_2 = frozenset(
    {
        "VIRTIO_F_ADMIN_VQ",  # added in 1.3
        # Added with the vDPA notification work; believed to be post-1.2 (unverified).
        "VIRTIO_F_NOTIF_CONFIG_DATA",
    }
)

FEATURE_RANGES = (
    (0, 23, "device"),
    (24, 41, "transport"),
    (42, 49, "reserved"),
    (50, 127, "device"),
)
"""(first, last, kind) from §2.2; bits 128 and above are reserved."""


def feature_kind(bit: int) -> str:
    """``"device"``, ``"transport"`` or ``"reserved"`` for feature bit ``bit`` (§2.2)."""
    for first, last, kind in FEATURE_RANGES:
        if first <= bit <= last:
            return kind
    if bit < 0:
        raise ValueError(f"negative feature bit {bit}")
    return "reserved"


CONSTANTS = {
    "TRANSPORT_FEATURES_FIRST": (TRANSPORT_FEATURES_FIRST, S_2_2),
    "TRANSPORT_FEATURES_LAST": (TRANSPORT_FEATURES_LAST, S_2_2),
}
ENUMS = (TransportFeature,)
