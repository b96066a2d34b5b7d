"""``Qcow2Backend``: a qcow2 image (and its backing chain) as a ``BlockBackend``.

The image code (``image.py``) is blocking; requests run in one worker thread at a
time through the same ``_ThreadBatcher`` as ``RawFileBackend`` (requests ready in
the same scheduler tick share one thread hop, and one flush for all those that
asked for durability).  The guest sees the virtual size.

The native data plane serves reads of allocated clusters, and writes into those the
image owns, itself: ``fd`` (the image, ``O_DIRECT`` with ``cache="none"``, writable
unless the image is read-only), ``backing_fd`` (a raw backing file, for reads of
clusters the image does not have) and ``native_map()`` (the cluster map,
``native.py``); every other request is deferred to this Python path.  Cache modes
as for raw images: ``none`` reads allocated clusters with ``O_DIRECT`` (the Python
path -- metadata, copy-on-write, backing files -- stays buffered, and a FLUSH makes
all of it durable), ``writethrough`` is the device's write cache off,
``unsafe`` ignores flushes (metadata is still written on close).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import trio

from virtio.devices.blk.backend import CACHE_MODES, Range, _ThreadBatcher, block_sizes
from virtio.devices.blk.qcow2.hostfile import RawLayer
from virtio.devices.blk.qcow2.image import Qcow2Image
from virtio.errors import BackendIOError


class Qcow2Backend:
    """A qcow2 image: exclusively locked when writable, its backing files opened
    read-only and shared-locked.  ``l2_cache_size`` / ``refcount_cache_size`` are in
    bytes (None: QEMU's defaults)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        lock: bool = True,
        l2_cache_size: int | None = None,
        refcount_cache_size: int | None = None,
        cache: str = "writeback",
        max_batch: int = 16,
    ) -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
        self.path = os.fspath(path)
        self.cache = cache
        self.direct = cache == "none"
        self.image = Qcow2Image(
            self.path,
            read_only=read_only,
            lock=lock,
            l2_cache_size=l2_cache_size,
            refcount_cache_size=refcount_cache_size,
        )
        image = self.image
        try:
            self.fd = image.f.fileno
            """What the native data plane reads and writes allocated clusters through."""
            if self.direct:  # writable like the image: owned clusters are written here
                mode = os.O_RDONLY if read_only else os.O_RDWR
                self.fd = os.open(self.path, mode | os.O_CLOEXEC | os.O_DIRECT)
            self.logical_block_size, _, self.mem_align = block_sizes(self.fd)
            self.backing_fd = self._open_backing_fd()
        except BaseException:
            if self.fd != image.f.fileno:
                os.close(self.fd)
            image.close()
            raise
        sync = _nothing if cache == "unsafe" else image.flush
        self._batcher = _ThreadBatcher(
            sync, trio.CapacityLimiter(1), max_hops=1, max_batch=max_batch
        )

    def _open_backing_fd(self) -> int:
        """The raw backing file for the data plane's reads of unallocated clusters
        (``O_DIRECT`` under ``cache="none"``, block sizes no larger than the image's),
        or -1: a qcow2 or NBD backing file, a deeper chain, or none."""
        layer = self.image.backing
        if not isinstance(layer, RawLayer):
            return -1
        if not self.direct:
            return layer.file.fileno
        fd = os.open(layer.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        lbs, _, align = block_sizes(fd)
        if lbs > self.logical_block_size or align > self.mem_align:
            os.close(fd)
            return -1
        return fd

    def native_map(self) -> Any:
        """The image's cluster map for the native data plane (``struct qcow2_map *``)."""
        return self.image.enable_native_reads(backing=self.backing_fd >= 0).c

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def read_only(self) -> bool:
        return self.image.read_only

    @property
    def can_unmap(self) -> bool:
        return not self.image.read_only

    @property
    def sync_error(self) -> int:
        """errno of the first failed ``fdatasync`` of the image (sticky), or 0."""
        return self.image.f.sync_error

    @property
    def sync_calls(self) -> int:
        return self.image.f.sync_calls

    def _check_writable(self) -> None:
        if self.image.read_only:
            raise BackendIOError(f"{self.path!r} is open read-only")

    async def read(self, offset: int, views: Sequence[memoryview]) -> None:
        image = self.image
        await self._batcher.run(lambda: image.read(offset, views))

    async def write(self, offset: int, views: Sequence[memoryview], *, sync: bool = False) -> None:
        self._check_writable()
        image = self.image
        await self._batcher.run(lambda: image.write(offset, views), sync=sync)

    async def flush(self) -> None:
        if self.image.read_only or self.cache == "unsafe":
            return
        await self._batcher.run(_nothing, sync=True)

    async def discard(self, ranges: Sequence[Range], *, sync: bool = False) -> None:
        self._check_writable()
        await self._batcher.run(lambda: self._zero(ranges, unmap=True, discard=True), sync=sync)

    async def write_zeroes(
        self, ranges: Sequence[Range], *, unmap: bool, sync: bool = False
    ) -> None:
        self._check_writable()
        await self._batcher.run(lambda: self._zero(ranges, unmap=unmap, discard=False), sync=sync)

    def _zero(self, ranges: Sequence[Range], *, unmap: bool, discard: bool) -> None:
        for offset, length in ranges:
            if length:
                self.image.zero(offset, length, unmap=unmap, discard=discard)

    def close(self) -> None:
        """Write back the metadata and release the images (and their locks)."""
        if self.fd != self.image.f.fileno and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        backing = self.image.backing
        if self.backing_fd >= 0 and not (
            isinstance(backing, RawLayer) and self.backing_fd == backing.file.fileno
        ):
            os.close(self.backing_fd)
        self.backing_fd = -1
        self.image.close()

    def __enter__(self) -> Qcow2Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nothing() -> None:
    pass
