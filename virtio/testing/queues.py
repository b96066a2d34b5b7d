"""A driver queue and the device queue over it, in one call (tests and examples)."""

from __future__ import annotations

from dataclasses import dataclass

from virtio.memory import BytearrayGuestMemory
from virtio.queues.virtqueue import Virtqueue
from virtio.testing.driver import DriverQueue, footprint


@dataclass
class QueuePair:
    memory: BytearrayGuestMemory
    driver: DriverQueue
    device: Virtqueue

    def close(self) -> None:
        self.memory.close()


def make_queue_pair(
    size: int = 16,
    *,
    packed: bool = False,
    event_idx: bool = False,
    indirect: bool = True,
    data_size: int = 256 * 1024,
    base: int = 0x1000,
) -> QueuePair:
    """Guest memory with a driver-side queue at ``base`` and the device queue on it."""
    mem = BytearrayGuestMemory(base + footprint(size, packed=packed) + data_size + 4096)
    drv = DriverQueue(
        mem,
        size,
        base=base,
        packed=packed,
        event_idx=event_idx,
        indirect=indirect,
        data_size=data_size,
    )
    return QueuePair(mem, drv, Virtqueue(mem, drv.state()))
