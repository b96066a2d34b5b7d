"""``Qcow2Backend``: a qcow2 image (and its backing chain) as a ``BlockBackend``.

The image code (``image.py``) is blocking; requests run in one worker thread at a
time through the same ``_ThreadBatcher`` as ``RawFileBackend`` (requests ready in
the same scheduler tick share one thread hop, and one flush for all those that
asked for durability).  The guest sees the virtual size.  There is no ``fd``
attribute: the native data plane serves raw files only, so every qcow2 request
takes the Python path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import trio

from virtio.devices.blk.backend import Range, _ThreadBatcher
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
        max_batch: int = 16,
    ) -> None:
        self.path = os.fspath(path)
        self.image = Qcow2Image(
            self.path,
            read_only=read_only,
            lock=lock,
            l2_cache_size=l2_cache_size,
            refcount_cache_size=refcount_cache_size,
        )
        self._batcher = _ThreadBatcher(
            self.image.flush, trio.CapacityLimiter(1), max_hops=1, max_batch=max_batch
        )

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
        if self.image.read_only:
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
        self.image.close()

    def __enter__(self) -> Qcow2Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nothing() -> None:
    pass
