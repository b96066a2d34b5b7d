"""``virtio.testing.watchpoints``: stores are recorded in the order they execute.

The writes here are single stores (``store_release_*``): a ``memcpy`` of 4 bytes
may store them twice (glibc copies small sizes with two overlapping moves), and
each store is a hit."""

from __future__ import annotations

import pytest

from virtio.memory import BytearrayGuestMemory
from virtio.testing.watchpoints import WatchUnavailable, WriteWatch, host_address


def _watch(mem: BytearrayGuestMemory, ranges, writes) -> list[str]:
    addrs = {name: (host_address(mem.slice(gpa, n)), n) for name, (gpa, n) in ranges.items()}
    try:
        with WriteWatch(addrs) as watch:
            for write in writes:
                write()
    except WatchUnavailable as exc:
        pytest.skip(f"no hardware watchpoints here: {exc}")
    return watch.order


def test_order_follows_execution_both_ways():
    mem = BytearrayGuestMemory(8192)
    ranges = {"a": (0x100, 4), "b": (0x1F02, 2)}
    forward = [lambda: mem.store_release_u32(0x100, 1), lambda: mem.store_release_u16(0x1F02, 2)]
    assert _watch(mem, ranges, forward) == ["a", "b"]
    assert _watch(mem, ranges, forward[::-1]) == ["b", "a"]


def test_reads_and_other_addresses_are_not_recorded():
    mem = BytearrayGuestMemory(8192)
    writes = [
        lambda: mem.load_acquire_u32(0x100),
        lambda: mem.store_release_u32(0x104, 7),  # the neighbour
        lambda: mem.store_release_u32(0x100, 1),
        lambda: mem.store_release_u32(0x100, 2),
    ]
    assert _watch(mem, {"a": (0x100, 4)}, writes) == ["a", "a"]


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="aligned"):
        WriteWatch({"a": (0x1001, 4)})
    with pytest.raises(ValueError, match="four"):
        WriteWatch({str(i): (0x1000 + 8 * i, 8) for i in range(5)})
