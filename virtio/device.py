"""The device-author API: write a device once, run it under any transport.

A device declares its ID, its queues' maximum sizes, its own feature bits and its
configuration space, and handles descriptor chains.  The framework owns the ring
and transport feature bits (``VIRTIO_F_VERSION_1``, ``INDIRECT_DESC``,
``EVENT_IDX``, ``RING_PACKED``), guest memory, notifications in both directions
and the queue-service loop (virtio 1.4 §2.7.10's disable / pop / add_used /
notify / re-enable dance).  Transports (vhost-user, virtio-mmio) build an
``ActiveDevice`` at DRIVER_OK (§3.1.1) and call ``VirtioDevice.run``; a reset
cancels it (§2.4).

Minimal device::

    class Echo(VirtioDevice):
        device_id = DeviceId.VIRTIO_ID_CONSOLE
        queue_max_sizes = (256,)

        async def handle(self, queue_index, chain):
            data = chain.reader().read()
            return chain.writer().write(data)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar, Protocol

import trio

from virtio.errors import DeviceUsageError, DriverError, QueueBrokenError
from virtio.memory import GuestMemory
from virtio.queues.chain import DescriptorChain
from virtio.queues.virtqueue import Virtqueue
from virtio.spec.features import TransportFeature as TF
from virtio.spec.ids import DeviceId

log = logging.getLogger(__name__)

FRAMEWORK_FEATURES = (
    TF.VIRTIO_F_VERSION_1.mask | TF.VIRTIO_F_INDIRECT_DESC.mask | (TF.VIRTIO_F_EVENT_IDX.mask)
)
"""Ring/transport bits every device offers through the framework."""
PACKED_FEATURE = TF.VIRTIO_F_RING_PACKED.mask


class QueueNotifier(Protocol):
    """How one queue's notifications travel (eventfds, MMIO, in-memory for tests)."""

    async def wait_kick(self) -> None:
        """Wait for an available buffer notification from the driver (§2.3)."""

    def notify_used(self) -> None:
        """Send a used buffer notification to the driver (an interrupt, §2.3)."""


class ActiveDevice:
    """What a running device is given at DRIVER_OK: memory, features, queues and
    their notifiers, and a way to report a driver error (DEVICE_NEEDS_RESET)."""

    def __init__(
        self,
        memory: GuestMemory,
        features: int,
        queues: dict[int, Virtqueue],
        notifiers: dict[int, QueueNotifier],
        on_driver_error: Callable[[DriverError], None] | None = None,
    ) -> None:
        self.memory = memory
        self.features = features
        self.queues = queues
        self.notifiers = notifiers
        self.on_driver_error = on_driver_error

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> int(bit) & 1)


class VirtioDevice:
    """Base class of device models.  Subclasses set the class attributes and
    implement ``handle`` (or override ``serve_queue`` for devices that need more
    control, such as net's receive queue)."""

    device_id: ClassVar[DeviceId]
    queue_max_sizes: tuple[int, ...] = (256,)
    device_features: int = 0
    """Device-type feature bits this device offers (bits 0-23, 50+)."""
    max_inflight: int = 128
    """Chains handled concurrently per queue."""
    supports_packed: bool = True

    def __init__(self) -> None:
        self.driver_features = 0
        self.needs_reset = False

    # -- configuration -------------------------------------------------------------------
    @property
    def num_queues(self) -> int:
        return len(self.queue_max_sizes)

    def offered_features(self) -> int:
        """All feature bits offered to the driver (framework + device)."""
        bits = FRAMEWORK_FEATURES | self.device_features
        if self.supports_packed:
            bits |= PACKED_FEATURE
        return bits

    def ack_features(self, features: int) -> None:
        """The driver accepted ``features`` (FEATURES_OK, §3.1.1); must be a subset."""
        extra = features & ~self.offered_features()
        if extra:
            raise DriverError(
                f"driver accepted feature bits {extra:#x} the device did not offer",
                section="2.2.1",
            )
        self.driver_features = features

    def config_bytes(self) -> bytes:
        """The device configuration space as the driver reads it (§2.5)."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write into the configuration space; default: ignored (read-only)."""
        log.warning("%s: driver wrote read-only config at %#x", type(self).__name__, offset)

    def reset(self) -> None:
        """Device reset (§2.4): forget negotiated state."""
        self.driver_features = 0
        self.needs_reset = False

    # -- operation -------------------------------------------------------------------------
    async def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        """Process one chain; return the bytes written into its writable part."""
        raise NotImplementedError

    async def run(self, active: ActiveDevice) -> None:
        """Serve every active queue until cancelled (reset) or a driver error."""
        async with trio.open_nursery() as nursery:
            for index in active.queues:
                nursery.start_soon(self.serve_queue, active, index)

    async def serve_queue(self, active: ActiveDevice, index: int) -> None:
        """The queue-service loop: wait for kicks, pop batches, handle chains
        concurrently (up to ``max_inflight``), complete in batches, notify as the
        driver's suppression settings allow."""
        queue = active.queues[index]
        notifier = active.notifiers[index]
        limiter = trio.Semaphore(self.max_inflight)
        done: list[tuple[DescriptorChain, int]] = []
        flush_wanted = trio.Event()

        def flush() -> None:
            if not done or queue.broken:
                done.clear()
                return
            queue.add_used_batch(done)
            done.clear()
            if queue.needs_notification():
                notifier.notify_used()

        async def one(chain: DescriptorChain) -> None:
            try:
                written = await self.handle(index, chain)
            except DriverError as exc:
                self._driver_error(active, exc)
                return
            finally:
                limiter.release()
            done.append((chain, written))
            flush_wanted.set()

        async def completer() -> None:
            nonlocal flush_wanted
            while True:
                await flush_wanted.wait()
                flush_wanted = trio.Event()
                # Let other finished handlers append first: one used-idx update for all.
                await trio.lowlevel.checkpoint()
                flush()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(completer)
                while True:
                    queue.disable_notification()
                    while True:
                        if limiter.value == 0:  # max_inflight reached: wait for a slot
                            await limiter.acquire()
                            limiter.release()
                            continue
                        # One native call pops as many chains as there are free slots.
                        chains = queue.pop_batch(min(limiter.value, Virtqueue.BATCH))
                        if not chains:
                            break
                        for chain in chains:
                            limiter.acquire_nowait()
                            nursery.start_soon(one, chain)
                    if queue.enable_notification():
                        continue
                    await notifier.wait_kick()
        except* DriverError as group:  # also when trio groups it with a Cancelled
            self._driver_error(active, group.exceptions[0])
        except* QueueBrokenError:
            pass

    def _driver_error(self, active: ActiveDevice, exc: DriverError) -> None:
        log.error("%s: driver error, device needs reset: %s", type(self).__name__, exc)
        self.needs_reset = True
        if active.on_driver_error is not None:
            active.on_driver_error(exc)


def check_subset(features: int, offered: int) -> None:
    if features & ~offered:
        raise DeviceUsageError(f"features {features & ~offered:#x} were not offered")
