"""virtio-rng, the entropy device (virtio 1.4 §5.4).

One queue, ``requestq`` (§5.4.2), no feature bits (§5.4.3), no configuration space
(§5.4.4).  The driver posts device-writable buffers; the device fills each with
random bytes from ``os.getrandom`` (the host kernel's CSPRNG): a ``BUFFERS`` queue.
"""

from __future__ import annotations

import os

from virtio.device import VirtioDevice
from virtio.errors import DescriptorChainError
from virtio.service import BufferQueue, QueueRole
from virtio.spec.ids import DeviceId
from virtio.spec.sections import S_5_4_6_1


class VirtioRng(VirtioDevice):
    """Fills every buffer the driver posts, up to ``max_fill`` bytes per buffer
    (devicenormative §5.4.6.2: "The device MUST place one or more random bytes into
    the buffer, but it MAY use less than the entire buffer length")."""

    device_id = DeviceId.VIRTIO_ID_RNG
    queue_max_sizes = (256,)
    queue_roles = (QueueRole.BUFFERS,)
    max_fill = 64 << 10
    stats_kinds = ("buffers",)

    def __init__(self) -> None:
        super().__init__()
        self.buffers_filled = 0
        self.bytes_served = 0

    def statistics_words(self) -> list[str]:
        return [f"buffers_filled={self.buffers_filled}", f"bytes={self.bytes_served}"]

    async def fill_buffers(self, queue_index: int, buffers: BufferQueue) -> None:
        stats = self.stats.queue(queue_index)
        async for chain in buffers:
            if chain.readable_len or not chain.writable_len:
                raise DescriptorChainError(
                    f"requestq buffer with {chain.readable_len} device-readable and"
                    f" {chain.writable_len} device-writable bytes: the driver MUST NOT"
                    f" place device-readable buffers into the queue [{S_5_4_6_1.label}]",
                    section=S_5_4_6_1,
                )
            written = chain.writer().write(os.getrandom(min(chain.writable_len, self.max_fill)))
            buffers.complete(chain, written)
            stats.record(0, 0, written)
            self.buffers_filled += 1
            self.bytes_served += written
