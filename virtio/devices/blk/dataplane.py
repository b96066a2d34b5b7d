"""virtio-blk's native data plane: the generic one (``virtio/dataplane.py``) with the
blk fast path (``virtio/native/blk_dataplane.c``: well-formed IN / OUT / FLUSH
straight between the image and guest memory, asynchronously on an io_uring per
queue, or on worker threads with ``--aio threads`` or where io_uring cannot be set
up; page-cache hits complete inline).

Everything else (GET_ID, DISCARD, WRITE_ZEROES, malformed or out-of-range
requests, sector-0 writes of a probed raw image) is deferred to
``VirtioBlk.handle``.  A request whose I/O failed in the thread is answered
VIRTIO_BLK_S_IOERR by ``VirtioBlk.complete_failed`` -- never retried: a second
``fdatasync`` after a writeback error would succeed and hide the loss.  The
image's sticky writeback error (``RawFileBackend.sync_error_cell``) is one cell
shared by every data plane and the Python path.

Device state the fast path decides by (capacity, read-only, write-through, the
sector-0 guard) reaches it through ``update_state``, which ``VirtioBlk`` calls
whenever one of them changes (resize, WCE, reset).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar

from virtio.dataplane import NativeDataPlane, QueueThread
from virtio.native import ffi, lib

if TYPE_CHECKING:
    from virtio.device import ActiveDevice
    from virtio.devices.blk.device import VirtioBlk
    from virtio.queues.chain import DescriptorChain

log = logging.getLogger(__name__)

ENGINES = {"threads": lib.BLK_AIO_THREADS, "io_uring": lib.BLK_AIO_URING}
"""``--aio`` names and the C engine numbers."""
_uring_usable: bool | None = None


def uring_usable() -> bool:
    """Whether io_uring works here (built with liburing, allowed by the kernel and
    seccomp); asked once per process, a fallback is logged once."""
    global _uring_usable
    if _uring_usable is None:
        _uring_usable = bool(lib.aio_uring_usable())
        if not _uring_usable:
            log.warning("io_uring is not available here: the data planes use worker threads")
    return _uring_usable


def engine_for(aio: str) -> str:
    """The engine that serves ``aio`` here (``io_uring`` falls back to ``threads``)."""
    return "io_uring" if aio == "io_uring" and uring_usable() else "threads"


class BlkDataPlane(NativeDataPlane):
    """One virtio-blk queue's native data plane."""

    c_type: ClassVar[str] = "struct blk_dp"
    device_statistics: ClassVar[tuple[str, ...]] = (
        "reads", "writes", "flushes", "syncs", "inline_done", "bounced", "uring_submits",
        "engine_used", "ring_wait", "qcow2_reads", "qcow2_writes",
        "qcow2_deferred", "qcow2_backing_reads",
    )  # fmt: skip
    device: VirtioBlk

    @staticmethod
    def supported(device: VirtioBlk, active: ActiveDevice, index: int) -> bool:
        return (
            os.environ.get("PYVIRTIO_BLK_DATAPLANE", "1") != "0"
            and device.native_dataplane
            and NativeDataPlane.notifier_supported(active, index)
            and isinstance(getattr(device.backend, "fd", None), int)
        )

    async def prepare(self) -> bool:
        """Get what the thread needs before it starts; False: the Python loop serves."""
        return True

    def close_unused(self) -> None:
        """Release what ``prepare`` got when the data plane does not run after all."""

    def attach(self, c: Any) -> None:
        backend = self.device.backend
        c.img_fd = backend.fd
        cell = getattr(backend, "sync_error_cell", None)
        c.sync_err = cell if cell is not None else ffi.NULL
        c.direct = int(getattr(backend, "direct", False))
        c.no_flush = int(getattr(backend, "cache", "") == "unsafe")
        c.logical_block = getattr(backend, "logical_block_size", 512)
        c.mem_align = getattr(backend, "mem_align", 512)
        native_map = getattr(backend, "native_map", None)  # qcow2: allocated-cluster reads
        c.qmap = native_map() if native_map is not None else ffi.NULL
        c.backing_fd = getattr(backend, "backing_fd", -1)  # qcow2 over a raw file
        c.engine = ENGINES[engine_for(getattr(self.device.options, "aio", "io_uring"))]
        c.threads = 16
        faults = os.environ.get("PYVIRTIO_FAULTS_DIR")
        if faults:  # tests: virtio.testing.faults reaches io_uring operations too
            lib.dp_set_fault_dir(os.fsencode(faults))
        lib.blk_dp_attach(c)

    def detach(self) -> None:
        lib.blk_dp_detach(self.c)

    def queue_thread(self) -> QueueThread | None:
        """With ``data_plane_threads`` N (io_uring), queue i is served by thread i mod N of
        the device.  (The NBD data plane waits in its own mechanism: a thread each.)"""
        n = self.device.options.data_plane_threads
        if not n or type(self) is not BlkDataPlane or self.c.engine != lib.BLK_AIO_URING:
            return None
        return self.device.queue_thread(self.index % n)

    def statistics(self) -> dict[str, int]:
        """The counters, and ``queue_thread``: the shared thread serving this queue
        (``--queue-threads``), or -1 for a thread of its own."""
        out = super().statistics()
        if out:
            n = self.device.options.data_plane_threads
            out["queue_thread"] = self.index % n if n and self.c.core.group != ffi.NULL else -1
        return out

    def update_state(self) -> None:
        c = self.c
        if c is None:
            return
        dev = self.device
        c.read_only = int(dev.read_only)
        c.writethrough = int(dev.writethrough)
        c.guard_sector0 = int(dev.guard_format_change)
        c.capacity = dev.capacity  # an aligned 64-bit store: the thread reads it whole

    def complete_failed(self, chain: DescriptorChain, err: int) -> int:
        exc = OSError(err, f"data plane I/O failed: {os.strerror(err)}")
        return self.device.complete_failed(chain, exc, self.index)

    def syncs(self) -> int:
        """``fdatasync`` calls of this data plane so far."""
        return int(self.c.syncs) if self.c is not None else 0
