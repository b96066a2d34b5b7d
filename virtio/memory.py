"""Guest memory: guest-physical regions mapped into this process (virtio 1.4 §2.6).

A ``GuestMemory`` is a sorted set of non-overlapping regions, each a guest-physical
range backed by a writable host buffer (an ``mmap`` of a memfd/file descriptor as
vhost-user and the emulator hand them, or a ``bytearray`` for unit tests).  Every
guest-supplied address and length is checked: a range that leaves guest memory,
falls into a gap or wraps around 2**64 raises ``GuestMemoryError``.  A range may
span two regions that are adjacent in guest-physical space; it is then returned
as several host slices.

Ring index loads and stores that synchronise with the driver go through the
native core (``__atomic`` acquire/release, see ``virtio.native``).
"""

from __future__ import annotations

import itertools
import mmap
import os
import stat
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from virtio.errors import DeviceUsageError, GuestMemoryError
from virtio.native import ffi, lib

PAGE_SIZE = 4096
_U64 = 1 << 64


@dataclass(eq=False)
class MemoryRegion:
    """One guest-physical range ``[guest_addr, guest_addr + size)`` and its host buffer.

    ``user_addr`` is the frontend's virtual address of the region (vhost-user), and
    ``fd``/``fd_offset`` where the mapping came from (``-1`` for anonymous buffers).
    """

    guest_addr: int
    size: int
    buffer: memoryview
    user_addr: int = 0
    fd: int = -1
    fd_offset: int = 0
    _owner: object = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


class GuestMemory:
    """Bounds-checked access to guest-physical memory made of ``MemoryRegion``s."""

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        regs = sorted(regions, key=lambda r: r.guest_addr)
        for r in regs:
            if r.size <= 0 or r.guest_addr < 0 or r.end > _U64:
                raise GuestMemoryError(r.guest_addr, r.size, "is not a valid region")
            if len(r.buffer) < r.size:
                raise DeviceUsageError("region buffer smaller than its size")
        for a, b in itertools.pairwise(regs):
            if b.guest_addr < a.end:
                raise GuestMemoryError(b.guest_addr, b.size, "overlaps another region")
        self._regions: list[MemoryRegion] = regs
        self.buffers: list[memoryview] = [r.buffer for r in regs]
        """Each region's host buffer, in region order (``Segment.region`` indexes it)."""
        self._starts = [r.guest_addr for r in regs]
        self._closed = False
        # Native view used by the ring core: region table + optional dirty log.
        self._c_regions = ffi.new("struct vm_region[]", max(1, len(regs)))
        self._c_bufs = []
        for i, r in enumerate(regs):
            self._c_regions[i].gpa = r.guest_addr
            self._c_regions[i].size = r.size
            self._c_regions[i].host = self._host_pointer(r)
        self.c_mem = ffi.new("struct vm_mem *")
        self.c_mem.regions = self._c_regions
        self.c_mem.nregions = len(regs)
        self._dirty_log: memoryview | None = None

    def _host_pointer(self, r: MemoryRegion):
        """A C pointer to the region's first byte.

        The buffer export is taken on the object that owns the memory (the
        ``bytearray`` or ``mmap``), never on a memoryview: the garbage collector may
        clear memoryviews in any order, and one with a live export cannot be cleared.
        """
        owner = r._owner if r._owner is not None else r.buffer.obj
        whole = ffi.from_buffer(owner, require_writable=True)
        probe = ffi.from_buffer(r.buffer, require_writable=True)
        offset = int(ffi.cast("uintptr_t", probe)) - int(ffi.cast("uintptr_t", whole))
        ffi.release(probe)
        if not 0 <= offset <= len(whole) - r.size:
            ffi.release(whole)
            raise DeviceUsageError("region buffer is not a slice of its owner")
        self._c_bufs.append(whole)
        return ffi.cast("uint8_t *", whole) + offset

    @property
    def closed(self) -> bool:
        return self._closed

    # -- regions --------------------------------------------------------------------
    @property
    def regions(self) -> Sequence[MemoryRegion]:
        return tuple(self._regions)

    def region_at(self, addr: int) -> MemoryRegion:
        i = bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._regions[i]
            if addr < r.end:
                return r
        raise GuestMemoryError(addr, 1)

    def user_to_guest(self, user_addr: int, length: int = 1) -> int:
        """Translate a frontend virtual address (vhost-user ring addresses) to guest-physical."""
        for r in self._regions:
            if r.user_addr <= user_addr < r.user_addr + r.size:
                if length > r.user_addr + r.size - user_addr:
                    break
                return r.guest_addr + (user_addr - r.user_addr)
        raise GuestMemoryError(user_addr, length, "is not inside any region's user address range")

    # -- translation ----------------------------------------------------------------
    def translate(self, addr: int, length: int) -> list[memoryview]:
        """Host slices covering ``[addr, addr + length)``; raises ``GuestMemoryError``."""
        if addr < 0 or length < 0 or addr + length > _U64:
            raise GuestMemoryError(addr, length, "wraps around the address space")
        out: list[memoryview] = []
        a, left = addr, length
        while True:
            i = bisect_right(self._starts, a) - 1
            r = self._regions[i] if i >= 0 else None
            if r is None or a >= r.end:
                raise GuestMemoryError(addr, length)
            off = a - r.guest_addr
            n = min(left, r.size - off)
            out.append(r.buffer[off : off + n])
            left -= n
            a += n
            if left == 0:
                return out

    def slice(self, addr: int, length: int) -> memoryview:
        """One contiguous host slice; the range must lie inside a single region."""
        r = self.region_at(addr)
        off = addr - r.guest_addr
        if length < 0 or length > r.size - off:
            raise GuestMemoryError(addr, length, "is not inside a single region")
        return r.buffer[off : off + length]

    def check(self, addr: int, length: int) -> None:
        """Raise ``GuestMemoryError`` unless the whole range is guest memory."""
        self.translate(addr, length)

    def read(self, addr: int, length: int) -> bytes:
        parts = self.translate(addr, length)
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        pos = 0
        for part in self.translate(addr, len(data)):
            n = len(part)
            part[:] = data[pos : pos + n]
            pos += n
        self.log_dirty(addr, len(data))

    def read_u16(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 2), "little")

    def read_u32(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 4), "little")

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u16(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(2, "little"))

    def write_u32(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(4, "little"))

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(8, "little"))

    # -- ordered accesses (ring indices) ----------------------------------------------
    def _ptr(self, addr: int, size: int):
        if addr % size:
            raise GuestMemoryError(addr, size, f"is not {size}-byte aligned")
        p = lib.vm_translate(self.c_mem, addr, size, ffi.NULL)
        if p == ffi.NULL:
            raise GuestMemoryError(addr, size)
        return p

    def load_acquire_u16(self, addr: int) -> int:
        return lib.vm_load_acquire_u16(self._ptr(addr, 2))

    def store_release_u16(self, addr: int, value: int) -> None:
        lib.vm_store_release_u16(self._ptr(addr, 2), value)
        self.log_dirty(addr, 2)

    def load_acquire_u32(self, addr: int) -> int:
        return lib.vm_load_acquire_u32(self._ptr(addr, 4))

    def store_release_u32(self, addr: int, value: int) -> None:
        lib.vm_store_release_u32(self._ptr(addr, 4), value)
        self.log_dirty(addr, 4)

    @staticmethod
    def fence() -> None:
        """Full memory barrier (``__atomic_thread_fence(__ATOMIC_SEQ_CST)``)."""
        lib.vm_fence()

    # -- dirty page logging (vhost-user SET_LOG_BASE / VHOST_F_LOG_ALL) ---------------
    def set_dirty_log(self, log: memoryview | None) -> None:
        """Log device writes in ``log``: one bit per 4 KiB guest page; ``None`` stops."""
        self._dirty_log = log
        if log is None:
            self._c_log = None
            self.c_mem.dirty_log = ffi.NULL
            self.c_mem.dirty_log_size = 0
        else:
            self._c_log = ffi.from_buffer(log, require_writable=True)
            self.c_mem.dirty_log = ffi.cast("uint8_t *", self._c_log)
            self.c_mem.dirty_log_size = len(log)

    @property
    def logging(self) -> bool:
        return self._dirty_log is not None

    def log_dirty(self, addr: int, length: int) -> None:
        if self._dirty_log is not None:
            lib.vm_log_dirty(self.c_mem, addr, length)

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Release the host mappings this object owns."""
        if self._closed:
            return
        self._closed = True
        self.c_mem.nregions = 0
        for buf in self._c_bufs:
            ffi.release(buf)
        self._c_bufs.clear()
        for r in self._regions:
            owner = r._owner
            try:
                r.buffer.release()
                if isinstance(owner, mmap.mmap):
                    owner.close()
            except BufferError:
                # Views handed out (chains a device still holds) keep the mapping
                # alive; it is unmapped when the last of them goes away.
                pass

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BytearrayGuestMemory(GuestMemory):
    """Guest memory backed by ``bytearray``s, for unit tests.

    ``BytearrayGuestMemory(size)`` is one region at guest address 0;
    ``BytearrayGuestMemory(regions=[(addr, size), ...])`` builds several.
    """

    def __init__(self, size: int = 0, *, regions: Iterable[tuple[int, int]] = ()) -> None:
        spec = list(regions) or [(0, size)]
        built = []
        for a, n in spec:
            backing = bytearray(n)
            built.append(MemoryRegion(a, n, memoryview(backing), _owner=backing))
        super().__init__(built)


@dataclass(frozen=True)
class FdRegion:
    """A region to map from a file descriptor (vhost-user memory table entry)."""

    guest_addr: int
    size: int
    fd: int
    mmap_offset: int = 0
    user_addr: int = 0


class MmapGuestMemory(GuestMemory):
    """Guest memory mapped from file descriptors (memfd, hugetlbfs, ...), shared.

    The fds are not closed by this object; the mappings are (``close``).  Mapping
    offsets need not be page aligned: the mapping starts at the page below.
    """

    def __init__(self, regions: Iterable[FdRegion]) -> None:
        built: list[MemoryRegion] = []
        try:
            for fr in regions:
                if fr.size <= 0 or fr.mmap_offset < 0 or fr.guest_addr + fr.size > _U64:
                    raise GuestMemoryError(fr.guest_addr, fr.size, "is not a valid region")
                if fr.mmap_offset + fr.size > _fd_size(fr.fd):
                    raise GuestMemoryError(
                        fr.guest_addr, fr.size, "is larger than the file that backs it"
                    )
                base = fr.mmap_offset - fr.mmap_offset % mmap.ALLOCATIONGRANULARITY
                skew = fr.mmap_offset - base
                m = mmap.mmap(
                    fr.fd,
                    fr.size + skew,
                    flags=mmap.MAP_SHARED,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=base,
                )
                view = memoryview(m)[skew : skew + fr.size]
                built.append(
                    MemoryRegion(
                        guest_addr=fr.guest_addr,
                        size=fr.size,
                        buffer=view,
                        user_addr=fr.user_addr,
                        fd=fr.fd,
                        fd_offset=fr.mmap_offset,
                        _owner=m,
                    )
                )
            super().__init__(built)
        except BaseException:
            for r in built:
                r.buffer.release()
                r._owner.close()  # type: ignore[union-attr]
            raise

    @classmethod
    def anonymous(cls, size: int, guest_addr: int = 0, name: str = "guest-ram") -> MmapGuestMemory:
        """A fresh memfd of ``size`` bytes mapped at ``guest_addr`` (fd kept open: ``.fds``)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mem = cls([FdRegion(guest_addr, size, fd)])
        mem.owned_fds = [fd]
        return mem

    owned_fds: list[int] = []

    def close(self) -> None:
        super().close()
        for fd in self.owned_fds:
            os.close(fd)
        self.owned_fds = []


def _fd_size(fd: int) -> int:
    """Bytes a mapping of ``fd`` may cover.  Regular files (memfds included) have
    their size: mapping past it would SIGBUS on first access.  Character devices
    report 0 and are left to ``mmap`` to refuse."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return 1 << 63
