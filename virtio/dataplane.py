"""The native data plane: a thread per eventfd-notified virtqueue, for any device.

Under vhost-user each queue has a kick and a call eventfd.  Instead of the Python
queue-service loop (``VirtioDevice.serve_queue``), a thread runs ``dp_run``
(``virtio/native/dataplane.c``): it waits on the kick eventfd, pops chains in
batches, hands each to the device's native fast path, publishes the used entries
with one index update and signals the call eventfd as EVENT_IDX allows -- without
the interpreter.  What the fast path does not serve is *deferred*: the chain goes
to the Python device's ``handle`` (the one place where the device's semantics
live) and is completed from Python; the queue's native lock
(``Virtqueue.set_locking``) keeps the two apart.  A chain whose I/O was tried
natively and failed is deferred with its errno and answered by
``complete_failed`` (never retried).  vhost-user inflight marks are kept in the
shared region (layout: ``dataplane.h``, the one definition).

A fast path may also work asynchronously (``struct dp``'s start / submit / reap /
poll_fd): it starts a chain's I/O and reports it later; the thread then also waits
for completions, publishes each reaped batch with one used index update, and
before returning waits for everything in progress.  A chain stays marked in flight
in the inflight region until its used entry is published.

A device's data plane subclasses ``NativeDataPlane``: it allocates its C struct
(which embeds ``struct dp`` as ``core``), attaches its fast path, copies the
device state the fast path decides by in ``update_state`` (the device calls it
whenever that state changes), and answers failed chains.

By default each queue has its thread; a device may instead have several queues
served by one thread (``QueueThread``, ``struct dp_group``: QEMU's iothread with
its virtqueue mapping) -- the thread then waits once for the events of all its
queues, and a burst on two queues costs one wake-up, not two.

The thread stops when the ring's scope is cancelled (ring stop, reset,
disconnect): ``stop`` is set and a wake eventfd is written; the data plane
returns once the batch in hand is completed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from virtio.errors import DriverError
from virtio.native import ffi, lib

if TYPE_CHECKING:
    from virtio.device import ActiveDevice, VirtioDevice
    from virtio.queues.chain import DescriptorChain
    from virtio.queues.virtqueue import Virtqueue

log = logging.getLogger(__name__)

_TAKE = 64
CORE_STATISTICS = (
    "requests", "batches", "deferred", "kicks", "calls", "rescues", "io_errors",
    "async_started", "reaps", "publishes", "max_pending", "dropped", "idles",
)  # fmt: skip
"""Counters every data plane keeps (``struct dp``)."""


class QueueThread:
    """One thread serving the data planes of several queues (``struct dp_group``,
    QEMU's iothread): queues join and leave at any time; the thread runs while it
    has queues (started again by the next join).  The device's fast path must wait
    in one mechanism for all of them (blk: one io_uring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.c: Any = ffi.new("struct dp_group *")
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if lib.dp_group_init(self.c, self._wake):
            os.close(self._wake)
            raise MemoryError("dp_group_init failed")
        weakref.finalize(self, os.close, self._wake)

    def _run(self) -> None:
        lib.dp_name_thread(self.name.encode())  # the OS's name too (top -H, perf)
        lib.dp_group_run(self.c)  # keeps self (and so the group) alive while it runs

    async def serve(self, core: Any) -> int:
        """Serve a data plane's ``struct dp`` on this thread until its loop ends;
        returns what ``dp_run`` would.  Not cancellable: the caller stops the queue
        (``stop`` and its wake eventfd) and this returns once the thread let go of it."""
        done = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            core.done_fd = done
            rc = lib.dp_group_join(self.c, ffi.addressof(core))
            if rc < 0:
                return int(rc)
            if rc == 1:
                threading.Thread(target=self._run, name=self.name, daemon=True).start()
            with trio.CancelScope(shield=True):
                await trio.lowlevel.wait_readable(done)
            return int(core.result)
        finally:
            os.close(done)

    def statistics(self) -> dict[str, int]:
        """Waits of the thread, and those that ended with events."""
        return {"waits": int(self.c.waits), "wakeups": int(self.c.wakeups)}


class NativeDataPlane:
    """One queue's native data plane.  Subclasses set ``c_type`` and implement
    ``attach``, ``update_state`` and ``complete_failed``."""

    c_type: ClassVar[str] = ""
    """The device's C struct (embedding ``struct dp core``), e.g. ``"struct blk_dp"``."""
    device_statistics: ClassVar[tuple[str, ...]] = ()
    """Extra counters of the device's C struct."""
    in_order: ClassVar[bool] = False
    """Deferred chains are served one after the other in the order the thread
    deferred them (net: frames leave in order), not each in a task of its own (trio
    may run tasks started together in any order)."""

    def __init__(self, device: VirtioDevice, active: ActiveDevice, index: int) -> None:
        self.device = device
        self.active = active
        self.index = index
        self.queue: Virtqueue = active.queues[index]
        self.notifier = active.notifiers[index]
        self.c: Any = None
        """The device's C struct (``c.core`` is the generic part), once running."""
        self._keep: list[object] = []
        self._region: Any = None
        self._fallback = False

    @staticmethod
    def notifier_supported(active: ActiveDevice, index: int) -> bool:
        """Whether the queue's notifications are eventfds the thread can wait on."""
        notifier = active.notifiers[index]
        return (
            isinstance(getattr(notifier, "kick_fd", None), int)
            and hasattr(notifier, "call_fd")
            and not getattr(notifier, "poll_fallback", False)
        )

    # -- the device's part ------------------------------------------------------------
    def attach(self, c: Any) -> None:
        """Fill the device fields of ``c`` and attach the fast path."""
        raise NotImplementedError

    def update_state(self) -> None:
        """Copy the device state the fast path decides by into ``self.c``."""

    def complete_failed(self, chain: DescriptorChain, err: int) -> int:
        """Answer a chain whose native I/O failed with ``err``; return the used length."""
        raise NotImplementedError

    def detach(self) -> None:
        """Release what ``attach`` set up, once the thread has returned (a fast path
        with asynchronous completion tears its engine down on the thread itself)."""

    # -- setup ------------------------------------------------------------------------
    def _build(self) -> None:
        c = ffi.new(f"{self.c_type} *")
        core = c.core
        if lib.dp_init(ffi.addressof(core)):
            raise MemoryError("dp_init failed")
        dchains = ffi.new("struct vq_chain[]", lib.DP_DEFER_MAX)
        dsegs = ffi.new("struct vq_seg[]", lib.DP_DEFER_SEGS)
        derr = ffi.new("int32_t[]", lib.DP_DEFER_MAX)
        self._keep += [dchains, dsegs, derr]
        core.dchains, core.dsegs, core.derr = dchains, dsegs, derr
        core.q = self.queue.native
        core.wake_fd = self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        core.defer_fd = self._defer = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        area = getattr(getattr(self.queue, "inflight", None), "area", None)
        if area is not None and not self.queue.packed:
            region = ffi.from_buffer(area.region, require_writable=True)
            self._region = region  # released when the thread is done (run)
            core.inflight = ffi.cast("uint8_t *", region)
            core.inflight_num = area.desc_num
            core.inflight_counter = area.counter
        self._area = area
        call = self.notifier.call_fd
        core.kick_fd = self.notifier.kick_fd
        core.call_fd = -1 if call is None else call
        # No completion eventfd unless the device's attach gives one: a zeroed field
        # would be fd 0 (stdin), and a /dev/null stdin is always readable -- the
        # thread's idle wait would return at once, forever.
        core.poll_fd = -1
        self.c = c
        self.attach(c)
        self.update_state()

    def fds_changed(self) -> None:
        """The ring's kick or call eventfd was replaced: the thread picks them up.

        Called before the old fds are closed.  Without a kick eventfd (NOFD) the
        data plane stops and the Python loop (which can poll) takes over."""
        if self.c is None:
            return
        core = self.c.core
        call = self.notifier.call_fd
        kick = self.notifier.kick_fd
        if not isinstance(kick, int):
            kick = -1
            core.stop = 1
            self._fallback = True
        # Under the data plane's lock: afterwards the thread never touches the old fds.
        lib.dp_set_fds(ffi.addressof(core), kick, -1 if call is None else call)
        os.eventfd_write(self._wake, 1)

    # -- introspection -------------------------------------------------------------------
    def statistics(self) -> dict[str, int]:
        """Counters of this data plane (generic and device-specific)."""
        if self.c is None:
            return {}
        out = {n: int(getattr(self.c.core, n)) for n in CORE_STATISTICS}
        out.update({n: int(getattr(self.c, n)) for n in self.device_statistics})
        return out

    def debug_state(self) -> str:
        """One line for diagnostics: ring indices as the driver and we see them."""
        q = self.queue
        st = q.state()
        try:
            avail = q.memory.read_u16(st.driver_addr + 2) if not st.packed else -1
        except Exception:  # memory gone: report what we have
            avail = -1
        stats = " ".join(f"{k}={v}" for k, v in self.statistics().items())
        core = self.c.core
        return (
            f"avail_idx={avail} next_avail={q.next_avail} used={q.next_used} {stats} "
            f"kick_fd={core.kick_fd} call_fd={core.call_fd}"
        )

    # -- running ------------------------------------------------------------------------
    async def run(self) -> bool:
        """Serve the queue until cancelled.  Returns False if the Python loop must take
        over (no usable kick eventfd any more, or a chain beyond the thread's segment
        array)."""
        self._build()
        core = self.c.core
        self.queue.set_locking(True)
        listeners = getattr(self.notifier, "listeners", None)
        if listeners is not None:
            listeners.append(self.fds_changed)
        log.debug(
            "vq%d: native data plane on (kick fd %d, call fd %d, inflight %s)",
            self.index,
            core.kick_fd,
            core.call_fd,
            "tracked" if self._area is not None else "untracked",
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_cancel)
                nursery.start_soon(self._deferred_loop, nursery)
                rc = await self._serve(core)
                nursery.cancel_scope.cancel()
            # Outside the nursery: errors below reach the caller as themselves, not
            # wrapped in an exception group.
            if self._fallback:
                return False
            if rc == lib.VQ_E_SEGS:
                log.warning(
                    "vq%d: a chain needs more segments than the data plane has: "
                    "the Python loop takes over",
                    self.index,
                )
                return False
            if rc < 0:
                if self.queue.broken:
                    self.queue._fail(int(rc))  # raises the DriverError naming the clause
                raise OSError(-rc, f"data plane stopped: {os.strerror(-rc)}")
            return True
        finally:
            log.debug("vq%d: native data plane off: %s", self.index, self.statistics())
            stale = self.queue.stale_note()
            if stale is not None:
                log.warning("vq%d: %s", self.index, stale)
            if self._area is not None:
                self._area.counter = max(self._area.counter, int(core.inflight_counter))
            if listeners is not None and self.fds_changed in listeners:
                listeners.remove(self.fds_changed)
            self.queue.set_locking(False)
            self.detach()
            lib.dp_destroy(ffi.addressof(core))
            os.close(self._wake)
            os.close(self._defer)
            if self._region is not None:
                # The export on the inflight region ends now, not whenever the garbage
                # collector clears this plane: a memoryview cleared in a reference
                # cycle while exported loses its buffer, and the late release crashes
                # (CPython's memory_clear), and the area could not be closed meanwhile.
                ffi.release(self._region)
                self._region = None

    def queue_thread(self) -> QueueThread | None:
        """The shared thread to serve this queue on, or None for a thread of its own."""
        return None

    async def _serve(self, core: Any) -> int:
        """Run the C loop (``dp_run``) until it returns its result."""
        group = self.queue_thread()
        if group is not None:
            rc = await group.serve(core)
            if rc != -errno.EOPNOTSUPP:
                return rc
            log.warning(
                "vq%d: the data plane cannot share a thread here: one of its own", self.index
            )
            core.group = ffi.NULL
        # A worker thread of trio's, named for the queue while it serves it.
        name = f"{type(self.device).__name__}-vq{self.index}".encode()
        return await trio.to_thread.run_sync(lib.dp_run_named, ffi.addressof(core), name)

    async def _stop_on_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.c.core.stop = 1
            os.eventfd_write(self._wake, 1)

    async def _deferred_loop(self, nursery: trio.Nursery) -> None:
        chains = ffi.new("struct vq_chain[]", _TAKE)
        segs = ffi.new("struct vq_seg[]", lib.DP_DEFER_SEGS)
        errs = ffi.new("int32_t[]", _TAKE)
        core = ffi.addressof(self.c.core)
        while True:
            await trio.lowlevel.wait_readable(self._defer)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._defer)
            while n := lib.dp_take(core, chains, _TAKE, segs, lib.DP_DEFER_SEGS, errs):
                taken = [self.queue.chain_from_native(chains + i, segs) for i in range(n)]
                tracker = self.queue.inflight
                if tracker is not None:
                    tracker.on_pop(taken)
                errors = [int(errs[i]) for i in range(n)]
                for chain, err in zip(taken, errors, strict=True):
                    if self.in_order:
                        await self._serve_deferred(chain, err)
                    else:
                        nursery.start_soon(self._serve_deferred, chain, err)
                os.eventfd_write(self._wake, 1)  # room again for the thread's next batch
                # A thread that defers as fast as this loop takes (every frame of a busy
                # port to a congested one) would keep it here for seconds: the tasks just
                # started (if any), and every other task and I/O wait, get their turn.
                await trio.lowlevel.checkpoint()

    async def _serve_deferred(self, chain: DescriptorChain, err: int) -> None:
        try:
            if err:
                written = self.complete_failed(chain, err)
            else:
                written = await self.device.handle(self.index, chain)
        except DriverError as exc:
            self.device._driver_error(self.active, exc)
            return
        finally:
            self.c.core.deferred_done += 1  # (net: later chains wait for this one)
        if self.queue.broken:
            return
        self.queue.add_used(chain, written)
        if self.queue.needs_notification():
            self.notifier.notify_used()
