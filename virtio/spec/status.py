"""The device status field (virtio 1.4 §2.1).

Linux ``virtio_config.h`` names these ``VIRTIO_CONFIG_S_<NAME>``, except
DEVICE_NEEDS_RESET which is ``VIRTIO_CONFIG_S_NEEDS_RESET``.
"""

from __future__ import annotations

from virtio.spec._base import SpecIntFlag
from virtio.spec.sections import S_2_1, S_2_1_2


class DeviceStatus(SpecIntFlag):
    """Bits of ``device status``, in the order the spec lists them (the order a
    driver typically sets them).  A device resets the field to 0 (§2.4)."""

    ACKNOWLEDGE = 1, S_2_1
    DRIVER = 2, S_2_1
    FAILED = 128, S_2_1
    FEATURES_OK = 8, S_2_1
    DRIVER_OK = 4, S_2_1
    # Setting it obliges the device to send a configuration change notification if
    # DRIVER_OK is set: label sec:.../Device Status Field / DEVICENEEDSRESET in §2.1.2.
    DEVICE_NEEDS_RESET = 64, S_2_1_2


LINUX_NAMES: dict[str, str] = {
    member.name: "VIRTIO_CONFIG_S_"
    + ("NEEDS_RESET" if member.name == "DEVICE_NEEDS_RESET" else member.name)
    for member in DeviceStatus
}
"""Spec name -> Linux uapi macro name."""

ENUMS = (DeviceStatus,)
