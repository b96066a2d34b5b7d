"""A native data plane for virtio-blk queues whose notifications are eventfds.

Under vhost-user each queue has a kick and a call eventfd.  Instead of the Python
queue-service loop (``VirtioDevice.serve_queue``), a thread runs
``blk_dp_run`` (``virtio/native/blk_dataplane.c``): it waits on the kick eventfd,
pops chains, serves well-formed IN / OUT / FLUSH requests with ``preadv`` /
``pwritev`` / ``fdatasync`` straight into guest memory, completes them and signals
the call eventfd as EVENT_IDX allows -- without the interpreter.  Every other
request (GET_ID, DISCARD, WRITE_ZEROES, malformed ones) is deferred to
``VirtioBlk.handle``, the one place where virtio-blk semantics live, and completed
from Python; the queue's native lock (``Virtqueue.set_locking``) keeps the two
apart.  A request whose I/O failed in the thread is deferred with its errno and
answered VIRTIO_BLK_S_IOERR by ``VirtioBlk.complete_failed`` -- never retried: a
second ``fdatasync`` after a writeback error would succeed and hide the loss.  The
image's sticky writeback error (``RawFileBackend.sync_error``) is one cell shared
by every data plane and the Python path.

Device state the thread uses (capacity, read-only, write-through) reaches it
through one call, ``update_state``, whenever the device changes it (resize, WCE).
Inflight tracking (vhost-user reconnect) is kept in the same shared region layout
the Python tracker uses.

The thread stops when the ring's scope is cancelled (ring stop, reset,
disconnect): ``stop`` is set and a wake eventfd is written; the data plane
returns once the batch in hand is completed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING

import trio

from virtio.errors import DriverError
from virtio.native import ffi, lib
from virtio.queues.virtqueue import Virtqueue

if TYPE_CHECKING:
    from virtio.device import ActiveDevice
    from virtio.devices.blk.device import VirtioBlk

log = logging.getLogger(__name__)

_TAKE = 64


class BlkDataPlane:
    """One queue's native data plane.  ``supported`` says whether it can run."""

    def __init__(self, device: VirtioBlk, active: ActiveDevice, index: int) -> None:
        self.device = device
        self.active = active
        self.index = index
        self.queue: Virtqueue = active.queues[index]
        self.notifier = active.notifiers[index]
        self._dp = None
        self._keep: list[object] = []
        self._fallback = False

    @staticmethod
    def supported(device: VirtioBlk, active: ActiveDevice, index: int) -> bool:
        notifier = active.notifiers[index]
        return (
            os.environ.get("PYVIRTIO_BLK_DATAPLANE", "1") != "0"
            and getattr(device, "native_dataplane", True)
            and isinstance(getattr(notifier, "kick_fd", None), int)
            and hasattr(notifier, "call_fd")
            and not getattr(notifier, "poll_fallback", False)
            and isinstance(getattr(device.backend, "fd", None), int)
        )

    # -- setup ------------------------------------------------------------------------
    def _build(self) -> None:
        dp = ffi.new("struct blk_dp *")
        if lib.blk_dp_init(dp):
            raise MemoryError("blk_dp_init failed")
        dchains = ffi.new("struct vq_chain[]", lib.BLK_DP_DEFER_MAX)
        dsegs = ffi.new("struct vq_seg[]", lib.BLK_DP_DEFER_SEGS)
        derr = ffi.new("int32_t[]", lib.BLK_DP_DEFER_MAX)
        self._keep += [dchains, dsegs, derr]
        dp.dchains, dp.dsegs, dp.derr = dchains, dsegs, derr
        dp.q = self.queue.native
        dp.img_fd = self.device.backend.fd
        cell = getattr(self.device.backend, "sync_error_cell", None)
        dp.sync_err = cell if cell is not None else ffi.NULL
        self._dp = dp
        self.update_state()
        dp.wake_fd = self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        dp.defer_fd = self._defer = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        area = getattr(getattr(self.queue, "inflight", None), "area", None)
        if area is not None and not self.queue.packed:
            region = ffi.from_buffer(area.region, require_writable=True)
            self._keep.append(region)
            dp.inflight = ffi.cast("uint8_t *", region)
            dp.inflight_num = area.desc_num
            dp.inflight_counter = area.counter
        self._area = area
        self._load_fds(dp)

    def _load_fds(self, dp) -> None:
        call = self.notifier.call_fd
        dp.kick_fd = self.notifier.kick_fd
        dp.call_fd = -1 if call is None else call

    def update_state(self) -> None:
        """Copy the device state the thread decides by (capacity, read-only,
        write-through) into it; the device calls this whenever one of them changes."""
        dp = self._dp
        if dp is None:
            return
        dev = self.device
        dp.read_only = int(dev.read_only)
        dp.guard_sector0 = int(dev.guard_format_change)
        dp.writethrough = int(dev.writethrough)
        dp.capacity = dev.capacity  # an aligned 64-bit store: the thread reads it whole

    def fds_changed(self) -> None:
        """The ring's kick or call eventfd was replaced: the thread picks them up.

        Called before the old fds are closed.  Without a kick eventfd (NOFD) the
        data plane stops and the Python loop (which can poll) takes over."""
        dp = self._dp
        if dp is None:
            return
        call = self.notifier.call_fd
        kick = self.notifier.kick_fd
        if not isinstance(kick, int):
            kick = -1
            dp.stop = 1
            self._fallback = True
        # Under the data plane's lock: afterwards the thread never touches the old fds.
        lib.blk_dp_set_fds(dp, kick, -1 if call is None else call)
        os.eventfd_write(self._wake, 1)

    def debug_state(self) -> str:
        """One line for diagnostics: ring indices as the driver and we see them."""
        q = self.queue
        st = q.state()
        try:
            avail = q.memory.read_u16(st.driver_addr + 2) if not st.packed else -1
        except Exception:  # memory gone: report what we have
            avail = -1
        stats = self.statistics()
        return (
            f"avail_idx={avail} next_avail={q.next_avail} used={q.next_used} "
            f"kicks={stats.get('kicks')} calls={stats.get('calls')} reqs={stats.get('requests')} "
            f"deferred={stats.get('deferred')} rescues={stats.get('rescues')} "
            f"kick_fd={self._dp.kick_fd} call_fd={self._dp.call_fd}"
        )

    def _syncs(self) -> int:
        return int(self._dp.syncs) if self._dp is not None else 0

    def statistics(self) -> dict[str, int]:
        dp = self._dp
        names = (
            "requests", "batches", "reads", "writes", "flushes", "syncs", "deferred", "kicks",
            "calls", "rescues", "io_errors",
        )  # fmt: skip
        return {n: int(getattr(dp, n)) for n in names} if dp is not None else {}

    # -- running ------------------------------------------------------------------------
    async def run(self) -> bool:
        """Serve the queue until cancelled.  Returns False if the Python loop must take
        over (no usable kick eventfd any more)."""
        self._build()
        dp = self._dp
        self.queue.set_locking(True)
        listeners = getattr(self.notifier, "listeners", None)
        if listeners is not None:
            listeners.append(self.fds_changed)
        self.device._dataplanes.add(self)
        log.info(
            "vq%d: native data plane on (kick fd %d, call fd %d, inflight %s)",
            self.index,
            dp.kick_fd,
            dp.call_fd,
            "tracked" if self._area is not None else "untracked",
        )
        counters = getattr(self.device.backend, "native_sync_counters", None)
        syncs = self._syncs
        if counters is not None:
            counters.append(syncs)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_cancel)
                nursery.start_soon(self._deferred_loop, nursery)
                rc = await trio.to_thread.run_sync(lib.blk_dp_run, dp)
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
                raise OSError(-rc, f"virtio-blk data plane stopped: {os.strerror(-rc)}")
            return True
        finally:
            log.info("vq%d: native data plane off: %s", self.index, self.statistics())
            if self._area is not None:
                self._area.counter = max(self._area.counter, int(dp.inflight_counter))
            self.device._dataplanes.discard(self)
            if counters is not None:
                counters.remove(syncs)
                self.device.backend._sync_calls += int(dp.syncs)  # keep the total
            if listeners is not None and self.fds_changed in listeners:
                listeners.remove(self.fds_changed)
            self.queue.set_locking(False)
            os.close(self._wake)
            os.close(self._defer)

    async def _stop_on_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._dp.stop = 1
            os.eventfd_write(self._wake, 1)

    async def _deferred_loop(self, nursery: trio.Nursery) -> None:
        chains = ffi.new("struct vq_chain[]", _TAKE)
        segs = ffi.new("struct vq_seg[]", lib.BLK_DP_DEFER_SEGS)
        errs = ffi.new("int32_t[]", _TAKE)
        while True:
            await trio.lowlevel.wait_readable(self._defer)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._defer)
            while n := lib.blk_dp_take(self._dp, chains, _TAKE, segs, lib.BLK_DP_DEFER_SEGS, errs):
                taken = [self.queue.chain_from_native(chains + i, segs) for i in range(n)]
                tracker = self.queue.inflight
                if tracker is not None:
                    tracker.on_pop(taken)
                for i, chain in enumerate(taken):
                    nursery.start_soon(self._serve_deferred, chain, int(errs[i]))
                os.eventfd_write(self._wake, 1)  # room again for the thread's next batch

    async def _serve_deferred(self, chain, err: int) -> None:
        try:
            if err:
                exc = OSError(err, f"data plane I/O failed: {os.strerror(err)}")
                written = self.device.complete_failed(chain, exc)
            else:
                written = await self.device.handle(self.index, chain)
        except DriverError as exc:
            self.device._driver_error(self.active, exc)
            return
        if self.queue.broken:
            return
        self.queue.add_used(chain, written)
        if self.queue.needs_notification():
            self.notifier.notify_used()
