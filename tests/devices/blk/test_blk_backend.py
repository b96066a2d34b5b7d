"""RawFileBackend against real files: locking, zero-copy vectored I/O, durability
(fdatasync), hole punching, write-zeroes fallbacks, batching; and a Hypothesis
model test of the whole device over a raw image versus a bytearray.
"""

from __future__ import annotations

import itertools
import os
import random
import tempfile

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.devices.blk import (
    BlkOptions,
    BlockBackend,
    ImageLockedError,
    MemoryBackend,
    RawFileBackend,
    VirtioBlk,
)
from virtio.devices.blk.config import WRITEBACK_OFFSET
from virtio.errors import BackendIOError
from virtio.spec.blk import (
    VIRTIO_BLK_SECTOR_SIZE,
    BlkDiscardFlag,
    BlkReqType,
    BlkStatus,
    virtio_blk_discard_write_zeroes,
    virtio_blk_outhdr,
)
from virtio.testing.harness import DeviceHarness

SECTOR = VIRTIO_BLK_SECTOR_SIZE
T = BlkReqType
OK = BlkStatus.VIRTIO_BLK_S_OK
UNMAP = int(BlkDiscardFlag.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
MIB = 1 << 20


def hdr(req_type: int, sector: int = 0) -> bytes:
    return virtio_blk_outhdr.build({"type": req_type, "reserved": 0, "sector": sector})


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return virtio_blk_discard_write_zeroes.build(
        {"sector": sector, "num_sectors": num, "flags": flags}
    )


def make_image(path, size: int, *, fill: bytes | None = None) -> bytes:
    data = fill if fill is not None else random.Random(size).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def views_of(buf: bytearray, *cuts: int) -> list[memoryview]:
    mv = memoryview(buf)
    bounds = [0, *cuts, len(buf)]
    return [mv[a:b] for a, b in itertools.pairwise(bounds)]


# -- locking ---------------------------------------------------------------------------------
def test_second_writer_gets_image_locked_error(tmp_path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, MIB)
    with RawFileBackend(path) as first:
        with pytest.raises(ImageLockedError, match="in use") as info:
            RawFileBackend(path)
        assert info.value.path == str(path)
        with pytest.raises(ImageLockedError):
            RawFileBackend(path, read_only=True)
        with RawFileBackend(path, lock=False) as unlocked:  # explicit opt-out
            assert unlocked.size == first.size == MIB
    with RawFileBackend(path, read_only=True) as r1, RawFileBackend(path, read_only=True) as r2:
        assert r1.read_only and r2.read_only  # readers share
        with pytest.raises(ImageLockedError):
            RawFileBackend(path)
    RawFileBackend(path).close()  # lock released on close


def test_from_options_opens_locked_image(tmp_path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, MIB + 100)
    dev = VirtioBlk.from_options(BlkOptions(path=path, serial="s1"), force=True)
    try:
        assert dev.capacity == MIB // SECTOR
        with pytest.raises(ImageLockedError):
            VirtioBlk.from_options(BlkOptions(path=path), force=True)
    finally:
        dev.close()
    ro = VirtioBlk.from_options(BlkOptions(path=path, read_only=True), force=True)
    ro.close()
    assert ro.read_only and ro.backend.read_only
    with pytest.raises(ValueError):
        VirtioBlk.from_options(BlkOptions())
    with pytest.raises(FileNotFoundError):
        VirtioBlk.from_options(BlkOptions(path=tmp_path / "missing.img"))


# -- I/O -----------------------------------------------------------------------------------
async def test_vectored_read_write_round_trip(tmp_path) -> None:
    path = tmp_path / "disk.img"
    original = make_image(path, MIB)
    with RawFileBackend(path) as b:
        assert isinstance(b, BlockBackend)
        buf = bytearray(4096)
        await b.read(8192, views_of(buf, 1, 700, 701, 4000))
        assert buf == original[8192 : 8192 + 4096]
        new = bytearray(random.Random(5).randbytes(3 * SECTOR))
        await b.write(512, views_of(new, 3, 1000), sync=False)
        # more views than IOV_MAX in one call
        many = bytearray(random.Random(6).randbytes(2000 * SECTOR))
        await b.write(4 * SECTOR, views_of(many, *range(SECTOR, len(many), SECTOR)))
        back = bytearray(len(many))
        await b.read(4 * SECTOR, views_of(back, *range(SECTOR, len(back), SECTOR)))
        assert back == many
    disk = path.read_bytes()
    assert disk[512 : 512 + 3 * SECTOR] == new
    assert disk[:512] == original[:512]


async def test_read_past_end_of_file_is_an_error(tmp_path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, 4096)
    with RawFileBackend(path) as b, pytest.raises(BackendIOError, match="end of image"):
        await b.read(4096 - 512, [memoryview(bytearray(1024))])


async def test_read_only_backend_refuses_writes(tmp_path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, 4096)
    with RawFileBackend(path, read_only=True) as b:
        for call in (
            b.write(0, [memoryview(bytes(512))]),
            b.discard([(0, 512)]),
            b.write_zeroes([(0, 512)], unmap=False),
        ):
            with pytest.raises(BackendIOError):
                await call
        await b.flush()  # nothing to make durable
        assert not b.can_unmap


# -- durability ------------------------------------------------------------------------------
async def test_flush_calls_fdatasync_and_concurrent_flushes_coalesce(tmp_path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, MIB)
    with RawFileBackend(path, max_hops=1) as b:
        await b.write(0, [memoryview(bytes(SECTOR))])
        assert b.sync_calls == 0
        await b.flush()
        assert b.sync_calls == 1
        await b.write(0, [memoryview(bytes(SECTOR))], sync=True)  # writethrough write
        assert b.sync_calls == 2
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(b.flush)
        # one hop at a time: the first flush goes alone, the other 9 share one fdatasync
        assert b.sync_calls == 4


async def test_jobs_queued_behind_busy_hops_share_a_thread_hop(tmp_path) -> None:
    path = tmp_path / "disk.img"
    data = make_image(path, MIB)
    with RawFileBackend(path, max_hops=2, max_batch=8) as b:
        bufs = [bytearray(SECTOR) for _ in range(40)]

        async def read(i: int) -> None:
            await b.read(i * SECTOR, [memoryview(bufs[i])])

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(read, i)
        assert all(bufs[i] == data[i * SECTOR : (i + 1) * SECTOR] for i in range(40))
        assert b.batches <= 2 + 38 // 8 + 1


async def test_cancelled_waiter_still_completes_its_io(tmp_path) -> None:
    """Submitted I/O is never abandoned half-way: cancellation waits for it."""
    path = tmp_path / "disk.img"
    make_image(path, MIB)
    with RawFileBackend(path, max_hops=1) as b:
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(b.write, i * SECTOR, [memoryview(b"\x5a" * SECTOR)])
            await trio.sleep(0)
            nursery.cancel_scope.cancel()
    assert path.read_bytes()[: 8 * SECTOR] == b"\x5a" * (8 * SECTOR)


async def test_device_flush_and_writethrough_reach_fdatasync(tmp_path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, MIB)
    dev = VirtioBlk.from_options(BlkOptions(path=path))
    backend = dev.backend
    try:
        async with DeviceHarness.start(dev) as h:
            used = await h.request(0, [hdr(T.VIRTIO_BLK_T_OUT, 0), bytes(SECTOR)], [1])
            assert used.data[-1] == OK and backend.sync_calls == 0  # writeback cache
            used = await h.request(0, [hdr(T.VIRTIO_BLK_T_FLUSH)], [1])
            assert used.data[-1] == OK and backend.sync_calls == 1
            dev.write_config(WRITEBACK_OFFSET, b"\0")  # writethrough
            used = await h.request(0, [hdr(T.VIRTIO_BLK_T_OUT, 1), bytes(SECTOR)], [1])
            assert used.data[-1] == OK and backend.sync_calls == 2
    finally:
        dev.close()


# -- discard / write zeroes ------------------------------------------------------------------
def blocks(path) -> int:
    return os.stat(path).st_blocks


async def test_discard_punches_a_hole(tmp_path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, 4 * MIB)
    before = blocks(path)
    with RawFileBackend(path) as b:
        assert b.can_unmap
        await b.discard([(MIB, MIB), (3 * MIB, 512 * 1024)])
        await b.flush()
    assert blocks(path) <= before - (1536 * 1024) // 512
    disk = path.read_bytes()
    assert len(disk) == 4 * MIB  # KEEP_SIZE
    assert disk[MIB : 2 * MIB] == bytes(MIB)


@pytest.mark.parametrize("unmap", [True, False])
async def test_write_zeroes(tmp_path, unmap: bool) -> None:
    path = tmp_path / "disk.img"
    original = make_image(path, 2 * MIB)
    before = blocks(path)
    with RawFileBackend(path) as b:
        await b.write_zeroes([(4096, MIB), (MIB + 8192, 1000)], unmap=unmap)
    disk = path.read_bytes()
    assert disk[4096 : 4096 + MIB] == bytes(MIB)
    assert disk[MIB + 8192 : MIB + 9192] == bytes(1000)
    assert disk[:4096] == original[:4096] and disk[MIB + 9192 :] == original[MIB + 9192 :]
    if unmap:
        assert blocks(path) < before
    else:
        assert blocks(path) >= before - 8  # ZERO_RANGE keeps the space allocated


@pytest.mark.parametrize("missing", ["punch", "punch+zero-range"])
async def test_write_zeroes_fallbacks(tmp_path, missing: str) -> None:
    """Filesystems without PUNCH_HOLE / ZERO_RANGE: zeroes are written instead."""
    path = tmp_path / "disk.img"
    make_image(path, MIB)
    with RawFileBackend(path) as b:
        b._punch_ok = False
        b._zero_range_ok = missing == "punch"
        await b.write_zeroes([(512, 3 * SECTOR)], unmap=True)
        await b.discard([(8192, 4096)])  # discard: no-op without punch support
        assert not b.can_unmap
    assert path.read_bytes()[512 : 512 + 3 * SECTOR] == bytes(3 * SECTOR)


async def test_device_discard_and_write_zeroes_free_space(tmp_path) -> None:
    path = tmp_path / "disk.img"
    size = 4 * MIB
    original = make_image(path, size)
    start = blocks(path)
    dev = VirtioBlk.from_options(BlkOptions(path=path, max_discard_seg=4))
    try:
        async with DeviceHarness.start(dev, packed=True) as h:
            used = await h.request(
                0,
                [hdr(T.VIRTIO_BLK_T_DISCARD), seg(0, 2048) + seg(4096, 1024)],
                [1],
                use_indirect=True,
            )
            assert used.data[-1] == OK
            after_discard = blocks(path)
            assert after_discard <= start - 3072
            used = await h.request(
                0, [hdr(T.VIRTIO_BLK_T_WRITE_ZEROES), seg(2048, 2048, UNMAP)], [1]
            )
            assert used.data[-1] == OK
            assert blocks(path) <= after_discard - 2048
            used = await h.request(0, [hdr(T.VIRTIO_BLK_T_IN, 2048)], [2048 * SECTOR + 1])
            assert used.data == bytes(2048 * SECTOR) + bytes([OK])
    finally:
        dev.close()
    disk = path.read_bytes()
    assert disk[MIB : 2 * MIB] == bytes(MIB)  # written zeroes
    assert disk[5 * MIB // 2 :] == original[5 * MIB // 2 :]  # untouched


async def test_backend_failure_becomes_ioerr(tmp_path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, MIB)
    dev = VirtioBlk.from_options(BlkOptions(path=path))
    try:
        os.truncate(path, MIB // 2 + 256)  # the image shrinks under the device
        async with DeviceHarness.start(dev) as h:
            # a short read: 768 bytes come from the file, then end of file
            sector = MIB // 2 // SECTOR - 1
            used = await h.request(0, [hdr(T.VIRTIO_BLK_T_IN, sector)], [2 * SECTOR + 1])
            assert used.data[-1] == BlkStatus.VIRTIO_BLK_S_IOERR
            # the used length covers data[]; those bytes were written (zeroed, not stale)
            assert used.written == 2 * SECTOR + 1 and used.data[:-1] == bytes(2 * SECTOR)
            assert not h.driver_errors
    finally:
        dev.close()


# -- model test ------------------------------------------------------------------------------
DISK_SECTORS = 64

sector_range = st.integers(0, DISK_SECTORS - 1).flatmap(
    lambda s: st.tuples(st.just(s), st.integers(1, min(8, DISK_SECTORS - s)))
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), sector_range, st.integers(0, 255), st.integers(0, 3)),
        st.tuples(st.just("read"), sector_range, st.integers(0, 3)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("discard"), sector_range),
        st.tuples(st.just("zeroes"), sector_range, st.booleans()),
        st.tuples(st.just("writeback"), st.booleans()),
    ),
    min_size=1,
    max_size=25,
)


def _split(n: int, cuts: int, seed: int) -> list[int]:
    """Writable lengths for an IN of ``n`` data bytes + status, in ``cuts`` + 1 pieces."""
    rnd = random.Random(seed)
    points = sorted(rnd.sample(range(1, n + 1), min(cuts, n)))
    bounds = [0, *points, n + 1]
    return [b - a for a, b in itertools.pairwise(bounds) if b > a]


async def _run_model(path: str, ops_list, packed: bool) -> None:
    with open(path, "rb") as f:
        model = bytearray(f.read())
    assert len(model) == DISK_SECTORS * SECTOR
    dev = VirtioBlk.from_options(BlkOptions(path=path, max_discard_seg=1))
    try:
        async with DeviceHarness.start(dev, packed=packed) as h:
            for op in ops_list:
                kind = op[0]
                if kind == "write":
                    (sector, n), byte, cuts = op[1], op[2], op[3]
                    data = bytes([byte]) * (n * SECTOR - 1) + bytes([sector])
                    buf = hdr(T.VIRTIO_BLK_T_OUT, sector) + data
                    step = max(1, len(buf) // (cuts + 1))
                    readable = [buf[i : i + step] for i in range(0, len(buf), step)]
                    used = await h.request(0, readable, [1])
                    model[sector * SECTOR : (sector + n) * SECTOR] = data
                elif kind == "read":
                    (sector, n), cuts = op[1], op[2]
                    used = await h.request(
                        0, [hdr(T.VIRTIO_BLK_T_IN, sector)], _split(n * SECTOR, cuts, sector)
                    )
                    assert used.data[:-1] == model[sector * SECTOR : (sector + n) * SECTOR]
                elif kind == "flush":
                    used = await h.request(0, [hdr(T.VIRTIO_BLK_T_FLUSH)], [1])
                elif kind == "discard":
                    sector, n = op[1]
                    used = await h.request(0, [hdr(T.VIRTIO_BLK_T_DISCARD), seg(sector, n)], [1])
                    # contents after discard are undefined (§5.2.6.1); RawFileBackend
                    # punches holes, i.e. zeroes
                    model[sector * SECTOR : (sector + n) * SECTOR] = bytes(n * SECTOR)
                elif kind == "zeroes":
                    (sector, n), unmap = op[1], op[2]
                    body = seg(sector, n, UNMAP if unmap else 0)
                    used = await h.request(0, [hdr(T.VIRTIO_BLK_T_WRITE_ZEROES), body], [1])
                    model[sector * SECTOR : (sector + n) * SECTOR] = bytes(n * SECTOR)
                else:
                    dev.write_config(WRITEBACK_OFFSET, bytes([op[1]]))
                    continue
                assert used.data[-1] == OK, op
            assert not h.driver_errors
    finally:
        dev.close()
    with open(path, "rb") as f:
        assert f.read() == model


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops_list=ops, packed=st.booleans())
def test_model_raw_file_matches_bytearray(ops_list, packed: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "disk.img")
        make_image(path, DISK_SECTORS * SECTOR)
        trio.run(_run_model, path, ops_list, packed)


async def test_memory_backend_matches_protocol() -> None:
    b = MemoryBackend(4096)
    assert isinstance(b, BlockBackend)
    await b.write(512, [memoryview(b"\1" * 512)])
    out = bytearray(1024)
    await b.read(0, [memoryview(out)])
    assert out == bytes(512) + b"\1" * 512
    with pytest.raises(BackendIOError):
        await b.read(4096 - 512, [memoryview(bytearray(1024))])


def test_locked_image_names_the_holder_pid(tmp_path) -> None:
    """issue 13 §2: a held image lock names the holder's pid (from /proc fdinfo)."""
    import subprocess
    import sys

    path = tmp_path / "held.img"
    make_image(path, MIB)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from virtio.devices.blk.backend import RawFileBackend; "
         f"b = RawFileBackend({str(path)!r}); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ImageLockedError, match=rf"\(pid {holder.pid}\)") as info:
            RawFileBackend(path)
        assert info.value.holders == [holder.pid]
    finally:
        holder.kill()
        holder.communicate()
