"""The queue-service loop, written once (virtio 1.4 §2.7.10 / §2.8.10: notification
suppression; §2.7.7 / §2.8.10: used buffer notifications).

A device declares a role per queue (``QueueRole``):

* ``REQUESTS``: the driver sends requests (blk, net transmit, input's statusq).
  ``RequestService.run`` is the §2.7.10 loop: disable notifications, pop batches,
  run the device's ``handle`` on each chain concurrently (up to ``max_inflight``),
  return the completions in batches (one used-index update), notify the driver as
  its suppression settings allow (flags, or EVENT_IDX's ``used_event``:
  ``Virtqueue.needs_notification``), re-enable notifications and re-check (the
  driver may have added buffers meanwhile), then wait for the next kick.
* ``BUFFERS``: the driver posts buffers that the device fills when it has data
  (net receive, input events, rng).  ``BufferQueue`` hands the device the next
  available chain (``await buffers.next_buffer()``, ``async for chain in
  buffers``).  Backpressure: when the driver has posted none, it re-enables
  notifications (EVENT_IDX: ``avail_event``), re-checks and sleeps until the
  driver's next kick; no polling.  ``complete`` returns a filled chain and notifies
  the driver if its suppression settings ask for it.

``ServiceRun`` runs a device's queue services as tasks of a trio loop for a
transport whose notifications arrive as blocking calls (the emulator's virtio-mmio,
``MmioTransport.service_queue``), so that transport runs exactly the code the
asynchronous transports run; ``settle`` returns once the device has nothing left to
do: every request queue parked with nothing in flight, and every task of the loop
blocked (``trio.testing.wait_all_tasks_blocked``: a buffer-filling device waits for
data or for buffers).  A request handler in a worker thread keeps its queue busy;
a buffer-filling device that works in a worker thread is not waited for.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import trio

from virtio.queues.chain import DescriptorChain
from virtio.queues.virtqueue import Virtqueue

if TYPE_CHECKING:
    from virtio.device import ActiveDevice, VirtioDevice

log = logging.getLogger(__name__)


def _first_item(item: tuple[int, DescriptorChain, int]) -> int:
    return item[0]


class QueueRole(enum.Enum):
    """Who starts the work on a queue."""

    REQUESTS = "requests"
    """The driver sends requests; the device answers each (``VirtioDevice.handle``)."""
    BUFFERS = "buffers"
    """The driver posts empty buffers; the device fills them when it has data
    (``VirtioDevice.fill_buffers``)."""


class CompletionGate(Protocol):
    """Decides *when* and *in which order* finished chains reach the used ring: a
    device-timing model (the emulator's ``run-driver --timing``).  Without a gate a
    service returns every batch at once, in pop order (the inline model).

    ``complete`` takes ownership of ``items``; the gate later calls
    ``service.return_used(subset)`` (any order, any grouping, from any thread that
    does not race the service: the emulator calls it from the vCPU thread while the
    device's loop is idle).  A chain returned out of pop order is allowed (§2.7.8:
    the device may use buffers in any order unless VIRTIO_F_IN_ORDER).
    """

    def complete(
        self, service: QueueService, items: Sequence[tuple[DescriptorChain, int]]
    ) -> None: ...


class QueueService:
    """One queue's service: its ring, its notifier, and whether it is idle."""

    def __init__(
        self, active: ActiveDevice, index: int, gate: CompletionGate | None = None
    ) -> None:
        self.index = index
        self.queue: Virtqueue = active.queues[index]
        self.notifier = active.notifiers[index]
        self.gate = gate
        """The device-timing model, or ``None``: completions go out at once."""
        self.outstanding = 0
        """Chains popped and not yet returned to the driver."""
        self.completed = 0
        self.parked = False
        """Waiting for the driver's next kick (nothing available)."""
        self.finished = False
        self._changed = trio.Event()
        self._stale_logged = False
        active.services[index] = self

    @property
    def idle(self) -> bool:
        return True

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_idle(self) -> None:
        while not self.idle:
            await self._changed.wait()

    async def _wait_kick(self) -> None:
        self.parked = True
        if self.idle:
            self._signal()
        stale = self.queue.stale_note()
        if stale is not None and not self._stale_logged:
            self._stale_logged = True
            log.warning("vq%d: %s", self.index, stale)
        kicks = getattr(self.notifier, "kicks", None)
        try:
            await self.notifier.wait_kick()
        finally:
            self.parked = False
        if kicks is None or getattr(self.notifier, "kicks", None) != kicks:
            self.queue.kicked()

    def _notify(self) -> None:
        if self.queue.needs_notification():
            self.notifier.notify_used()

    def return_used(self, items: Sequence[tuple[DescriptorChain, int]]) -> bool:
        """Put ``items`` in the used ring (one index update) and notify the driver if
        its suppression settings ask for it.  ``False`` (nothing written) once the
        service ended (device or queue reset) or the queue broke."""
        if self.finished or self.queue.broken or not items:
            return False
        self.queue.add_used_batch(items)
        self._notify()
        return True


class RequestService(QueueService):
    """A ``REQUESTS`` queue: the §2.7.10 loop around the device's ``handle``."""

    deferred = 0
    """Chains popped whose processing the gate has not admitted yet (``admit``)."""
    _start: Callable[[int, DescriptorChain], None] | None = None

    @property
    def idle(self) -> bool:
        return self.finished or (self.parked and self.outstanding == self.deferred)

    def resubmit(self, chain: DescriptorChain) -> Callable[[], None]:
        """A chain popped before (a restored snapshot's request the gate had not
        admitted), counted as waiting; the returned callable starts it (from the
        device's trio loop)."""
        if self._start is None:
            raise RuntimeError("the service is not running")
        start = self._start
        self.outstanding += 1
        self.deferred += 1
        return lambda: start(1 << 62, chain)

    async def run(
        self, handle: Callable[[int, DescriptorChain], Awaitable[int]], max_inflight: int
    ) -> None:
        """Serve until cancelled; a ``DriverError`` (from the ring or ``handle``) ends
        the loop and propagates (the caller sets DEVICE_NEEDS_RESET)."""
        queue, index = self.queue, self.index
        limiter = trio.Semaphore(max_inflight)
        done: list[tuple[int, DescriptorChain, int]] = []
        flush_wanted = trio.Event()
        popped = 0

        gate = self.gate

        def flush() -> None:
            n = len(done)
            if done and not queue.broken:
                if n > 1:
                    done.sort(key=_first_item)  # chains finished together: in pop order
                items = [(chain, written) for _, chain, written in done]
                if gate is None:
                    queue.add_used_batch(items)
                    self._notify()
                else:
                    gate.complete(self, items)
            done.clear()
            self.outstanding -= n
            self.completed += n
            if self.idle:
                self._signal()

        async def one(seq: int, chain: DescriptorChain) -> None:
            try:
                written = await handle(index, chain)
            finally:
                limiter.release()
            done.append((seq, chain, written))
            flush_wanted.set()

        async def completer() -> None:
            nonlocal flush_wanted
            while True:
                await flush_wanted.wait()
                flush_wanted = trio.Event()
                # Let other finished handlers append first: one used-idx update for all.
                await trio.lowlevel.checkpoint()
                flush()

        admit = getattr(gate, "admit", None)

        try:
            async with trio.open_nursery() as nursery:

                def start(seq: int, chain: DescriptorChain) -> None:
                    self.deferred -= 1
                    if not self.finished:
                        nursery.start_soon(one, seq, chain)

                self._start = start
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
                        self.outstanding += len(chains)
                        for chain in chains:
                            limiter.acquire_nowait()
                            if admit is not None and not admit(
                                self, chain, functools.partial(start, popped, chain)
                            ):
                                self.deferred += 1  # the gate starts it later
                            else:
                                nursery.start_soon(one, popped, chain)
                            popped += 1
                    if queue.enable_notification():
                        continue  # buffers arrived while notifications were off
                    await self._wait_kick()
        finally:
            self.finished = True
            self._start = None
            self._signal()


class OrderedRequestService(QueueService):
    """A ``REQUESTS`` queue whose chains must be handled in ring order, one at a
    time and without awaiting (net transmit, §5.1.9.2: a flow's packets leave in the
    order the driver queued them): the same §2.7.10 loop as ``RequestService``,
    completing each popped batch with one used-index update."""

    @property
    def idle(self) -> bool:
        return self.finished or self.parked

    async def run(self, handle: Callable[[int, DescriptorChain], int]) -> None:
        queue, index = self.queue, self.index
        try:
            while True:
                queue.disable_notification()
                while chains := queue.pop_batch(Virtqueue.BATCH):
                    self.outstanding += len(chains)
                    done = [(chain, handle(index, chain)) for chain in chains]
                    queue.add_used_batch(done)
                    self.outstanding -= len(chains)
                    self.completed += len(chains)
                    self._notify()
                    await trio.lowlevel.checkpoint()
                if queue.enable_notification():
                    continue
                await self._wait_kick()
        finally:
            self.finished = True
            self._signal()


class BufferQueue(QueueService):
    """A ``BUFFERS`` queue: the device takes driver-posted chains when it has data.

    ::

        async for chain in buffers:            # waits for the driver when none is posted
            n = chain.writer().write(data)
            buffers.complete(chain, n)          # used ring + notification (EVENT_IDX aware)
    """

    async def next_buffer(self) -> DescriptorChain:
        """The next available chain; without one, sleep until the driver kicks."""
        queue = self.queue
        while True:
            chain = queue.pop()
            if chain is not None:
                self.outstanding += 1
                return chain
            if queue.enable_notification():
                # Posted while notifications were off: take it, and keep them off
                # while the device has buffers (§2.7.10, §2.8.10).
                queue.disable_notification()
                continue
            await self._wait_kick()
            queue.disable_notification()

    async def next_buffers(self, count: int) -> list[DescriptorChain]:
        """``count`` chains popped together, once the driver has posted that many
        (a group that must not be split, virtio-input §5.8.6).  Nothing is popped
        while waiting, so a paused or reset ring (GET_VRING_BASE) finds no chain
        held."""
        queue = self.queue
        while True:
            have = queue.available_chains(count)
            if have >= count:
                chains = self.next_buffers_nowait(count)
                if chains is not None:
                    return chains
                await self._wait_kick()  # the ring stopped handing out chains (paused)
                continue
            # Ask for a kick when one more chain arrives, then count again (the driver
            # may have posted meanwhile).
            queue.enable_notification_after(have)
            if queue.available_chains(count) >= count:
                queue.disable_notification()
                continue
            await self._wait_kick()
            queue.disable_notification()

    def next_buffers_nowait(self, count: int) -> list[DescriptorChain] | None:
        """``count`` chains if the driver has posted that many, else ``None`` (and
        nothing is popped)."""
        queue = self.queue
        if queue.available_chains(count) < count:
            return None
        chains: list[DescriptorChain] = []
        while len(chains) < count:
            chain = queue.pop()
            if chain is None:  # the ring stopped handing out chains (draining)
                break
            chains.append(chain)
        self.outstanding += len(chains)
        if len(chains) < count:
            if chains:
                self.complete_batch((c, 0) for c in chains)
            return None
        return chains

    def next_buffer_nowait(self) -> DescriptorChain | None:
        """The next available chain, or ``None`` (e.g. to drop data nobody asked for)."""
        chain = self.queue.pop()
        if chain is not None:
            self.outstanding += 1
        return chain

    def give_back(self, chains: list[DescriptorChain]) -> None:
        """Return the latest popped ``chains`` unused (``Virtqueue.give_back``): a
        device never holds buffers while it waits, so a ring stop (vhost-user
        GET_VRING_BASE, a reset) does not wait for them."""
        self.queue.give_back(chains)
        self.outstanding -= len(chains)

    async def wait_for_more(self) -> None:
        """Sleep until the driver posts buffers beyond those available now (a packet
        that needs more room than is posted: net receive with MRG_RXBUF).  Takes
        every available chain, asks for a notification past them (EVENT_IDX's
        ``avail_event``, §2.7.10), gives them back and waits for the kick."""
        queue = self.queue
        while True:
            taken: list[DescriptorChain] = []
            while batch := queue.pop_batch(Virtqueue.BATCH):
                taken += batch
            more = queue.enable_notification()
            queue.give_back(taken)
            if more:
                queue.disable_notification()
                return  # posted while we looked
            await self._wait_kick()
            queue.disable_notification()
            return

    async def wait_kick(self) -> None:
        """Sleep until the driver notifies: for a caller that turned notifications on
        and re-checked the ring itself (a native writer of the same ring, under its
        own lock)."""
        await self._wait_kick()

    def complete(self, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` with ``written`` bytes filled; notify as the driver asked."""
        self.complete_batch(((chain, written),))

    def complete_batch(
        self,
        completions: Iterable[tuple[DescriptorChain, int]],
        *,
        on_stored: Callable[[], object] | None = None,
    ) -> None:
        """Return several filled chains with one used-index update.  ``on_stored``
        (a latency probe) is called right after the used index is stored, before the
        driver is notified (not with a completion gate: it decides when)."""
        items = list(completions)
        self.outstanding -= len(items)
        self.completed += len(items)
        if self.gate is not None:
            self.gate.complete(self, items)
            return
        self.queue.add_used_batch(items)
        if on_stored is not None:
            on_stored()
        self._notify()

    def __aiter__(self) -> BufferQueue:
        return self

    async def __anext__(self) -> DescriptorChain:
        return await self.next_buffer()


class ServiceRun:
    """A device's queue services as tasks of the current trio loop, for a transport
    whose notifications are blocking calls (see the module docstring).

    ``ensure(index)`` starts queue ``index``'s service (``VirtioDevice.serve_queue``)
    or restarts it when the transport gave the queue a new ring (virtqueue reset);
    ``settle()`` waits until the device has nothing left to do; ``cancel()`` (from any
    thread: a device reset, §2.4) stops every service and returns when they ended.
    """

    def __init__(self, device: VirtioDevice, active: ActiveDevice) -> None:
        self.device = device
        self.active = active
        self._token = trio.lowlevel.current_trio_token()
        self._tasks: dict[int, tuple[Virtqueue, trio.CancelScope, trio.Event]] = {}

    async def ensure(self, index: int) -> None:
        vq = self.active.queues[index]
        task = self._tasks.get(index)
        if task is not None:
            if task[0] is vq:
                return
            task[1].cancel()  # a ring that was reset: its service must not touch it again
            await task[2].wait()
        scope, done = trio.CancelScope(), trio.Event()
        self._tasks[index] = (vq, scope, done)
        trio.lowlevel.spawn_system_task(self._serve, index, scope, done, name=f"serve-q{index}")

    async def _serve(self, index: int, scope: trio.CancelScope, done: trio.Event) -> None:
        try:
            with scope:
                await self.device.serve_queue(self.active, index)
        except Exception as exc:  # a device bug: stop the device, keep the loop alive
            log.exception("%s: queue %d: the device failed", type(self.device).__name__, index)
            self.active.set_needs_reset(f"queue {index}: {type(exc).__name__}: {exc}")
        finally:
            done.set()

    async def settle(self) -> None:
        await self.active.wait_settled()

    def cancel(self) -> None:
        try:
            here = trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:
            here = False
        if here:
            for _, scope, _ in self._tasks.values():
                scope.cancel()
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run(self._cancel_and_wait, trio_token=self._token)

    async def _cancel_and_wait(self) -> None:
        for _, scope, _ in self._tasks.values():
            scope.cancel()
        for _, _, done in self._tasks.values():
            await done.wait()


async def wait_quiescent() -> None:
    """Until every other task of this trio loop is blocked."""
    import trio.testing  # here, not at the top: it imports pytest (~150 ms at start-up)

    await trio.testing.wait_all_tasks_blocked()
