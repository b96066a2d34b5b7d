"""Inflight I/O tracking of packed rings (vhost-user "Inflight I/O tracking",
``QueueRegionPacked``; virtio 1.4 §2.8): a restarted back-end resubmits exactly what
was popped and never used, from the descriptors the region recorded -- the ring
slots themselves may already hold used elements -- and finishes or undoes a used
batch the crash interrupted."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import trio

from virtio.errors import DeviceUsageError
from virtio.native import ffi, lib
from virtio.testing.queues import QueuePair, make_queue_pair
from virtio.testing.vhost_user_frontend import EchoDevice, GuestRam, connected
from virtio.transport.vhost_user.errors import InvalidMessage
from virtio.transport.vhost_user.inflight import (
    InflightArea,
    PackedInflightQueue,
    packed_region_size,
    queue_region_size,
    split_region_size,
)
from virtio.transport.vhost_user.messages import VringState
from virtio.transport.vhost_user.server import VhostUserServer

MiB = 1 << 20
FRESH = VringState.packed_num(0, True, 0, True)
"""The base QEMU sends a new back-end after a crash: its copy from the ring's start."""


async def test_restart_resubmits_packed_chains_whose_ring_slots_were_overwritten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A (slots 0-1), B (2-3), C (4-5) popped; B completes first, so its used element
    lands in slot 0, over A's head.  The connection dies.  A new one with the same
    inflight fd and QEMU's stale base resubmits A and C from the region's copies,
    the ring goes on at the right positions, and GET_VRING_BASE agrees."""
    caplog.set_level("INFO")
    device = EchoDevice()
    server = VhostUserServer(device, drain_timeout=0.2)
    ram = GuestRam(4 * MiB)
    try:
        async with trio.open_nursery() as nursery:
            async with connected(server, nursery) as fe:
                await fe.negotiate(packed=True)
                fd, size = await fe.get_inflight_fd(1, 8)
                await fe.set_inflight_fd(fd, size, 1, 8)
                await fe.set_mem_table(ram)
                vq = await fe.setup_vring(0, ram, size=8)
                assert vq.driver.packed
                device.hold = {b"AAAA", b"CCCC"}
                tokens = {name: vq.driver.add([name * 4], [8]) for name in (b"A", b"B", b"C")}
                vq.publish_and_kick()
                (used,) = await vq.wait_used()
                assert used.id == tokens[b"B"]
                driver = vq.driver
                # slot 0 now holds B's used element: A's descriptor is gone from the ring
                assert ram.memory.read_u16(driver.desc_addr + 12) == tokens[b"B"]
            device.hold = set()
            async with connected(server, nursery) as fe:
                await fe.negotiate(packed=True)
                await fe.set_inflight_fd(fd, size, 1, 8)
                await fe.set_mem_table(ram)
                vq = await fe.setup_vring(0, ram, vring_base=FRESH, driver=driver)
                got = await vq.wait_used(2)
                assert {u.id for u in got} == {tokens[b"A"], tokens[b"C"]}
                assert sorted(u.data[:4] for u in got) == [b"AAAA", b"CCCC"]
                assert server.resubmitted == 2
                # the ring goes on: 3 chains of 2 descriptors used, then one more
                vq.driver.add([b"next"], [4])
                vq.publish_and_kick()
                (u,) = await vq.wait_used()
                assert u.data == b"txen"
                assert await fe.get_vring_base(0) == VringState.packed_num(0, False, 0, False)
            os.close(fd)
    finally:
        ram.close()
    assert "resumed 2 in-flight request(s)" in caplog.text


async def test_clean_restart_resubmits_nothing_and_wraps_correctly() -> None:
    """Many chains through an 8-entry packed ring (several wraps), a restart with
    nothing in flight: nothing is resubmitted and service goes on from the region's
    positions even though the base QEMU sends is stale."""
    device = EchoDevice()
    server = VhostUserServer(device, drain_timeout=0.2)
    ram = GuestRam(4 * MiB)
    try:
        async with trio.open_nursery() as nursery:
            async with connected(server, nursery) as fe:
                await fe.negotiate(packed=True)
                fd, size = await fe.get_inflight_fd(1, 8)
                await fe.set_inflight_fd(fd, size, 1, 8)
                await fe.set_mem_table(ram)
                vq = await fe.setup_vring(0, ram, size=8)
                for i in range(11):
                    vq.driver.add([bytes([65 + i])], [1])
                    vq.publish_and_kick()
                    (u,) = await vq.wait_used()
                driver = vq.driver
            async with connected(server, nursery) as fe:
                await fe.negotiate(packed=True)
                await fe.set_inflight_fd(fd, size, 1, 8)
                await fe.set_mem_table(ram)
                vq = await fe.setup_vring(0, ram, vring_base=FRESH, driver=driver)
                for i in range(5):
                    vq.driver.add([b"x%d" % i], [2])
                    vq.publish_and_kick()
                    (u,) = await vq.wait_used()
                    assert u.data == b"%dx" % i
                assert server.resubmitted == 0
                # 16 chains of 2 descriptors: 32 = 4 wraps of 8, wrap counters back to 1
                assert await fe.get_vring_base(0) == VringState.packed_num(0, True, 0, True)
            os.close(fd)
    finally:
        ram.close()


@contextlib.contextmanager
def _pair_with_region(size: int = 8) -> Iterator[tuple[QueuePair, PackedInflightQueue]]:
    """A packed queue pair whose device queue marks a region over a bytearray.  The
    region is released explicitly, as ``InflightArea.close`` does (a cffi buffer
    over a memoryview must not be torn down by the cycle collector)."""
    pair = make_queue_pair(size, packed=True)
    region = PackedInflightQueue(memoryview(bytearray(packed_region_size(size))), size)
    region.initialize(0, True)
    region.attach(pair.device)
    try:
        yield pair, region
    finally:
        PackedInflightQueue.detach(pair.device)
        region.release()


def _flags(pair):
    return lambda i: pair.memory.read_u16(pair.driver.desc_addr + 16 * i + 14)


def test_used_batch_cut_before_the_ring_showed_it_is_rolled_back() -> None:
    """The region moved to the end of a batch (entries freed, used_idx advanced) but
    the crash came before the ring showed it: recovery undoes it, the chain is still
    in flight and resubmitted, at the old used position."""
    with _pair_with_region() as (pair, region):
        a = pair.driver.add([b"A"], [4])
        pair.driver.publish()
        chain = pair.device.pop()
        assert chain is not None and chain.head == a
        ids = ffi.new("uint16_t[]", [a])
        lib.vu_ifp_used_prepare(region.ctx, ids, 1, 2, 1)  # ... and the process dies here
        got = region.recover(_flags(pair))
        assert [bid for bid, _ in got.chains] == [a]
        assert (got.used_idx, got.used_wrap, got.next_avail, got.avail_wrap) == (0, True, 2, True)
        # the recorded descriptors rebuild the same chain
        again = pair.device.packed_chain_recorded(got.chains[0][1])
        assert (again.head, again.ndesc, again.readable_len, again.writable_len) == (a, 2, 1, 4)


def test_used_batch_the_ring_showed_is_committed_even_if_the_driver_reused_the_slot() -> None:
    """The ring showed the batch, the crash came before the region's commit.  The
    driver consumed the used element and already put a new buffer in that slot:
    the slot no longer holds the original available descriptor, so the batch is
    committed (the chain is not redone, which would complete it twice)."""
    with _pair_with_region(size=2) as (pair, region):
        a = pair.driver.add([b"A"], [4])  # slots 0-1
        pair.driver.publish()
        chain = pair.device.pop()
        assert chain is not None
        hdr = region.hdr
        before = (hdr.old_free_head, hdr.old_used_idx, hdr.old_used_wrap_counter)
        pair.device.add_used(chain, 4)
        (u,) = pair.driver.get_used()
        assert u.id == a
        # crash between the ring update and the commit: the old_* fields and the mark
        hdr.old_free_head, hdr.old_used_idx, hdr.old_used_wrap_counter = before
        region.descs[0].inflight = 1
        pair.driver.add([b"B"], [4])  # the driver reuses slots 0-1 (next lap)
        pair.driver.publish()
        assert _flags(pair)(0) & (1 << 7 | 1 << 15) == 1 << 15  # available, wrap counter 0
        got = region.recover(_flags(pair))
        assert got.chains == []
        assert (got.used_idx, got.used_wrap, got.next_avail, got.avail_wrap) == (0, False, 0, False)


def test_a_pop_cut_short_is_not_in_flight() -> None:
    """The crash came while a chain's descriptors were being copied: its head entry
    is marked but old_free_head never moved past it; recovery drops it and the ring
    pops it again (next_avail stays at it)."""
    with _pair_with_region() as (pair, region):
        pair.driver.add([b"A"], [4])
        pair.driver.publish()
        desc = bytes(pair.memory.read(pair.driver.desc_addr, 16))
        lib.vu_ifp_pop_desc(region.ctx, desc, 1)  # first descriptor recorded, then death
        assert region.descs[0].inflight == 1
        got = region.recover(_flags(pair))
        assert got.chains == [] and (got.next_avail, got.avail_wrap) == (0, True)
        assert region.descs[0].inflight == 0


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda r: setattr(r.descs[0], "num", 0),
        lambda r: setattr(r.descs[0], "num", 9),
        lambda r: setattr(r.descs[0], "next", 0),  # the chain loops on itself
        lambda r: setattr(r.descs[1], "id", 200),
        lambda r: setattr(r.hdr, "used_idx", 8),
        lambda r: setattr(r.hdr, "desc_num", 16),
    ],
    ids=["num-0", "num-too-big", "loop", "id-range", "used-range", "desc-num"],
)
def test_a_corrupt_region_is_refused(corrupt) -> None:
    """The region lives in memory the front-end hands us: anything inconsistent is
    an ``InvalidMessage``, never an out-of-range access."""
    with _pair_with_region() as (pair, region):
        pair.driver.add([b"A"], [4])
        pair.driver.publish()
        assert pair.device.pop() is not None
        corrupt(region)
        with pytest.raises(InvalidMessage):
            region.recover(_flags(pair))


def test_recorded_chain_is_validated_like_a_pop() -> None:
    """A recorded descriptor outside guest memory breaks the queue with the driver
    error a pop would raise; a record of the wrong size is a usage error."""
    with _pair_with_region() as (pair, _region):
        bad = (1 << 40).to_bytes(8, "little") + (16).to_bytes(4, "little") + bytes(4)
        with pytest.raises(DeviceUsageError):
            pair.device.packed_chain_recorded(bad[:15])
        with pytest.raises(Exception) as info:
            pair.device.packed_chain_recorded(bad)
        assert "memory" in str(info.value)


def test_a_region_sized_for_split_only_is_not_used_for_packed() -> None:
    """Areas we create have room for either layout; a split-only area from an older
    back-end is left alone for packed rings (untracked) rather than overrun."""
    assert queue_region_size(256) == packed_region_size(256) > split_region_size(256)
    fd = os.memfd_create("old-area", os.MFD_CLOEXEC)
    os.ftruncate(fd, split_region_size(256) * 2)
    area = InflightArea(fd, split_region_size(256) * 2, 0, 2, 256)
    try:
        assert area.packed_queue(1) is None
        assert area.queue(1).desc_num == 256  # split rings still use it
    finally:
        area.close()
