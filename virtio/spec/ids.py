"""Virtio device IDs: the table at the start of chapter 5 "Device Types" (virtio 1.4).

Names are Linux ``virtio_ids.h`` ones; IDs Linux had not named when the table was
transcribed use the spec's device name.  The table skips 14, 15 and 37 (Linux names 37
``VIRTIO_ID_DMABUF``, which the spec does not reserve).

Version notes (checked against the LaTeX sources, ``content.tex`` at tags v1.2-cs01
and v1.4-cs01): 1.2 ends at 42 (RDMA); 43 camera, 44 ISM, 45 SPI controller (1.3
drafts: "SPI master"), 46 TEE, 47 CPU balloon, 48 media and 49 USB controller are
newer (``NOT_IN_1_2``).
"""

from __future__ import annotations

from virtio.spec._base import SpecIntEnum
from virtio.spec.sections import S_5, S_5_1_1, S_5_2_1, S_5_8_1


class DeviceId(SpecIntEnum):
    VIRTIO_ID_NET = 1, S_5_1_1
    VIRTIO_ID_BLOCK = 2, S_5_2_1
    VIRTIO_ID_CONSOLE = 3, S_5
    VIRTIO_ID_RNG = 4, S_5  # "entropy source"
    VIRTIO_ID_BALLOON = 5, S_5  # "memory ballooning (traditional)"
    VIRTIO_ID_IOMEM = 6, S_5
    VIRTIO_ID_RPMSG = 7, S_5
    VIRTIO_ID_SCSI = 8, S_5
    VIRTIO_ID_9P = 9, S_5
    VIRTIO_ID_MAC80211_WLAN = 10, S_5
    VIRTIO_ID_RPROC_SERIAL = 11, S_5
    VIRTIO_ID_CAIF = 12, S_5
    VIRTIO_ID_MEMORY_BALLOON = 13, S_5
    VIRTIO_ID_GPU = 16, S_5
    VIRTIO_ID_CLOCK = 17, S_5  # "Timer/Clock device"
    VIRTIO_ID_INPUT = 18, S_5_8_1
    VIRTIO_ID_VSOCK = 19, S_5  # "Socket device"
    VIRTIO_ID_CRYPTO = 20, S_5
    VIRTIO_ID_SIGNAL_DIST = 21, S_5
    VIRTIO_ID_PSTORE = 22, S_5
    VIRTIO_ID_IOMMU = 23, S_5
    VIRTIO_ID_MEM = 24, S_5
    VIRTIO_ID_SOUND = 25, S_5
    VIRTIO_ID_FS = 26, S_5
    VIRTIO_ID_PMEM = 27, S_5
    VIRTIO_ID_RPMB = 28, S_5
    VIRTIO_ID_MAC80211_HWSIM = 29, S_5
    VIRTIO_ID_VIDEO_ENCODER = 30, S_5
    VIRTIO_ID_VIDEO_DECODER = 31, S_5
    VIRTIO_ID_SCMI = 32, S_5
    VIRTIO_ID_NITRO_SEC_MOD = 33, S_5
    VIRTIO_ID_I2C_ADAPTER = 34, S_5
    VIRTIO_ID_WATCHDOG = 35, S_5
    VIRTIO_ID_CAN = 36, S_5
    VIRTIO_ID_PARAM_SERV = 38, S_5
    VIRTIO_ID_AUDIO_POLICY = 39, S_5
    VIRTIO_ID_BT = 40, S_5
    VIRTIO_ID_GPIO = 41, S_5
    VIRTIO_ID_RDMA = 42, S_5
    # Added after 1.2:
    VIRTIO_ID_CAMERA = 43, S_5
    VIRTIO_ID_ISM = 44, S_5
    VIRTIO_ID_SPI = 45, S_5  # "SPI controller"
    VIRTIO_ID_TEE = 46, S_5
    VIRTIO_ID_CPU_BALLOON = 47, S_5
    VIRTIO_ID_MEDIA = 48, S_5  # "Media device"
    VIRTIO_ID_USB = 49, S_5  # "USB controller"


NOT_IN_1_2 = frozenset(
    {
        "VIRTIO_ID_CAMERA",
        "VIRTIO_ID_ISM",
        "VIRTIO_ID_SPI",
        "VIRTIO_ID_TEE",
        "VIRTIO_ID_CPU_BALLOON",
        "VIRTIO_ID_MEDIA",
        "VIRTIO_ID_USB",
    }
)

ENUMS = (DeviceId,)
