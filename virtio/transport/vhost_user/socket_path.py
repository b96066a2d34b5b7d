"""Owning a unix socket path: claim it safely, bind it, and give it back.

::

    with SocketPath("/run/blk.sock") as claimed:     # lock, then clear a stale socket
        listener = claimed.bind(backlog=16)          # ours from now on
        ...                                          # on exit: remove it if still ours

How two back-ends started on one path at the same moment are kept apart:

* **A lock on a sidecar file** ``PATH.lock`` (``flock(LOCK_EX | LOCK_NB)``), held for the
  server's whole life, as QEMU-style daemons hold their pid file.  Whoever gets the lock
  owns the path; the other gets ``SocketPathInUse`` naming the holder's pid (written in
  the lock file) and touches nothing.  The kernel drops the lock when its holder dies,
  so a killed back-end never blocks the next one.  After locking, the lock file's inode
  is checked against the one opened: a holder removes ``PATH.lock`` at exit while still
  holding it, so a starter that locked the removed file retries on the new one.
* **Only a socket proven dead is removed.**  With the lock held, whatever is at ``PATH``
  was left by someone else: a non-socket (regular file, directory, symlink, ...) is never
  touched (``SocketPathOccupied``); a socket is probed with a non-blocking ``connect``:
  ``ECONNREFUSED`` proves nobody listens (stale: removed, if its inode has not changed
  since the probe); success or ``EAGAIN`` (backlog full) means a live server
  (``SocketPathInUse``); anything else is reported, not guessed at.
* **At exit only our own socket is removed**: the ``(st_dev, st_ino)`` recorded after
  ``bind`` must still be what ``lstat(PATH)`` says, else the path is left alone.

Why not bind to a temporary name and ``rename`` it over ``PATH``: rename replaces what is
there unconditionally, so two starters would each clobber the other's live socket (or a
live socket of a back-end that does not take the lock); it makes the bind atomic but
not the decision to replace.  The lock serialises the decision itself.

What the lock cannot do: keep out a program that does not take it.  Against those, the
probe still refuses a live socket, and a narrow window remains between probe and unlink.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def describe_file_type(mode: int) -> str:
    """``"a regular file"``, ``"a directory"``, ... for an ``st_mode``."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return f"a file of type {stat.S_IFMT(mode):#o}"


class SocketPathError(OSError):
    """The socket path cannot be claimed; ``str()`` is a sentence naming the path."""

    def __init__(self, code: int, message: str, path: str | os.PathLike[str]) -> None:
        super().__init__(code, message, os.fspath(path))
        self.message = message

    def __str__(self) -> str:
        return self.message


class SocketPathInUse(SocketPathError):
    """Another server owns the path: it holds the lock, or a live socket is there."""

    def __init__(self, message: str, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.EADDRINUSE, message, path)


class SocketPathOccupied(SocketPathError):
    """Something that is not a socket is at the path: it is never removed."""

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        super().__init__(
            errno.EEXIST,
            f"{os.fspath(path)} exists and is {kind}, not a socket: not removing it",
            path,
        )
        self.kind = kind


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class SocketPath:
    """The claim on one socket path (see the module docstring); a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = Path(os.fspath(path) + LOCK_SUFFIX)
        self._lock_fd: int | None = None
        self._bound: tuple[int, int] | None = None

    def __enter__(self) -> SocketPath:
        self._lock()
        try:
            self._clear_stale()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # ------------------------------------------------------------------ claim

    def _lock(self) -> None:
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                raise SocketPathError(
                    errno.ENOENT,
                    f"cannot listen on {self.path}: directory {self.path.parent} does not exist",
                    self.path,
                ) from None
            except OSError as exc:
                raise SocketPathError(
                    exc.errno or errno.EIO,
                    f"cannot create the lock file {self.lock_path}: {exc.strerror or exc}",
                    self.lock_path,
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"another back-end (pid {holder})" if holder else "another back-end"
                raise SocketPathInUse(
                    f"{who} is serving {self.path} (it holds {self.lock_path})", self.path
                ) from None
            try:
                current = _identity(os.stat(self.lock_path))
            except FileNotFoundError:
                current = None
            if current == _identity(os.fstat(fd)):
                break
            os.close(fd)  # its holder removed it as we locked it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _clear_stale(self) -> None:
        """Remove a socket nobody listens on; refuse anything else that is at the path."""
        path = os.fspath(self.path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketPathOccupied(path, describe_file_type(st.st_mode))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass  # nobody listens: stale
        except FileNotFoundError:
            return  # removed meanwhile
        except BlockingIOError:  # EAGAIN: a listener whose backlog is full
            raise SocketPathInUse(
                f"a server is listening on {path} (its backlog is full)", path
            ) from None
        except OSError as exc:
            raise SocketPathError(
                exc.errno or errno.EIO,
                f"cannot tell whether the socket {path} is in use: {exc.strerror or exc}",
                path,
            ) from None
        else:
            raise SocketPathInUse(f"another server is listening on {path}", path)
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            if _identity(os.lstat(path)) == _identity(st):
                os.unlink(path)
                log.info("removed the stale socket %s (nobody was listening)", path)

    # ------------------------------------------------------------------ bind

    def bind(self, backlog: int) -> socket.socket:
        """A listening socket bound at the path (close-on-exec); the path is ours."""
        if self._lock_fd is None:
            raise RuntimeError("bind() outside the SocketPath context")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(os.fspath(self.path))
            self._bound = _identity(os.lstat(self.path))
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:  # appeared after our check: not ours
                raise SocketPathInUse(
                    f"{self.path} appeared while we claimed it: not removing it", self.path
                ) from None
            raise SocketPathError(
                exc.errno or errno.EIO, f"cannot bind {self.path}: {exc.strerror or exc}", self.path
            ) from None
        return sock

    # ------------------------------------------------------------------ release

    def release(self) -> None:
        """Remove our socket if the path still names it, then the lock file, and unlock.
        (Close the listening socket before.)"""
        if self._bound is not None:
            try:
                ours = _identity(os.lstat(self.path)) == self._bound
            except FileNotFoundError:
                ours = False
            if ours:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            else:
                log.warning("%s is no longer our socket: leaving it in place", self.path)
            self._bound = None
        self._unlock()

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:  # remove the lock file while still holding it (see the module docstring)
            if _identity(os.stat(self.lock_path)) == _identity(os.fstat(fd)):
                os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(os.pread(fd, 32, 0).split()[0])
    return None
