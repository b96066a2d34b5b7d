"""Asynchronous completion in the native data plane (issue 8 §1, §2).

Two halves:

* The generic core (``virtio/native/dataplane.c``) with a scripted device
  (``struct dp_script``: every chain is taken asynchronously and the test decides
  when, and in which order, each completes): out-of-order completion in the used
  ring (virtio 1.4 §2.7.8: buffers may be used in any order), one submission per
  popped batch, one used-index publication per reaped batch, inflight marks that
  stay set until a chain's used entry is published (vhost-user "Inflight I/O
  tracking"), failed completions deferred to Python, and a stop that waits for
  chains in progress.
* virtio-blk on both I/O engines (io_uring, worker threads) and every cache mode:
  data round trips, deep queues in flight at once, O_DIRECT bounce buffers for
  unaligned guest buffers, FLUSH (§5.2.6) after completed writes, write-through
  syncs, unsafe ignoring flushes.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import pytest
import trio
from test_blk_dataplane import IN, IOERR, OK, OUT, Rig, hdr, serve

from virtio.dataplane import NativeDataPlane
from virtio.devices.blk.dataplane import engine_for, uring_usable
from virtio.native import ffi, lib
from virtio.spec.blk import BlkReqType
from virtio.transport.vhost_user.inflight import SplitInflightQueue, queue_region_size

FLUSH = int(BlkReqType.VIRTIO_BLK_T_FLUSH)
ENGINES = ["io_uring", "threads"]


# -- the generic core, with a scripted device ----------------------------------------------
class ScriptPlane(NativeDataPlane):
    """A data plane whose device completes chains when the test says so."""

    c_type: ClassVar[str] = "struct dp_script"
    device_statistics: ClassVar[tuple[str, ...]] = ("submits",)

    def attach(self, c: Any) -> None:
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        assert lib.dp_script_attach(c, self.efd) == 0

    def detach(self) -> None:
        os.close(self.efd)

    def complete_failed(self, chain, err: int) -> int:
        return self.device.complete_failed(chain, OSError(err, os.strerror(err)))

    def started(self) -> list[int]:
        out = ffi.new("uint16_t[]", lib.DP_SCRIPT_MAX)
        n = lib.dp_script_started(self.c, out, lib.DP_SCRIPT_MAX)
        return list(out[0:n])

    def complete(self, heads: list[int], lens: list[int], err: int = 0) -> None:
        lib.dp_script_complete(self.c, heads, lens, err, len(heads))


class Tracker:
    """What vhost-user's inflight tracker offers the data plane (``.area``)."""

    def __init__(self, qsize: int) -> None:
        self.area = SplitInflightQueue(memoryview(bytearray(queue_region_size(qsize))), qsize)
        self.area.initialize(0)

    def on_pop(self, chains) -> None:
        self.area.on_pop(chains)


@pytest.fixture
def split_rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


async def start_script(rig: Rig, nursery: trio.Nursery) -> ScriptPlane:
    plane = ScriptPlane(rig.device, rig.active, 0)
    nursery.start_soon(plane.run)
    with trio.fail_after(10):
        while plane.c is None:
            await trio.sleep(0.001)
    return plane


async def wait_started(plane: ScriptPlane, n: int) -> list[int]:
    with trio.fail_after(10):
        while len(started := plane.started()) < n:
            await trio.sleep(0.001)
    return started


def used_now(rig: Rig) -> list:
    return rig.drv.get_used()


async def wait_used(rig: Rig, n: int) -> list:
    got: list = []
    with trio.fail_after(10):
        while len(got) < n:
            got += rig.drv.get_used()
            if len(got) < n:
                await trio.sleep(0.001)
    return got


async def test_core_completes_out_of_order_and_keeps_inflight_marks(split_rig):
    rig = split_rig
    rig.queue.inflight = Tracker(64)
    area = rig.queue.inflight.area
    async with trio.open_nursery() as nursery:
        plane = await start_script(rig, nursery)
        tokens = [rig.drv.add([hdr(IN, i)], [512, 1]) for i in range(4)]
        rig.drv.publish()
        os.eventfd_write(rig.notifier.kick_fd, 1)
        heads = await wait_started(plane, 4)
        assert heads == tokens  # split ring: the token is the head
        assert all(area.is_inflight(h) for h in heads)
        plane.complete([heads[3], heads[1]], [513, 77])
        used = await wait_used(rig, 2)
        assert [(u.id, u.written) for u in used] == [(tokens[3], 513), (tokens[1], 77)]
        # Published ones are no longer in flight; the others still are.
        assert [area.is_inflight(h) for h in heads] == [True, False, True, False]
        assert area.used_idx == 2
        plane.complete([heads[2], heads[0]], [1, 1])
        used = await wait_used(rig, 2)
        assert [u.id for u in used] == [tokens[2], tokens[0]]
        assert not any(area.is_inflight(h) for h in heads)
        nursery.cancel_scope.cancel()


async def test_core_submits_a_popped_batch_once_and_publishes_a_reaped_batch_once(split_rig):
    rig = split_rig
    async with trio.open_nursery() as nursery:
        plane = await start_script(rig, nursery)
        tokens = [rig.drv.add([hdr(IN, i)], [512, 1]) for i in range(16)]
        rig.drv.publish()
        os.eventfd_write(rig.notifier.kick_fd, 1)
        heads = await wait_started(plane, 16)
        stats = plane.statistics()
        assert (stats["batches"], stats["submits"], stats["max_pending"]) == (1, 1, 16)
        before = stats["publishes"]
        plane.complete(heads[::-1], [1] * 16)  # all at once, newest first
        used = await wait_used(rig, 16)
        assert [u.id for u in used] == tokens[::-1]
        stats = plane.statistics()
        assert stats["publishes"] == before + 1  # one used index update for the 16
        assert stats["calls"] <= 1
        nursery.cancel_scope.cancel()


async def test_core_defers_a_failed_completion_to_python(split_rig):
    rig = split_rig
    async with trio.open_nursery() as nursery:
        plane = await start_script(rig, nursery)
        token = rig.submit([hdr(IN, 0)], [512, 1])
        (head,) = await wait_started(plane, 1)
        plane.complete([head], [0], err=5)  # EIO
        used = await rig.wait(token)
        assert used.data == bytes(512) + bytes([IOERR])
        assert plane.statistics()["io_errors"] == 1
        nursery.cancel_scope.cancel()


async def test_core_stop_waits_for_chains_in_progress(split_rig):
    rig = split_rig
    rig.queue.inflight = Tracker(64)
    area = rig.queue.inflight.area
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        plane = ScriptPlane(rig.device, rig.active, 0)

        async def run() -> None:
            try:
                await plane.run()
            finally:
                done.set()

        scope = trio.CancelScope()
        nursery.start_soon(_run_in, scope, run)
        with trio.fail_after(10):
            while plane.c is None:
                await trio.sleep(0.001)
        tokens = [rig.drv.add([hdr(IN, i)], [512, 1]) for i in range(3)]
        rig.drv.publish()
        os.eventfd_write(rig.notifier.kick_fd, 1)
        heads = await wait_started(plane, 3)
        scope.cancel()  # ring stop while three chains are in progress
        with trio.fail_after(10):
            while not plane.c.core.stop:
                await trio.sleep(0.001)
        plane.complete(heads, [1, 1, 1])
        with trio.fail_after(10):
            await done.wait()
    # The thread published them before it returned: nothing was abandoned.
    assert sorted(u.id for u in used_now(rig)) == sorted(tokens)
    assert not any(area.is_inflight(h) for h in heads)


async def _run_in(scope: trio.CancelScope, fn) -> None:
    with scope:
        await fn()


# -- virtio-blk on both engines and every cache mode -----------------------------------------
@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    return request.param


def test_io_uring_is_usable_on_this_machine():
    # The machine the project is tested on has io_uring (kernel >= 5.6, no seccomp
    # filter): if this fails, every "io_uring" test below silently ran on threads.
    assert uring_usable() and engine_for("io_uring") == "io_uring"


@pytest.mark.parametrize("cache", ["writeback", "none", "writethrough", "unsafe"])
async def test_round_trip_on_every_engine_and_cache_mode(tmp_path, engine, cache):
    rig = Rig(tmp_path, aio=engine, cache=cache, size=4 << 20)
    data = {i: os.urandom(4096) for i in range(32)}
    try:
        async with trio.open_nursery() as nursery:
            plane = await serve(rig, nursery)
            syncs = rig.device.backend.sync_calls
            tokens = [
                rig.submit([hdr(OUT, 8 * i + 8), d], [1], use_indirect=True)
                for i, d in data.items()
            ]
            tokens.append(rig.submit([hdr(FLUSH)], [1]))
            for t in tokens:
                assert (await rig.wait(t)).data == bytes([OK])
            used = await rig.request([hdr(FLUSH)], [1])  # after the writes completed
            assert used.data == bytes([OK])
            tokens = {
                i: rig.submit([hdr(IN, 8 * i + 8)], [4096, 1], use_indirect=True) for i in data
            }
            for i, t in tokens.items():
                assert (await rig.wait(t)).data[:-1] == data[i]
            stats = plane.statistics()
            assert stats["engine_used"] == {"io_uring": 2, "threads": 1}[engine]
            assert (stats["deferred"], stats["reads"], stats["writes"]) == (0, 32, 32), stats
            synced = rig.device.backend.sync_calls - syncs
            if cache == "unsafe":
                assert synced == 0
            elif cache == "writethrough":
                assert synced >= 32 + 2  # every write, and the flushes
            else:
                assert synced >= 2
            if cache == "none":
                # The driver's buffers are 16-byte aligned: O_DIRECT takes a bounce buffer.
                assert stats["bounced"] > 0
                assert stats["max_pending"] > 1  # requests of one batch in flight together
            nursery.cancel_scope.cancel()
        image = rig.image.read_bytes()
        for i, d in data.items():
            assert image[(8 * i + 8) * 512 : (8 * i + 8) * 512 + 4096] == d
    finally:
        rig.close()


async def test_direct_cache_defers_unaligned_requests_on_4k_images(tmp_path, engine):
    """A request not aligned to the logical block size cannot go O_DIRECT: it is
    served by the Python device (buffered descriptor), with the same result."""
    rig = Rig(tmp_path, aio=engine, cache="none")
    backend = rig.device.backend
    try:
        async with trio.open_nursery() as nursery:
            plane = await serve(rig, nursery)
            plane.c.logical_block = 4096  # as on a 4096-byte-sector device
            used = await rig.request([hdr(OUT, 1), b"q" * 512], [1])
            assert used.data == bytes([OK])
            used = await rig.request([hdr(IN, 1)], [512, 1])
            assert used.data == b"q" * 512 + bytes([OK])
            assert plane.statistics()["deferred"] == 2
            used = await rig.request([hdr(IN, 0)], [4096, 1])  # aligned: native
            assert used.data[512:1024] == b"q" * 512
            assert plane.statistics()["deferred"] == 2
            nursery.cancel_scope.cancel()
        assert backend.direct and backend.io_fd != backend.fd
    finally:
        rig.close()


async def test_io_uring_waits_in_its_ring_and_follows_a_replaced_kick_eventfd(tmp_path):
    # One io_uring_enter per wait: kicks, wakes and completions all end it (the kick
    # and wake eventfds are read by requests on the ring itself).  When vhost-user
    # replaces the kick eventfd (SET_VRING_KICK again) and the old number is reused
    # for an unrelated file, the ring must follow the new eventfd and never read the
    # reused number.
    rig = Rig(tmp_path, aio="io_uring", cache="writeback", size=1 << 20)
    try:
        async with trio.open_nursery() as nursery:
            plane = await serve(rig, nursery)
            assert (await rig.request([hdr(IN, 0)], [512, 1])).data[-1:] == bytes([OK])
            assert plane.statistics()["ring_wait"] == 1
            old = rig.notifier.kick_fd
            rig.notifier.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
            plane.fds_changed()
            decoy = os.eventfd(0, os.EFD_NONBLOCK)
            os.dup2(decoy, old)  # the old number now names an unrelated eventfd
            os.close(decoy)
            os.eventfd_write(old, 5)
            kicks = plane.statistics()["kicks"]
            with trio.fail_after(10):
                for i in range(1, 4):
                    used = await rig.request([hdr(IN, i)], [512, 1])
                    assert used.data[-1:] == bytes([OK])
            assert plane.statistics()["kicks"] > kicks
            assert os.eventfd_read(old) == 5  # untouched by the data plane
            os.close(old)
            nursery.cancel_scope.cancel()
    finally:
        rig.close()


@pytest.mark.parametrize("cache", ["writeback", "none"])
async def test_io_uring_without_waiting_in_its_ring(tmp_path, cache):
    # The fallback for kernels where a READ of a non-blocking eventfd on the ring
    # fails instead of waiting: completions signal an eventfd the thread polls.
    lib.aio_set_ring_wait(0)
    rig = Rig(tmp_path, aio="io_uring", cache=cache, size=1 << 20)
    data = {i: os.urandom(4096) for i in range(16)}
    try:
        async with trio.open_nursery() as nursery:
            plane = await serve(rig, nursery)
            tokens = [rig.submit([hdr(OUT, 8 * i), d], [1]) for i, d in data.items()]
            tokens.append(rig.submit([hdr(FLUSH)], [1]))
            for t in tokens:
                assert (await rig.wait(t)).data == bytes([OK])
            for i, d in data.items():
                used = await rig.request([hdr(IN, 8 * i)], [4096, 1])
                assert used.data == d + bytes([OK])
            stats = plane.statistics()
            assert (stats["engine_used"], stats["ring_wait"]) == (lib.BLK_AIO_URING, 0)
            nursery.cancel_scope.cancel()
    finally:
        lib.aio_set_ring_wait(1)
        rig.close()
