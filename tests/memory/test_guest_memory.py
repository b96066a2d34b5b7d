"""Guest memory bounds checks (virtio 1.4 §2.6: buffers are guest-physical ranges)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio.errors import GuestMemoryError
from virtio.memory import BytearrayGuestMemory, FdRegion, MmapGuestMemory

REGIONS = [(0x0, 0x1000), (0x1000, 0x1000), (0x4000, 0x2000)]


@pytest.fixture
def mem():
    m = BytearrayGuestMemory(regions=REGIONS)
    yield m
    m.close()


def test_translate_inside_one_region(mem):
    views = mem.translate(0x4100, 0x100)
    assert [len(v) for v in views] == [0x100]


def test_translate_spans_adjacent_regions(mem):
    mem.write(0xFFE, b"abcd")
    assert [len(v) for v in mem.translate(0xFF0, 0x20)] == [0x10, 0x10]
    assert mem.read(0xFFE, 4) == b"abcd"


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (0x2000, 1),  # in the gap
        (0x1FF0, 0x20),  # crosses from a region into the gap
        (0x5FFF, 2),  # runs off the end of the last region
        (0x3FFF, 2),  # starts in the gap, ends in a region
        ((1 << 64) - 8, 0x10),  # wraps around 2**64
        (-1, 1),
    ],
)
def test_out_of_bounds_raises_typed_error(mem, addr, length):
    with pytest.raises(GuestMemoryError):
        mem.translate(addr, length)
    with pytest.raises(GuestMemoryError):
        mem.write(addr, bytes(max(length, 0)))


def test_slice_must_be_single_region(mem):
    assert len(mem.slice(0x100, 0x10)) == 0x10
    with pytest.raises(GuestMemoryError):
        mem.slice(0xFF0, 0x20)


def test_overlapping_regions_rejected():
    with pytest.raises(GuestMemoryError):
        BytearrayGuestMemory(regions=[(0, 0x2000), (0x1000, 0x1000)])


def test_acquire_release_accessors_check_alignment_and_bounds(mem):
    mem.store_release_u16(0x10, 0xBEEF)
    assert mem.load_acquire_u16(0x10) == 0xBEEF
    with pytest.raises(GuestMemoryError):
        mem.load_acquire_u16(0x11)
    with pytest.raises(GuestMemoryError):
        mem.load_acquire_u16(0x2000)


def test_dirty_log_marks_pages(mem):
    log = memoryview(bytearray(8))
    mem.set_dirty_log(log)
    mem.write(0x4FFF, b"xy")  # pages 4 and 5
    assert log[0] == 0b0011_0000
    mem.set_dirty_log(None)
    mem.write(0x0, b"z")
    assert log[0] == 0b0011_0000


def test_mmap_memory_shares_the_fd():
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 0x3000)
        mem = MmapGuestMemory([FdRegion(0x10000, 0x1000, fd, mmap_offset=0x2000, user_addr=0x7F00)])
        mem.write(0x10010, b"hello")
        assert os.pread(fd, 5, 0x2010) == b"hello"
        assert mem.user_to_guest(0x7F10) == 0x10010
        with pytest.raises(GuestMemoryError):
            mem.user_to_guest(0x7F00 + 0x1000)
        mem.close()
    finally:
        os.close(fd)


def test_mmap_region_larger_than_file_rejected():
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 0x1000)
        with pytest.raises(GuestMemoryError):
            MmapGuestMemory([FdRegion(0, 0x2000, fd)])
    finally:
        os.close(fd)


@given(addr=st.integers(0, 0x7000), length=st.integers(0, 0x3000))
def test_translate_matches_a_model(addr, length):
    m = BytearrayGuestMemory(regions=REGIONS)
    backed = set()
    for start, size in REGIONS:
        backed.update(range(start, start + size))
    inside = all(a in backed for a in range(addr, addr + length)) and (length > 0 or addr in backed)
    try:
        views = m.translate(addr, length)
    except GuestMemoryError:
        assert not inside
    else:
        assert inside
        assert sum(len(v) for v in views) == length
    m.close()


def test_empty_memfd_region_rejected():
    """A region over a 0-byte memfd would SIGBUS on first access: refused up front."""
    fd = os.memfd_create("t")
    try:
        with pytest.raises(GuestMemoryError):
            MmapGuestMemory([FdRegion(0, 0x1000, fd)])
    finally:
        os.close(fd)
