"""Indirect tables that cross a memory-region boundary (issue 13 §0.4).

An indirect table is ``len`` bytes at guest-physical ``addr`` (virtio 1.4 §2.7.5.3
split, §2.8.7 packed): only guest-physical contiguity is asked for, so a table that
runs from one region into an adjacent one is legal, while one that runs into a gap
is not guest memory and breaks the queue with a typed error.
"""

from __future__ import annotations

import struct

import pytest

from virtio.errors import DescriptorChainError, QueueBrokenError
from virtio.memory import BytearrayGuestMemory
from virtio.queues import Virtqueue
from virtio.spec import sections as sec
from virtio.spec.ring import PackedDescFlag, VringDescFlag
from virtio.testing.driver import DriverQueue

NEXT = int(VringDescFlag.VRING_DESC_F_NEXT)
WRITE = int(VringDescFlag.VRING_DESC_F_WRITE)
INDIRECT = int(VringDescFlag.VRING_DESC_F_INDIRECT)
AVAIL = int(PackedDescFlag.VRING_PACKED_DESC_F_AVAIL)

BOUNDARY = 0x10000
ADJACENT = [(0, BOUNDARY), (BOUNDARY, 0x10000)]
GAP = [(0, BOUNDARY), (BOUNDARY + 0x1000, 0x10000)]
# Readable "abc" below the boundary, readable "defg" and 16 writable bytes above it.
BUFFERS = [
    (0x8000, b"abc", False),
    (BOUNDARY + 0x2000, b"defg", False),
    (BOUNDARY + 0x3000, 16, True),
]


def _setup(regions, packed: bool, table: int):
    mem = BytearrayGuestMemory(regions=regions)
    drv = DriverQueue(mem, 8, base=0x1000, packed=packed, indirect=True, data_size=0x1000)
    q = Virtqueue(mem, drv.state())
    entries = b""
    for i, (addr, data, writable) in enumerate(BUFFERS):
        length = data if writable else len(data)
        if not writable:
            mem.write(addr, data)
        flags = WRITE if writable else 0
        if packed:  # addr, len, id (reserved in a table), flags: sequential entries
            entries += struct.pack("<QIHH", addr, length, 0, flags)
        else:  # addr, len, flags, next
            last = i == len(BUFFERS) - 1
            entries += struct.pack("<QIHH", addr, length, flags | (0 if last else NEXT), i + 1)
    mem.write(table, entries[: BOUNDARY - table])  # the part below the boundary
    if regions is ADJACENT:
        mem.write(BOUNDARY, entries[BOUNDARY - table :])
    if packed:
        drv.write_desc(0, table, len(entries), INDIRECT | AVAIL, 5)
    else:
        drv.write_desc(0, table, len(entries), INDIRECT, 0)
        drv.write_avail(0, 0)
        drv.set_avail_idx(1)
    return mem, q, len(entries)


@pytest.mark.parametrize(
    "table",
    [
        pytest.param(BOUNDARY - 0x20, id="descriptor-aligned"),  # 2 entries below, 1 above
        pytest.param(BOUNDARY - 0x18, id="entry-straddles"),  # entry 1 is cut in two
    ],
)
def test_indirect_table_spanning_adjacent_regions_is_accepted(packed, table):
    mem, q, _ = _setup(ADJACENT, packed, table)
    chain = q.pop()
    assert chain is not None and not q.broken
    assert chain.head == (5 if packed else 0)
    assert chain.reader().read() == b"abcdefg"
    assert chain.writable_len == 16
    writer = chain.writer()
    writer.write(b"W" * 16)
    q.add_used(chain, writer.written)
    assert mem.read(BOUNDARY + 0x3000, 16) == b"W" * 16
    assert q.statistics().used == 1


@pytest.mark.parametrize("table", [BOUNDARY - 0x20, BOUNDARY - 0x18])
def test_indirect_table_running_into_a_gap_is_refused(packed, table):
    _mem, q, length = _setup(GAP, packed, table)
    with pytest.raises(DescriptorChainError) as info:
        q.pop()
    section = sec.S_2_8_7 if packed else sec.S_2_7_5_3
    assert info.value.section.startswith(section.number)
    assert f"indirect table [{table:#x}, +{length:#x})" in str(info.value)
    assert q.broken
    with pytest.raises(QueueBrokenError):
        q.pop()


def test_indirect_table_past_the_last_region_is_refused(packed):
    regions = [(0, BOUNDARY)]
    mem = BytearrayGuestMemory(regions=regions)
    drv = DriverQueue(mem, 8, base=0x1000, packed=packed, indirect=True, data_size=0x1000)
    q = Virtqueue(mem, drv.state())
    if packed:
        drv.write_desc(0, BOUNDARY - 0x10, 0x20, INDIRECT | AVAIL, 0)
    else:
        drv.write_desc(0, BOUNDARY - 0x10, 0x20, INDIRECT, 0)
        drv.write_avail(0, 0)
        drv.set_avail_idx(1)
    with pytest.raises(DescriptorChainError, match="indirect table"):
        q.pop()
