"""Hardware write watchpoints: the order in which this thread stores to given addresses.

Ordering requirements such as §2.7.8.2 (the device sets a used element's ``len``
before it updates the used ``idx``) cannot be seen in memory after the fact.  A
:class:`WriteWatch` arms an x86 debug-register breakpoint per address
(``perf_event_open``, ``PERF_TYPE_BREAKPOINT``/``HW_BREAKPOINT_W``, one sample per
hit, all into one ring buffer), so the stores of the watched code, C included,
are recorded in the order they execute::

    with WriteWatch({"len": (len_ptr, 4), "idx": (idx_ptr, 2)}) as watch:
        queue.add_used(chain, 10)
    watch.order  # ["len", "idx"]

Host addresses come from :func:`host_address`.  At most four watches (the CPU has
four debug registers); lengths 1, 2, 4 or 8, naturally aligned.  The helper is
built with cffi against ``<linux/perf_event.h>`` on first use.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import mmap
import os
import struct
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Self

from cffi import FFI

__all__ = ["WatchUnavailable", "WriteWatch", "host_address"]

_CDEF = """
int wp_open(uint64_t addr, uint32_t len);
#define PERF_EVENT_IOC_ENABLE ...
#define PERF_EVENT_IOC_DISABLE ...
#define PERF_EVENT_IOC_SET_OUTPUT ...
#define PERF_RECORD_SAMPLE ...
struct perf_event_mmap_page { uint64_t data_head; uint64_t data_offset; uint64_t data_size; ...; };
"""

_SOURCE = """
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/hw_breakpoint.h>
#include <linux/perf_event.h>

/* A disabled write breakpoint on [addr, addr + len) of the calling thread, user
 * space only, one PERF_SAMPLE_ADDR sample per hit; the fd or -errno. */
static int wp_open(uint64_t addr, uint32_t len)
{
    struct perf_event_attr a;
    memset(&a, 0, sizeof a);
    a.type = PERF_TYPE_BREAKPOINT;
    a.size = sizeof a;
    a.bp_type = HW_BREAKPOINT_W;
    a.bp_addr = addr;
    a.bp_len = len;
    a.sample_period = 1;
    a.sample_type = PERF_SAMPLE_ADDR;
    a.disabled = 1;
    a.exclude_kernel = 1;
    a.exclude_hv = 1;
    long fd = syscall(SYS_perf_event_open, &a, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
    return fd < 0 ? -errno : (int)fd;
}
"""

_PAGES = 8
"""Data pages of the ring buffer (a sample is 16 bytes: plenty)."""

_lib: Any = None
_ffi: Any = None


class WatchUnavailable(RuntimeError):
    """Hardware watchpoints cannot be used here (no compiler, no perf events, no slots)."""


def _build() -> ModuleType:
    name = "_pyvirtio_watch_" + hashlib.sha256((_CDEF + _SOURCE).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("PYVIRTIO_CACHE", Path.home() / ".cache" / "pyvirtio"))
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / (name + importlib.machinery.EXTENSION_SUFFIXES[0])
    if not target.exists():
        ffi = FFI()
        ffi.cdef(_CDEF)
        ffi.set_source(name, _SOURCE)
        with tempfile.TemporaryDirectory(prefix=".build-watch-", dir=cache) as tmp:
            try:
                path = ffi.compile(tmpdir=tmp, verbose=False)
            except Exception as exc:  # cffi raises VerificationError and distutils errors
                raise WatchUnavailable(f"cannot build the watchpoint helper: {exc}") from exc
            os.replace(path, target)  # atomic: concurrent builds are harmless
    spec = importlib.util.spec_from_file_location(name, target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _native() -> tuple[Any, Any]:
    global _lib, _ffi
    if _lib is None:
        module = _build()
        _lib, _ffi = module.lib, module.ffi
    return _lib, _ffi


def host_address(view: memoryview | bytearray) -> int:
    """The address of a writable buffer's first byte (e.g. ``memory.slice(gpa, n)``)."""
    ffi = FFI()
    return int(ffi.cast("uintptr_t", ffi.from_buffer(view, require_writable=True)))


class WriteWatch:
    """Record this thread's stores to named address ranges, in execution order.

    Use as a context manager; afterwards :attr:`order` lists the name of the range
    hit by each store (a store covering two ranges appears once per range).
    """

    def __init__(self, ranges: Mapping[str, tuple[int, int]]) -> None:
        if not 1 <= len(ranges) <= 4:
            raise ValueError("between one and four ranges (x86 has four debug registers)")
        for name, (addr, length) in ranges.items():
            if length not in (1, 2, 4, 8) or addr % length:
                raise ValueError(f"{name}: length {length} at {addr:#x} is not aligned")
        self.ranges = dict(ranges)
        self.order: list[str] = []
        self._fds: list[int] = []
        self._ring: mmap.mmap | None = None

    def __enter__(self) -> Self:
        lib, _ = _native()
        try:
            for name, (addr, length) in self.ranges.items():
                fd = lib.wp_open(addr, length)
                if fd < 0:
                    raise WatchUnavailable(f"perf_event_open({name}): {os.strerror(-fd)}")
                self._fds.append(fd)
            page = mmap.PAGESIZE
            self._ring = mmap.mmap(self._fds[0], (1 + _PAGES) * page)
            for fd in self._fds[1:]:
                fcntl.ioctl(fd, lib.PERF_EVENT_IOC_SET_OUTPUT, self._fds[0])
            for fd in self._fds:
                fcntl.ioctl(fd, lib.PERF_EVENT_IOC_ENABLE, 0)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        lib, ffi = _native()
        try:
            for fd in self._fds:
                fcntl.ioctl(fd, lib.PERF_EVENT_IOC_DISABLE, 0)
            assert self._ring is not None
            page_t = "struct perf_event_mmap_page"
            head = self._u64(ffi.offsetof(page_t, "data_head"))
            start = self._u64(ffi.offsetof(page_t, "data_offset"))
            size = self._u64(ffi.offsetof(page_t, "data_size"))
            if head > size:
                raise RuntimeError(f"watchpoint ring overflowed ({head} > {size} bytes)")
            by_addr = {addr: name for name, (addr, _) in self.ranges.items()}
            pos = 0
            while pos < head:
                kind, _misc, rec_size = struct.unpack_from("<IHH", self._ring, start + pos)
                if kind == lib.PERF_RECORD_SAMPLE:
                    (addr,) = struct.unpack_from("<Q", self._ring, start + pos + 8)
                    self.order.append(by_addr[addr])
                pos += rec_size
        finally:
            self._close()

    def _u64(self, offset: int) -> int:
        assert self._ring is not None
        return struct.unpack_from("<Q", self._ring, offset)[0]

    def _close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
