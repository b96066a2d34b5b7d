"""``--queue-threads N``: N data plane threads serve a virtio-blk device's queues
(``QueueThread``, ``struct dp_group``; QEMU's iothread-vq-mapping).

Queue i is served by thread i mod N, and each thread waits in one io_uring for all
its queues.  With fewer threads than queues every queue must still be served --
concurrently, on the ring (write-through writes and FLUSH are asynchronous, virtio
1.4 §5.2.6) -- and a queue that stops (ring stop, reset) must leave its thread
without disturbing the queues that share it, and may join again.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile

import pytest
import trio
from test_blk_dataplane import FLUSH, IN, OK, OUT, hdr

from virtio.cli import build_parser
from virtio.cli.serve import _export_parser, export_argv
from virtio.device import ActiveDevice
from virtio.devices.blk import BlkOptions, VirtioBlk
from virtio.devices.blk.dataplane import uring_usable
from virtio.memory import MmapGuestMemory
from virtio.native import ffi, lib
from virtio.queues import Virtqueue
from virtio.testing.driver import DriverQueue
from virtio.testing.harness import EventfdNotifier

QUEUES = 3
THREADS = 2
MiB = 1 << 20

pytestmark = pytest.mark.skipif(not uring_usable(), reason="io_uring is not usable here")


class MultiRig:
    """A device with QUEUES queues, each driven through its own kick / call eventfds."""

    def __init__(self, tmp_path, **options) -> None:
        image = tmp_path / "disk.img"
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        self.image = image
        self.device = VirtioBlk.from_options(
            BlkOptions(path=str(image), num_queues=QUEUES, **options)
        )
        features = self.device.offered_features()
        self.device.ack_features(features)
        self.mem = MmapGuestMemory.anonymous(QUEUES * 2 * MiB)
        self.drvs = [
            DriverQueue(self.mem, 64, base=i * 2 * MiB, event_idx=True, data_size=MiB)
            for i in range(QUEUES)
        ]
        self.notifiers = [EventfdNotifier() for _ in range(QUEUES)]
        self.errors: list = []
        self.active = ActiveDevice(
            self.mem,
            features,
            {i: Virtqueue(self.mem, d.state()) for i, d in enumerate(self.drvs)},
            dict(enumerate(self.notifiers)),
            self.errors.append,
        )

    def submit(self, q: int, readable, writable) -> int:
        token = self.drvs[q].add(readable, writable)
        if self.drvs[q].publish():
            os.eventfd_write(self.notifiers[q].kick_fd, 1)
        return token

    async def wait_all(self, q: int, tokens: list[int]) -> dict:
        """The used entries of tokens on queue q (waiting on its call eventfd)."""
        got: dict = {}
        with trio.fail_after(20):
            while not set(tokens) <= got.keys():
                for used in self.drvs[q].get_used():
                    got[used.id] = used
                if self.errors:
                    raise self.errors[0]
                if set(tokens) <= got.keys():
                    break
                self.drvs[q].set_interrupts(True)
                with trio.move_on_after(0.05):
                    await trio.lowlevel.wait_readable(self.notifiers[q].call_fd)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.notifiers[q].call_fd)
        return got

    def close(self) -> None:
        self.device.close()
        self.mem.close()
        for n in self.notifiers:
            n.close()


@pytest.fixture
def rig(tmp_path):
    r = MultiRig(tmp_path, cache="writethrough", queue_threads=THREADS)
    yield r
    r.close()


async def run_queue(rig: MultiRig, q: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await rig.device.serve_queue(rig.active, q)


async def start_queue(rig: MultiRig, nursery: trio.Nursery, q: int) -> trio.CancelScope:
    scope = await nursery.start(run_queue, rig, q)
    with trio.fail_after(10):
        while not any(p.index == q and p.c is not None for p in rig.device.dataplanes):
            await trio.sleep(0.001)
    return scope


def plane(rig: MultiRig, q: int):
    return next(p for p in rig.device.dataplanes if p.index == q)


async def write_read_flush(rig: MultiRig, q: int, sector: int, rounds: int = 4) -> None:
    """Write-through writes (a write linked to an fdatasync on the ring), reads back,
    FLUSH: all on queue q, several in flight at once."""
    blobs = [os.urandom(4096) for _ in range(rounds)]
    tokens = [rig.submit(q, [hdr(OUT, sector + 8 * i), blob], [1]) for i, blob in enumerate(blobs)]
    tokens.append(rig.submit(q, [hdr(FLUSH)], [1]))
    used = await rig.wait_all(q, tokens)
    assert all(used[t].data == bytes([OK]) for t in tokens)
    reads = [rig.submit(q, [hdr(IN, sector + 8 * i)], [4096, 1]) for i in range(rounds)]
    used = await rig.wait_all(q, reads)
    assert [used[t].data for t in reads] == [blob + bytes([OK]) for blob in blobs]


def thread_names() -> set[str]:
    """This process's threads as the OS names them (``/proc/self/task/*/comm``)."""
    names = set()
    for comm in pathlib.Path("/proc/self/task").glob("*/comm"):
        with contextlib.suppress(OSError):  # a thread that just ended
            names.add(comm.read_text().strip())
    return names


async def test_fewer_threads_than_queues_serve_every_queue(rig):
    async with trio.open_nursery() as nursery:
        for q in range(QUEUES):
            await start_queue(rig, nursery, q)
        async with trio.open_nursery() as load:  # every queue busy at once
            for q in range(QUEUES):
                load.start_soon(write_read_flush, rig, q, 8 + 256 * q)
        # Queue i on thread i mod THREADS: two threads for three queues.
        groups = [rig.device.queue_thread(k).c for k in range(THREADS)]
        for q in range(QUEUES):
            assert plane(rig, q).c.core.group == groups[q % THREADS]
        assert len(rig.device._queue_threads) == THREADS
        # named for the OS too (top -H, perf): QueueThread's name
        assert {f"blk-queues-{k}" for k in range(THREADS)} <= thread_names()
        for q in range(QUEUES):
            stats = plane(rig, q).statistics()
            # served on the ring by the native thread, none handed to Python
            assert stats["async_started"] >= 5 and stats["deferred"] == 0, (q, stats)
            assert stats["ring_wait"] == 1 and stats["queue_thread"] == q % THREADS
        nursery.cancel_scope.cancel()
    # Every queue left: the threads ended.
    with trio.fail_after(10):
        while any(rig.device.queue_thread(k).c.running for k in range(THREADS)):
            await trio.sleep(0.001)
    data = rig.image.read_bytes()
    assert data[(8 + 512) * 512 : (8 + 512) * 512 + 4096] != bytes(4096)  # queue 2 wrote


async def test_a_queue_leaves_and_rejoins_a_shared_thread(rig):
    async with trio.open_nursery() as nursery:
        scopes = [await start_queue(rig, nursery, q) for q in range(QUEUES)]
        await write_read_flush(rig, 2, 8, rounds=2)
        # Queue 2 stops (as on GET_VRING_BASE); queue 0 shares its thread and goes on.
        scopes[2].cancel()
        with trio.fail_after(10):
            while any(p.index == 2 for p in rig.device.dataplanes):
                await trio.sleep(0.001)
        await write_read_flush(rig, 0, 64)
        await write_read_flush(rig, 1, 128)
        # Queue 2 starts again: it joins the running thread and is served.
        await start_queue(rig, nursery, 2)
        assert plane(rig, 2).c.core.group == rig.device.queue_thread(0).c
        await write_read_flush(rig, 2, 192)
        await write_read_flush(rig, 0, 320)
        nursery.cancel_scope.cancel()


async def test_a_ring_that_cannot_be_waited_in_falls_back_to_a_thread_each(rig, caplog):
    # Kernels whose eventfd READs on a ring fail instead of waiting: a shared thread
    # cannot wait for its queues in one io_uring, so each queue gets its own thread
    # (polling its ring's eventfd), logged once per queue.
    lib.aio_set_ring_wait(0)
    try:
        async with trio.open_nursery() as nursery:
            for q in range(QUEUES):
                await start_queue(rig, nursery, q)
            for q in range(QUEUES):
                await write_read_flush(rig, q, 8 + 64 * q, rounds=2)
            for q in range(QUEUES):
                stats = plane(rig, q).statistics()
                assert (stats["queue_thread"], stats["ring_wait"]) == (-1, 0), stats
                assert stats["engine_used"] == lib.BLK_AIO_URING
            nursery.cancel_scope.cancel()
    finally:
        lib.aio_set_ring_wait(1)
    assert caplog.text.count("cannot share a thread") == QUEUES


async def test_default_is_a_thread_per_queue(tmp_path):
    rig = MultiRig(tmp_path, cache="writethrough")
    try:
        async with trio.open_nursery() as nursery:
            for q in range(QUEUES):
                await start_queue(rig, nursery, q)
            for q in range(QUEUES):
                await write_read_flush(rig, q, 8 + 64 * q, rounds=1)
                assert plane(rig, q).queue_thread() is None
            # trio's worker threads, named for their queue while they serve it
            assert {f"VirtioBlk-vq{q}" for q in range(QUEUES)} <= thread_names()
            for q in range(QUEUES):
                assert plane(rig, q).c.core.group == ffi.NULL
                assert plane(rig, q).statistics()["queue_thread"] == -1
            nursery.cancel_scope.cancel()
    finally:
        rig.close()


def test_queue_threads_option():
    args = build_parser().parse_args(
        ["serve", "blk", "--socket-path", "s", "--blk-file", "d", "--queue-threads", "2"]
    )
    assert args.queue_threads == 2
    parser = _export_parser("blk")  # --export blk,...,queue-threads=2 / export-add
    spec = {"socket-path": "s", "blk-file": "d", "queue-threads": "2"}
    assert parser.parse_args(export_argv(parser, spec)).queue_threads == 2
    with pytest.raises(ValueError, match="queue_threads"):
        BlkOptions(queue_threads=65)
    with pytest.raises(ValueError, match="queue_threads"):
        BlkOptions(queue_threads=-1)


def test_default_data_plane_threads():
    """Without --queue-threads: one thread for several queues under cache=none with
    io_uring (O_DIRECT: QEMU's one iothread; issue 8's CPU-per-I/O point), a thread
    per queue otherwise; an explicit value always wins."""
    assert BlkOptions(cache="none", num_queues=2).data_plane_threads == 1
    assert BlkOptions(cache="none", num_queues=1).data_plane_threads == 0
    assert BlkOptions(cache="none", num_queues=2, aio="threads").data_plane_threads == 0
    for cache in ("writeback", "writethrough", "unsafe"):
        assert BlkOptions(cache=cache, num_queues=2).data_plane_threads == 0
    assert BlkOptions(cache="none", num_queues=2, queue_threads=0).data_plane_threads == 0
    assert BlkOptions(cache="writeback", num_queues=4, queue_threads=2).data_plane_threads == 2
    args = build_parser().parse_args(["serve", "blk", "--socket-path", "s", "--blk-file", "d"])
    assert args.queue_threads is None


async def test_cache_none_shares_one_thread_by_default():
    # an ext4 directory: O_DIRECT is refused on tmpfs
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        rig = MultiRig(pathlib.Path(d), cache="none")
        try:
            async with trio.open_nursery() as nursery:
                for q in range(QUEUES):
                    await start_queue(rig, nursery, q)
                for q in range(QUEUES):
                    await write_read_flush(rig, q, 8 + 64 * q, rounds=1)
                    assert plane(rig, q).c.core.group != ffi.NULL
                    assert plane(rig, q).statistics()["queue_thread"] == 0
                nursery.cancel_scope.cancel()
        finally:
            rig.close()
