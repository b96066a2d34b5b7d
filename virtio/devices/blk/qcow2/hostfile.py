"""The files under a qcow2 image: ``HostFile`` (positional I/O on the image file,
with the sticky flush error of ``RawFileBackend``, locked like QEMU locks images)
and ``RawLayer`` (a raw backing file, read-only and shared-locked)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Sequence

from virtio.devices.blk.backend import (
    _FLOCK,
    ImageLockedError,
    _lock_image,
    preadv_all,
    pwritev_all,
)
from virtio.errors import BackendIOError


def zero_views(views: Sequence[memoryview]) -> None:
    for v in views:
        v[:] = bytes(len(v))


class ViewCursor:
    """Walks a list of memoryviews, handing out the next ``n`` bytes as views."""

    __slots__ = ("_i", "_off", "_views")

    def __init__(self, views: Sequence[memoryview]) -> None:
        self._views = [v.cast("B") if v.format != "B" or v.ndim != 1 else v for v in views]
        self._i = 0
        self._off = 0

    def take(self, n: int) -> list[memoryview]:
        out = []
        while n:
            v = self._views[self._i]
            chunk = v[self._off : self._off + n]
            out.append(chunk)
            n -= len(chunk)
            self._off += len(chunk)
            if self._off == len(v):
                self._i += 1
                self._off = 0
        return out


# QEMU file-posix image locking: one byte per permission at PERM_BASE + bit (held
# by whoever has the permission) and at SHARED_BASE + bit (held by whoever does not
# share it with others), all read locks.  Permission bits: consistent read 0,
# write 1, write-unchanged 2, resize 3.
PERM_BASE = 100
SHARED_BASE = 200
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
READER = ((PERM_CONSISTENT_READ,), (PERM_WRITE, PERM_RESIZE))
"""A backing file (or a read-only image): reads, shares everything but write/resize."""
WRITER = (
    (PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE),
    (PERM_WRITE, PERM_RESIZE),
)
"""A writable image, as a QEMU guest disk: nobody else may write or resize it."""


def lock_like_qemu(fd: int, path: str, *, read_only: bool) -> None:
    """Lock an image the way QEMU's file-posix does, so that QEMU and qemu-img see
    it in use (``qemu-img info`` refuses a writer's image; ``-U`` still reads it;
    readers of a backing file coexist).  Raises ``ImageLockedError`` if another
    user holds a permission we do not share, or does not share one we take."""
    ofd_get = getattr(fcntl, "F_OFD_GETLK", None)
    ofd_set = getattr(fcntl, "F_OFD_SETLK", None)
    if ofd_get is None or ofd_set is None:
        _lock_image(fd, path, read_only)
        return
    perms, unshared = READER if read_only else WRITER

    def held(byte: int) -> bool:
        got = fcntl.fcntl(fd, ofd_get, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return _FLOCK.unpack(got)[0] != fcntl.F_UNLCK

    conflicts = [SHARED_BASE + p for p in perms] + [PERM_BASE + p for p in unshared]
    if any(held(byte) for byte in conflicts):
        raise ImageLockedError(path, read_only)
    try:
        for byte in [PERM_BASE + p for p in perms] + [SHARED_BASE + p for p in unshared]:
            fcntl.fcntl(fd, ofd_set, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(path, read_only) from exc
        raise


class HostFile:
    """An open image file: ``pread``/``pwrite``/``preadv``/``pwritev`` and ``sync``
    (``fdatasync``; a failure is sticky, as in ``RawFileBackend``)."""

    def __init__(self, path: str, *, read_only: bool, lock: bool) -> None:
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fileno = os.open(path, flags)
        try:
            if lock:
                lock_like_qemu(self.fileno, path, read_only=read_only)
            self.size = os.fstat(self.fileno).st_size
        except BaseException:
            os.close(self.fileno)
            raise
        self.sync_error = 0
        self.sync_calls = 0

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes (fewer only at the end of the file)."""
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(self.fileno, length - len(out), offset + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def preadv(self, offset: int, views: Sequence[memoryview]) -> None:
        preadv_all(self.fileno, offset, views)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        pwritev_all(self.fileno, offset, [memoryview(data)])

    def pwritev(self, offset: int, views: Sequence[memoryview]) -> None:
        pwritev_all(self.fileno, offset, views)

    def sync(self) -> None:
        if self.sync_error:
            raise OSError(
                self.sync_error,
                f"an earlier flush of {self.path!r} failed: {os.strerror(self.sync_error)}",
            )
        self.sync_calls += 1
        try:
            os.fdatasync(self.fileno)
        except OSError as exc:
            self.sync_error = exc.errno or errno.EIO
            raise

    def close(self) -> None:
        if self.fileno >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fileno)  # releases the lock
            self.fileno = -1


class RawLayer:
    """A raw backing file: read-only, shared-locked; reads past its end are zeros."""

    def __init__(self, path: str, *, lock: bool = True) -> None:
        self.file = HostFile(path, read_only=True, lock=lock)
        self.path = path
        self.size = self.file.size
        self.chain_depth = 1

    def read(self, offset: int, views: Sequence[memoryview]) -> None:
        avail = max(0, self.size - offset)
        cur = ViewCursor(views)
        total = sum(len(v) for v in views)
        n = min(avail, total)
        if n:
            try:
                self.file.preadv(offset, cur.take(n))
            except BackendIOError:
                raise BackendIOError(f"{self.path}: short read at {offset}") from None
        if total > n:
            zero_views(cur.take(total - n))

    def close(self) -> None:
        self.file.close()
