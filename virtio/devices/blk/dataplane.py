"""virtio-blk's native data plane: the generic one (``virtio/dataplane.py``) with the
blk fast path (``virtio/native/blk_dataplane.c``: well-formed IN / OUT / FLUSH with
``preadv`` / ``pwritev`` / ``fdatasync`` straight into guest memory).

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

import os
from typing import TYPE_CHECKING, Any, ClassVar

from virtio.dataplane import NativeDataPlane
from virtio.native import ffi, lib

if TYPE_CHECKING:
    from virtio.device import ActiveDevice
    from virtio.devices.blk.device import VirtioBlk
    from virtio.queues.chain import DescriptorChain


class BlkDataPlane(NativeDataPlane):
    """One virtio-blk queue's native data plane."""

    c_type: ClassVar[str] = "struct blk_dp"
    device_statistics: ClassVar[tuple[str, ...]] = ("reads", "writes", "flushes", "syncs")
    device: VirtioBlk

    @staticmethod
    def supported(device: VirtioBlk, active: ActiveDevice, index: int) -> bool:
        return (
            os.environ.get("PYVIRTIO_BLK_DATAPLANE", "1") != "0"
            and device.native_dataplane
            and NativeDataPlane.notifier_supported(active, index)
            and isinstance(getattr(device.backend, "fd", None), int)
        )

    def attach(self, c: Any) -> None:
        backend = self.device.backend
        c.img_fd = backend.fd
        cell = getattr(backend, "sync_error_cell", None)
        c.sync_err = cell if cell is not None else ffi.NULL
        lib.blk_dp_attach(c)

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
        return self.device.complete_failed(chain, exc)

    def syncs(self) -> int:
        """``fdatasync`` calls of this data plane so far."""
        return int(self.c.syncs) if self.c is not None else 0
