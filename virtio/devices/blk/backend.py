"""Storage behind a virtio-blk device: the ``BlockBackend`` protocol and two backends.

* ``RawFileBackend``: a raw image file or block device.  Reads and writes go
  straight between the file and guest memory with ``os.preadv``/``os.pwritev`` on
  the chain's memoryviews (zero copy).  FLUSH is ``fdatasync`` (durable); a failed
  ``fdatasync`` sets the image's sticky ``sync_error`` and every later one fails
  with it (Linux reports a writeback error once and may have dropped the dirty
  pages, so a later success would be a lie; QEMU's file-posix does the same);
  DISCARD punches holes (``fallocate(PUNCH_HOLE|KEEP_SIZE)``); WRITE_ZEROES punches
  holes (UNMAP) or zeroes ranges (``FALLOC_FL_ZERO_RANGE``), falling back to
  writing zeros.  The blocking calls run in worker threads
  (``trio.to_thread.run_sync`` under a ``CapacityLimiter``); requests that become
  ready in the same scheduler tick share one thread hop and one ``fdatasync``
  (``_ThreadBatcher``).  The image is locked (an OFD lock over the whole file,
  like QEMU's ``file-posix`` locking) so a second user gets ``ImageLockedError``.
  Cache modes as QEMU's ``cache=``: ``writeback`` (page cache; FLUSH syncs),
  ``none`` (``O_DIRECT``: no host page cache, the disk's volatile cache is
  flushed by FLUSH), ``writethrough`` (the device starts with its write cache
  off: every write is durable before it completes) and ``unsafe`` (page cache,
  every sync ignored: for scratch disks).  With ``O_DIRECT`` the Python path
  (requests the native data plane defers) uses a second, buffered descriptor of
  the same file, so that guest buffers and 512-byte requests need no alignment;
  Linux keeps the two coherent (direct reads write back dirty cached pages first,
  direct writes invalidate them).  The sticky flush error does not apply with
  ``O_DIRECT`` (as in QEMU: no dirty page cache can be dropped behind our back).
  ``block_sizes`` reads the real logical / physical block sizes and memory
  alignment (``BLKSSZGET``/``BLKPBSZGET``, ``statx`` STATX_DIOALIGN).
* ``MemoryBackend``: a ``bytearray``, for tests.

Offsets and lengths are in bytes; the device has already checked them against
``size`` (virtio-blk capacity, §5.2.4).  Failures raise ``OSError`` or
``BackendIOError``; the device turns them into VIRTIO_BLK_S_IOERR.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import trio

from virtio.errors import BackendIOError
from virtio.native import ffi as native_ffi
from virtio.native import lib as native_lib

log = logging.getLogger(__name__)

Range = tuple[int, int]
"""(byte offset, byte length)."""

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
"""``<linux/falloc.h>``."""

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_ZERO_CHUNK = 1 << 20
_NOT_SUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})


class ImageLockedError(BackendIOError):
    """Another user (process or open file) holds a conflicting lock on the image."""

    def __init__(self, path: str, read_only: bool, holders: Sequence[int] = ()) -> None:
        self.path = path
        self.read_only = read_only
        self.holders = list(holders)
        want = "shared (read-only)" if read_only else "exclusive (read-write)"
        who = f" (pid {', '.join(map(str, self.holders))})" if self.holders else ""
        super().__init__(
            f"cannot take a {want} lock on {path!r}: the image is in use by another process{who}"
        )


def lock_holders(path: str) -> list[int]:
    """Pids of processes holding a lock on ``path``, from ``/proc/PID/fdinfo`` (OFD
    locks show pid -1 in ``/proc/locks``; the fdinfo of the holding fd names them).
    Best effort: processes we may not inspect are left out."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    me = os.getpid()
    found: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{name}/fdinfo/{fd}") as f:
                    if any(line.startswith("lock:") and key in line for line in f):
                        found.add(int(name))
                        break
            except OSError:
                continue
    return sorted(found)


@runtime_checkable
class BlockBackend(Protocol):
    """What ``VirtioBlk`` needs from storage (all offsets/lengths in bytes)."""

    @property
    def size(self) -> int:
        """Image size in bytes (capacity = size // 512)."""

    @property
    def read_only(self) -> bool: ...

    @property
    def can_unmap(self) -> bool:
        """Whether discard / unmapping write-zeroes really deallocate (the config
        field ``write_zeroes_may_unmap``, §5.2.6.2)."""

    async def read(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` with the bytes at ``offset``."""

    async def write(self, offset: int, views: Sequence[memoryview], *, sync: bool) -> None:
        """Write ``views`` at ``offset``; ``sync`` makes it durable before returning."""

    async def flush(self) -> None:
        """Make every completed write durable."""

    async def discard(self, ranges: Sequence[Range], *, sync: bool) -> None:
        """Deallocate ``ranges`` if possible (contents afterwards are undefined)."""

    async def write_zeroes(self, ranges: Sequence[Range], *, unmap: bool, sync: bool) -> None:
        """Zero ``ranges``; with ``unmap`` the space may be deallocated."""

    def close(self) -> None: ...


CACHE_MODES = ("none", "writeback", "writethrough", "unsafe")
"""QEMU's ``cache=`` modes (``directsync`` is not offered)."""
_BLKSSZGET = 0x1268
_BLKPBSZGET = 0x127B
_STATX_DIOALIGN = 0x2000
_STATX = struct.Struct("<IIQIIIHH")  # mask, blksize, attributes, nlink, uid, gid, mode
_STATX_DIO_OFFSET = 0x98  # stx_dio_mem_align, stx_dio_offset_align (u32 each)


def block_sizes(fd: int) -> tuple[int, int, int]:
    """(logical block size, physical block size, memory alignment) of an open image:
    ``BLKSSZGET``/``BLKPBSZGET`` for a block device; for a file the direct-I/O
    offset and memory alignment from ``statx`` (STATX_DIOALIGN, Linux >= 6.1) and
    the file system block size as the physical size.  512 where unknown."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = bytearray(4)
        fcntl.ioctl(fd, _BLKSSZGET, buf)
        logical = int.from_bytes(buf, "little")
        fcntl.ioctl(fd, _BLKPBSZGET, buf)
        physical = int.from_bytes(buf, "little")
        return logical, max(physical, logical), logical
    logical = mem = 512
    buf = native_ffi.new("uint8_t[256]")
    if native_lib.vm_statx_fd(fd, _STATX_DIOALIGN, buf) == 0:
        raw = bytes(native_ffi.buffer(buf, 256))
        if _STATX.unpack_from(raw)[0] & _STATX_DIOALIGN:
            mem, offset = struct.unpack_from("<II", raw, _STATX_DIO_OFFSET)
            if offset:  # 0: no direct I/O on this file
                logical = max(offset, 512)
                mem = max(mem, 1)
    physical = max(logical, st.st_blksize if st.st_blksize & (st.st_blksize - 1) == 0 else 0)
    return logical, min(physical, 1 << 16), mem


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` (Linux); raises ``OSError``."""
    if (err := -native_lib.vm_fallocate(fd, mode, offset, length)) != 0:
        raise OSError(err, f"fallocate(mode={mode:#x}): {os.strerror(err)}")


# -- vectored I/O that copes with short transfers and IOV_MAX ----------------------------
def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` minus their first ``n`` bytes."""
    i = 0
    while n and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


def preadv_all(fd: int, offset: int, views: Sequence[memoryview]) -> None:
    pending = [v for v in views if len(v)]
    while pending:
        chunk = pending[:_IOV_MAX]
        n = os.preadv(fd, chunk, offset)
        if n == 0:
            raise BackendIOError(f"unexpected end of image at offset {offset}")
        offset += n
        pending = _advance(pending, n)


def pwritev_all(fd: int, offset: int, views: Sequence[memoryview]) -> None:
    pending = [v for v in views if len(v)]
    while pending:
        chunk = pending[:_IOV_MAX]
        n = os.pwritev(fd, chunk, offset)
        if n == 0:
            raise BackendIOError(f"image write made no progress at offset {offset}")
        offset += n
        pending = _advance(pending, n)


# -- batching thread hops ------------------------------------------------------------------
class _Job:
    __slots__ = ("done", "error", "fn", "lead", "sync", "wake")

    def __init__(self, fn: Callable[[], None], sync: bool) -> None:
        self.fn = fn
        self.sync = sync
        self.error: BaseException | None = None
        self.done = False
        self.lead = False
        self.wake = trio.Event()


class _ThreadBatcher:
    """Run blocking jobs in worker threads with at most ``max_hops`` thread hops in
    flight; jobs that arrive while every hop is busy queue up and go together in
    the next hop (up to ``max_batch`` per hop, one ``sync_fn`` call for all of
    those that asked for durability).

    A lone job goes at once (no added latency at queue depth 1); under load the
    batch size grows by itself.  When a hop finishes, its leader hands the lead to
    the oldest queued job.  Waiting is shielded from cancellation: a device reset
    waits for submitted I/O to finish (like QEMU's ``blk_drain``), so guest memory
    is never touched after the device stopped.
    """

    def __init__(
        self,
        sync_fn: Callable[[], None],
        limiter: trio.CapacityLimiter,
        max_hops: int = 8,
        max_batch: int = 16,
    ) -> None:
        self._sync_fn = sync_fn
        self._limiter = limiter
        self._max_hops = max_hops
        self._max_batch = max_batch
        self._pending: list[_Job] = []
        self._hops = 0
        self.batches = 0
        """Thread hops so far (statistics)."""

    async def run(self, fn: Callable[[], None], *, sync: bool = False) -> None:
        job = _Job(fn, sync)
        self._pending.append(job)
        with trio.CancelScope(shield=True):
            if self._hops < self._max_hops:
                self._hops += 1
                await self._lead()
            while not job.done:
                await job.wake.wait()
                if job.lead and not job.done:
                    job.lead = False
                    job.wake = trio.Event()
                    await self._lead()
        if job.error is not None:
            raise job.error

    async def _lead(self) -> None:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        self.batches += 1
        try:
            await trio.to_thread.run_sync(self._work, batch, limiter=self._limiter)
        finally:
            for job in batch:
                job.done = True
                job.wake.set()
            if self._pending:
                nxt = self._pending[0]
                nxt.lead = True
                nxt.wake.set()
            else:
                self._hops -= 1

    def _work(self, chunk: list[_Job]) -> None:
        synced = []
        for job in chunk:
            try:
                job.fn()
            except BaseException as exc:  # handed to the submitter
                job.error = exc
            else:
                if job.sync:
                    synced.append(job)
        if synced:
            try:
                self._sync_fn()
            except OSError as exc:
                for job in synced:
                    job.error = exc


# -- backends ------------------------------------------------------------------------------
_FLOCK = struct.Struct("hhqqi4x")
"""``struct flock`` on 64-bit Linux (l_type, l_whence, l_start, l_len, l_pid)."""


def _lock_image(fd: int, path: str, read_only: bool) -> None:
    """Lock the whole image: shared for read-only users, exclusive for writers.

    An OFD lock (per open file description, so two opens in one process also
    conflict) on every byte conflicts with QEMU's ``file-posix`` byte locks too;
    where OFD locks are missing, ``flock`` is used."""
    ofd = getattr(fcntl, "F_OFD_SETLK", None)
    try:
        if ofd is not None:
            ltype = fcntl.F_RDLCK if read_only else fcntl.F_WRLCK
            fcntl.fcntl(fd, ofd, _FLOCK.pack(ltype, os.SEEK_SET, 0, 0, 0))
        else:
            fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise ImageLockedError(path, read_only, lock_holders(path)) from exc
        raise


def _unlock_image(fd: int) -> None:
    """Drop the lock ``_lock_image`` took on ``fd`` (the file stays open)."""
    ofd = getattr(fcntl, "F_OFD_SETLK", None)
    if ofd is not None:
        fcntl.fcntl(fd, ofd, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


class RawFileBackend:
    """A raw image (regular file or block device) accessed with positional vectored
    I/O from worker threads."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        lock: bool = True,
        cache: str = "writeback",
        max_threads: int = 32,
        max_hops: int = 8,
        max_batch: int = 16,
    ) -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
        self.path = os.fspath(path)
        self._read_only = read_only
        self.cache = cache
        """QEMU's ``cache=`` mode (module doc)."""
        self.direct = cache == "none"
        """The image is opened ``O_DIRECT`` (``fd``; ``io_fd`` is buffered)."""
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(self.path, flags | (os.O_DIRECT if self.direct else 0))
        self.io_fd = self.fd
        """The descriptor of the Python path (buffered also with ``O_DIRECT``)."""
        self.lock_held = False
        """This back-end holds the image's lock (``take_lock`` / ``release_lock``)."""
        try:
            if lock:
                self.take_lock()
            self._size = os.lseek(self.fd, 0, os.SEEK_END)
            self.logical_block_size, self.physical_block_size, self.mem_align = block_sizes(self.fd)
            if self.direct:
                self.io_fd = os.open(self.path, flags)
        except BaseException:
            os.close(self.fd)
            raise
        self._punch_ok = True
        self._zero_range_ok = True
        self.limiter = trio.CapacityLimiter(max_threads)
        self._batcher = _ThreadBatcher(self._fdatasync, self.limiter, max_hops, max_batch)
        self._sync_calls = 0
        self.sync_error_cell = native_ffi.new("int *")
        """The sticky writeback error (an errno, 0 while none), shared with the native
        data planes: one cell for every path that syncs this image."""
        self._sync_sources: list[Callable[[], int]] = []

    # -- properties ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def can_unmap(self) -> bool:
        return self._punch_ok and not self._read_only

    @property
    def sync_error(self) -> int:
        """errno of the first failed ``fdatasync`` (sticky), or 0."""
        return int(self.sync_error_cell[0])

    def refresh_size(self) -> int:
        """Re-read the image's size (it was grown or shrunk under us) and return it."""
        self._size = os.lseek(self.fd, 0, os.SEEK_END)
        return self._size

    @property
    def sync_calls(self) -> int:
        """``fdatasync`` calls so far, from Python and native data planes (statistics,
        and for tests)."""
        return self._sync_calls + sum(count() for count in self._sync_sources)

    def add_sync_source(self, count: Callable[[], int]) -> None:
        """Count ``count()`` (a native data plane's ``fdatasync`` calls) in ``sync_calls``."""
        self._sync_sources.append(count)

    def remove_sync_source(self, count: Callable[[], int]) -> None:
        """Stop asking ``count``; what it counted so far stays in the total."""
        self._sync_sources.remove(count)
        self._sync_calls += count()

    @property
    def batches(self) -> int:
        """Worker-thread hops so far."""
        return self._batcher.batches

    # -- blocking primitives (worker threads) ---------------------------------------------
    def _fdatasync(self) -> None:
        if self.cache == "unsafe":
            return
        err = self.sync_error
        if err:
            raise OSError(err, f"an earlier flush of {self.path!r} failed: {os.strerror(err)}")
        self._sync_calls += 1
        try:
            os.fdatasync(self.io_fd)
        except OSError as exc:
            if self.sync_error_cell[0] == 0 and not self.direct:
                self.sync_error_cell[0] = exc.errno or errno.EIO
            raise

    def _zero_write(self, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        while length:
            n = min(length, len(zeros))
            pwritev_all(self.io_fd, offset, [zeros[:n]])
            offset += n
            length -= n

    def _punch(self, offset: int, length: int) -> bool:
        if not self._punch_ok:
            return False
        try:
            fallocate(self.io_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED:
                raise
            self._punch_ok = False
            return False
        return True

    def _zero_range(self, offset: int, length: int) -> bool:
        if not self._zero_range_ok:
            return False
        try:
            fallocate(self.io_fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED:
                raise
            self._zero_range_ok = False
            return False
        return True

    def _do_discard(self, ranges: Sequence[Range]) -> None:
        for offset, length in ranges:
            if length:
                self._punch(offset, length)  # discard MAY deallocate: no-op if unsupported

    def _do_write_zeroes(self, ranges: Sequence[Range], unmap: bool) -> None:
        for offset, length in ranges:
            if not length:
                continue
            if unmap and self._punch(offset, length):
                continue
            if self._zero_range(offset, length):
                continue
            self._zero_write(offset, length)

    def _check_writable(self) -> None:
        if self._read_only:
            raise BackendIOError(f"{self.path!r} is open read-only")

    # -- BlockBackend ------------------------------------------------------------------
    async def read(self, offset: int, views: Sequence[memoryview]) -> None:
        fd = self.io_fd
        await self._batcher.run(lambda: preadv_all(fd, offset, views))

    async def write(self, offset: int, views: Sequence[memoryview], *, sync: bool = False) -> None:
        self._check_writable()
        fd = self.io_fd
        await self._batcher.run(lambda: pwritev_all(fd, offset, views), sync=sync)

    async def flush(self) -> None:
        if self._read_only:
            return
        await self._batcher.run(_nothing, sync=True)

    async def discard(self, ranges: Sequence[Range], *, sync: bool = False) -> None:
        self._check_writable()
        await self._batcher.run(lambda: self._do_discard(ranges), sync=sync)

    async def write_zeroes(
        self, ranges: Sequence[Range], *, unmap: bool, sync: bool = False
    ) -> None:
        self._check_writable()
        await self._batcher.run(lambda: self._do_write_zeroes(ranges, unmap), sync=sync)

    # -- the image lock (live migration hands it over: docs/migration.md) ----------------
    def take_lock(self) -> None:
        """Lock the image (shared if read-only, else exclusive) unless held already;
        ``ImageLockedError`` naming the holders if another user has it."""
        if not self.lock_held:
            _lock_image(self.fd, self.path, self._read_only)
            self.lock_held = True

    def release_lock(self) -> None:
        """Let another user lock the image; the image stays open."""
        if self.lock_held:
            _unlock_image(self.fd)
            self.lock_held = False

    def close(self) -> None:
        self.lock_held = False
        if self.io_fd >= 0 and self.io_fd != self.fd:
            with contextlib.suppress(OSError):
                os.close(self.io_fd)
        self.io_fd = -1
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # releases the OFD lock
            self.fd = -1

    def __enter__(self) -> RawFileBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nothing() -> None:
    pass


class MemoryBackend:
    """A disk held in a ``bytearray`` (tests, scratch devices).  ``flushes`` counts
    ``flush`` calls and ``synced_writes`` the writes made with ``sync=True``."""

    def __init__(self, size_or_data: int | bytes | bytearray, *, read_only: bool = False) -> None:
        if isinstance(size_or_data, int):
            self.data = bytearray(size_or_data)
        else:
            self.data = bytearray(size_or_data)
        self._read_only = read_only
        self.flushes = 0
        self.synced_writes = 0

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def can_unmap(self) -> bool:
        return not self._read_only

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > len(self.data):
            raise BackendIOError(f"range [{offset}, +{length}) outside the {self.size}-byte disk")

    def _check_writable(self) -> None:
        if self._read_only:
            raise BackendIOError("memory disk is read-only")

    async def read(self, offset: int, views: Sequence[memoryview]) -> None:
        total = sum(len(v) for v in views)
        self._check(offset, total)
        for v in views:
            v[:] = self.data[offset : offset + len(v)]
            offset += len(v)
        await trio.lowlevel.checkpoint()

    async def write(self, offset: int, views: Sequence[memoryview], *, sync: bool = False) -> None:
        self._check_writable()
        self._check(offset, sum(len(v) for v in views))
        for v in views:
            self.data[offset : offset + len(v)] = v
            offset += len(v)
        self.synced_writes += sync
        await trio.lowlevel.checkpoint()

    async def flush(self) -> None:
        self.flushes += 1
        await trio.lowlevel.checkpoint()

    async def discard(self, ranges: Sequence[Range], *, sync: bool = False) -> None:
        await self.write_zeroes(ranges, unmap=True, sync=sync)

    async def write_zeroes(
        self, ranges: Sequence[Range], *, unmap: bool, sync: bool = False
    ) -> None:
        self._check_writable()
        for offset, length in ranges:
            self._check(offset, length)
        for offset, length in ranges:
            self.data[offset : offset + length] = bytes(length)
        self.synced_writes += sync
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        pass
