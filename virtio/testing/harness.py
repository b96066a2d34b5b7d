"""Run a ``VirtioDevice`` against in-memory driver queues, with no transport.

``DeviceHarness`` is the unit-test counterpart of a transport: it negotiates
features, builds ``DriverQueue``s over a ``BytearrayGuestMemory`` (or any
``GuestMemory``), starts the device and lets a test submit buffers and await
their completion::

    async with DeviceHarness.start(VirtioBlk(backend)) as h:
        used = await h.request(0, [header], [512, 1])
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence

import trio

from virtio.device import ActiveDevice, VirtioDevice
from virtio.errors import DriverError
from virtio.memory import BytearrayGuestMemory, GuestMemory
from virtio.queues.virtqueue import Virtqueue
from virtio.spec.features import TransportFeature as TF
from virtio.testing.driver import DriverQueue, UsedBuffer, footprint


class MemoryNotifier:
    """In-memory notifications for one queue: kicks and interrupts are counted."""

    def __init__(self) -> None:
        self.kicks = 0
        self.interrupts = 0
        self._kick = trio.Event()
        self._irq = trio.Event()

    def kick(self) -> None:
        self.kicks += 1
        self._kick.set()

    async def wait_kick(self) -> None:
        await self._kick.wait()
        self._kick = trio.Event()

    def notify_used(self) -> None:
        self.interrupts += 1
        self._irq.set()

    async def wait_interrupt(self) -> None:
        await self._irq.wait()
        self._irq = trio.Event()


def thread_cpu_ns(prefix: str) -> int:
    """On-CPU nanoseconds of this process's threads whose name starts with
    ``prefix`` (``/proc/self/task/TID/schedstat``): a data plane thread's work, or
    what it burns while it should sleep."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/self/task/{tid}/comm") as f:
                if not f.read().startswith(prefix):
                    continue
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    return total


class EventfdNotifier:
    """The notifier vhost-user gives a queue: a kick and a call eventfd.  A device's
    native data plane waits on ``kick_fd`` itself; the Python path awaits
    ``wait_kick``; ``notify_used`` signals ``call_fd``."""

    def __init__(self) -> None:
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.listeners: list = []
        self.poll_fallback = False

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    async def wait_kick(self) -> None:
        await trio.lowlevel.wait_readable(self.kick_fd)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.kick_fd)

    def notify_used(self) -> None:
        os.eventfd_write(self.call_fd, 1)

    def close(self) -> None:
        os.close(self.kick_fd)
        os.close(self.call_fd)


class DeviceHarness:
    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        driver_queues: dict[int, DriverQueue],
        notifiers: dict[int, MemoryNotifier],
        features: int,
    ) -> None:
        self.device = device
        self.memory = memory
        self.queues = driver_queues
        self.notifiers = notifiers
        self.features = features
        self.driver_errors: list[DriverError] = []
        self._pending: dict[tuple[int, int], UsedBuffer] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        device: VirtioDevice,
        *,
        features: int | None = None,
        packed: bool = False,
        event_idx: bool = True,
        queue_size: int = 64,
        data_size: int = 4 << 20,
        queues: Sequence[int] | None = None,
    ) -> AsyncIterator[DeviceHarness]:
        """Negotiate ``features`` (default: all offered, minus RING_PACKED unless
        ``packed``), set up the queues and run the device until the block exits."""
        offered = device.offered_features()
        if features is None:
            features = offered
            if not packed:
                features &= ~TF.VIRTIO_F_RING_PACKED.mask
            if not event_idx:
                features &= ~TF.VIRTIO_F_EVENT_IDX.mask
        device.ack_features(features)
        packed = bool(features & TF.VIRTIO_F_RING_PACKED.mask)
        event_idx = bool(features & TF.VIRTIO_F_EVENT_IDX.mask)
        indirect = bool(features & TF.VIRTIO_F_INDIRECT_DESC.mask)
        indices = list(range(device.num_queues)) if queues is None else list(queues)
        per_queue = footprint(queue_size, packed=packed) + data_size
        memory = BytearrayGuestMemory(per_queue * len(indices) + 4096)
        dqs, devqs, notifiers = {}, {}, {}
        for n, qi in enumerate(indices):
            size = min(queue_size, device.queue_max_sizes[qi])
            dq = DriverQueue(
                memory,
                size,
                base=n * per_queue,
                packed=packed,
                event_idx=event_idx,
                indirect=indirect,
                data_size=data_size,
            )
            dqs[qi] = dq
            devqs[qi] = Virtqueue(memory, dq.state(), name=f"q{qi}")
            notifiers[qi] = MemoryNotifier()
        h = cls(device, memory, dqs, notifiers, features)
        active = ActiveDevice(memory, features, devqs, notifiers, h._driver_error)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, active)
            try:
                yield h
            finally:
                nursery.cancel_scope.cancel()

    def _driver_error(self, exc: DriverError) -> None:
        self.driver_errors.append(exc)
        for notifier in self.notifiers.values():
            notifier.notify_used()  # wake waiters: they re-check driver_errors
        # (counted as an interrupt; tests that count interrupts see the error first)

    def submit(
        self,
        queue_index: int,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        use_indirect: bool = False,
    ) -> int:
        """Add a buffer and notify the device if its suppression settings ask for it."""
        dq = self.queues[queue_index]
        token = dq.add(readable, writable, use_indirect=use_indirect)
        if dq.publish():
            self.notifiers[queue_index].kick()
        return token

    async def wait_used(self, queue_index: int, token: int) -> UsedBuffer:
        """Wait until the buffer ``token`` comes back."""
        key = (queue_index, token)
        dq = self.queues[queue_index]
        while key not in self._pending:
            for used in dq.get_used():
                self._pending[(queue_index, used.id)] = used
            if key in self._pending:
                break
            if self.driver_errors:
                raise self.driver_errors[0]
            # Re-arm used buffer notifications, then re-check (the §2.7.14 race).
            dq.set_interrupts(True)
            if any(True for _ in self._collect(queue_index)):
                continue
            await self.notifiers[queue_index].wait_interrupt()
        return self._pending.pop(key)

    def _collect(self, queue_index: int):
        for used in self.queues[queue_index].get_used():
            self._pending[(queue_index, used.id)] = used
            yield used

    async def request(
        self,
        queue_index: int,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        use_indirect: bool = False,
    ) -> UsedBuffer:
        token = self.submit(queue_index, readable, writable, use_indirect=use_indirect)
        return await self.wait_used(queue_index, token)
