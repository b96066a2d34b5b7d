"""qcow2 reads of allocated clusters in the native data plane (issue 9 §1: "the hot
path of an allocated-cluster read does not enter the Python interpreter").

The data plane serves a read itself when the image's cluster map
(``virtio/devices/blk/qcow2/native.py``, ``struct qcow2_map``) names every cluster of
it; writes, FLUSH, DISCARD and reads of unallocated, zero, compressed or backing
clusters go to the Python qcow2 code; a write is the data plane's own only into
clusters the image owns (refcount 1: no metadata changes).  Checked here through the data plane as
vhost-user drives it (kick and call eventfds): native reads on both engines and
with and without O_DIRECT, a discarded cluster whose space is reused by another
guest cluster, and an L2 entry pointing into the image's own metadata.
"""

from __future__ import annotations

import os
import struct
import subprocess

import pytest
import trio
from test_blk_dataplane import IN, IOERR, OK, OUT, Rig, hdr, serve

from virtio.spec.blk import BlkReqType

DISCARD = int(BlkReqType.VIRTIO_BLK_T_DISCARD)
FLUSH = int(BlkReqType.VIRTIO_BLK_T_FLUSH)
CS = 65536
SPC = CS // 512  # sectors per cluster
pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "qemu-img"], capture_output=True).returncode != 0,
    reason="qemu-img is needed",
)


def _check(image) -> None:
    r = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("cache", "aio"),
    [
        ("writeback", "io_uring"),
        ("none", "io_uring"),
        ("writeback", "threads"),
        ("none", "threads"),
    ],
)
async def test_allocated_cluster_reads_never_reach_python(tmp_path, cache, aio):
    rig = Rig(tmp_path, image_format="qcow2", cache=cache, aio=aio, size=4 << 20)
    data = {c: os.urandom(8192) for c in (0, 3, 17)}
    try:
        async with trio.open_nursery() as nursery:
            plane = await serve(rig, nursery)
            for c, d in data.items():
                assert (await rig.request([hdr(OUT, c * SPC), d], [1])).data == bytes([OK])
            before = plane.statistics()
            for c, d in data.items():  # the second 4 KiB of what was written
                used = await rig.request([hdr(IN, c * SPC + 8)], [4096, 1])
                assert used.data == d[4096:] + bytes([OK])
            used = await rig.request([hdr(IN, 5 * SPC)], [4096, 1])  # unallocated
            assert used.data == bytes(4096) + bytes([OK])
            after = plane.statistics()
            assert after["qcow2_reads"] - before["qcow2_reads"] == 3, after
            assert after["deferred"] - before["deferred"] == 1, after  # the unallocated one
            if cache == "none":
                assert after["bounced"] >= 3  # O_DIRECT, driver buffers 16-byte aligned
            nursery.cancel_scope.cancel()
    finally:
        rig.close()
    _check(rig.image)


@pytest.mark.parametrize(
    ("cache", "aio"),
    [
        ("writeback", "io_uring"),
        ("none", "io_uring"),
        ("none", "threads"),
    ],
)
async def test_writes_into_owned_clusters_are_native_and_reach_the_image(tmp_path, cache, aio):
    # cache=none: the O_DIRECT descriptor the data plane uses must be writable (it was
    # opened read-only once, and every native write failed EBADF -> IOERR)
    rig = Rig(tmp_path, image_format="qcow2", cache=cache, aio=aio, size=4 << 20)
    first, second = os.urandom(CS), os.urandom(8192)
    ok = bytes([OK])
    want = first[:8192] + second + first[16384:]
    try:
        async with trio.open_nursery() as nursery:
            plane = await serve(rig, nursery)
            assert (await rig.request([hdr(OUT, 4 * SPC), first], [1])).data == ok  # allocates
            before = plane.statistics()
            assert (await rig.request([hdr(OUT, 4 * SPC + 16), second], [1])).data == ok
            assert (await rig.request([hdr(OUT, 6 * SPC), second], [1])).data == ok
            assert (await rig.request([hdr(FLUSH)], [1])).data == ok
            after = plane.statistics()
            # in place: native; an unallocated cluster and the flush: Python
            assert after["qcow2_writes"] - before["qcow2_writes"] == 1, after
            assert after["deferred"] - before["deferred"] == 2, after
            assert (await rig.request([hdr(IN, 4 * SPC)], [CS, 1])).data == want + ok
            nursery.cancel_scope.cancel()
    finally:
        rig.close()
    _check(rig.image)
    raw = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(rig.image), str(raw)], check=True)
    data = raw.read_bytes()
    assert data[4 * CS : 5 * CS] == want
    assert data[6 * CS : 6 * CS + 8192] == second


async def test_discarded_cluster_is_not_read_natively_once_its_space_is_reused(tmp_path):
    # Cluster 2 is written and read natively, then discarded; after the flush that
    # gives its host cluster back, cluster 9's write reuses that host cluster.  A
    # read of cluster 2 must now be zeros (Python), never cluster 9's bytes.
    rig = Rig(tmp_path, image_format="qcow2", size=4 << 20)
    a, b = os.urandom(CS), os.urandom(CS)
    try:
        async with trio.open_nursery() as nursery:
            plane = await serve(rig, nursery)
            native = rig.device.backend.image.native
            assert (await rig.request([hdr(OUT, 2 * SPC), a], [1])).data == bytes([OK])
            assert (await rig.request([hdr(IN, 2 * SPC)], [CS, 1])).data == a + bytes([OK])
            assert plane.statistics()["qcow2_reads"] == 1
            host = native.lookup(2)
            assert host
            seg = struct.pack("<QII", 2 * SPC, SPC, 0)
            assert (await rig.request([hdr(DISCARD), seg], [1])).data == bytes([OK])
            assert native.lookup(2) == 0
            assert (await rig.request([hdr(FLUSH)], [1])).data == bytes([OK])
            assert (await rig.request([hdr(OUT, 9 * SPC), b], [1])).data == bytes([OK])
            assert native.lookup(9) == host  # the freed cluster, reused
            assert (await rig.request([hdr(IN, 2 * SPC)], [CS, 1])).data == bytes(CS + 1)[
                :-1
            ] + bytes([OK])
            assert (await rig.request([hdr(IN, 9 * SPC)], [CS, 1])).data == b + bytes([OK])
            assert plane.statistics()["qcow2_reads"] == 2
            nursery.cancel_scope.cancel()
    finally:
        rig.close()
    _check(rig.image)


async def test_l2_entry_pointing_at_the_images_metadata_is_refused(tmp_path):
    # A hostile image: cluster 1's L2 entry names the L1 table's own cluster.  The
    # map never names it (same checks as a Python read), and Python answers IOERR:
    # the guest never sees the image's metadata as its data.
    rig = Rig(tmp_path, image_format="qcow2", size=4 << 20)
    rig.device.close()
    image = rig.image
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(image)],
                   check=True, capture_output=True)  # fmt: skip
    raw = bytearray(image.read_bytes())
    (l1_off,) = struct.unpack_from(">Q", raw, 40)
    (l1e,) = struct.unpack_from(">Q", raw, l1_off)
    l2_off = l1e & 0x00FF_FFFF_FFFF_FE00
    struct.pack_into(">Q", raw, l2_off + 8, (1 << 63) | l1_off)
    image.write_bytes(raw)
    rig.device = type(rig.device).from_options(rig.device.options, image_format="qcow2")
    rig.device.ack_features(rig.active.features)
    try:
        async with trio.open_nursery() as nursery:
            plane = await serve(rig, nursery)
            # The first read of a cluster whose L2 table Python has not used since
            # the image was opened goes to Python (which enters the table's clusters
            # into the map); the second is native.
            for _ in range(2):
                used = await rig.request([hdr(IN, 0)], [4096, 1])
                assert used.data == b"\x5a" * 4096 + bytes([OK])
            assert plane.statistics()["qcow2_reads"] == 1
            used = await rig.request([hdr(IN, SPC)], [4096, 1])
            assert used.data[-1] == IOERR
            assert rig.device.backend.image.native.lookup(1) == 0
            assert plane.statistics()["qcow2_reads"] == 1
            nursery.cancel_scope.cancel()
    finally:
        rig.close()


@pytest.mark.parametrize(
    ("cache", "aio"), [("writeback", "io_uring"), ("none", "io_uring"), ("none", "threads")]
)
async def test_unallocated_clusters_over_a_raw_backing_file_are_read_natively(tmp_path, cache, aio):
    """A fresh overlay over a raw file: clusters the overlay does not have are read
    from the base by the data plane (``QCOW2_MAP_BACKING``); a cluster only partly
    inside the base, past it, written (copy-on-write) or discarded (a zero cluster
    over a backing file) is Python's or read from the overlay, never the stale base."""
    base = tmp_path / "base.raw"
    base_bytes = os.urandom(3 * CS + CS // 2)  # cluster 3 half inside the base
    base.write_bytes(base_bytes)
    top = tmp_path / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
         str(top), str(4 << 20)],
        check=True,
    )  # fmt: skip
    rig = Rig(tmp_path, image_format="qcow2", image=top, cache=cache, aio=aio)
    ok = bytes([OK])
    new = os.urandom(4096)
    try:
        async with trio.open_nursery() as nursery:
            plane = await serve(rig, nursery)

            async def read(sector: int, n: int) -> bytes:
                used = await rig.request([hdr(IN, sector)], [n, 1])
                assert used.data[-1:] == ok
                return used.data[:-1]

            assert await read(0, 4096) == base_bytes[:4096]  # Python's: enters the region
            s0 = plane.statistics()
            assert s0["deferred"] == 1 and s0["qcow2_backing_reads"] == 0, s0
            assert await read(SPC + 8, 4096) == base_bytes[CS + 4096 : CS + 8192]
            assert await read(SPC - 8, 8192) == base_bytes[CS - 4096 : CS + 4096]  # 2 clusters
            s1 = plane.statistics()
            assert s1["qcow2_backing_reads"] - s0["qcow2_backing_reads"] == 2, s1
            assert await read(3 * SPC, CS) == base_bytes[3 * CS :] + bytes(CS // 2)
            assert await read(10 * SPC, 4096) == bytes(4096)  # past the base
            s2 = plane.statistics()
            assert s2["qcow2_backing_reads"] == s1["qcow2_backing_reads"], s2
            assert s2["deferred"] - s1["deferred"] >= 2, s2  # (+ a first L2 lookup)
            # copy-on-write into cluster 1, discard of cluster 2
            assert (await rig.request([hdr(OUT, SPC + 8), new], [1])).data == ok
            assert (
                await rig.request([hdr(DISCARD), struct.pack("<QII", 2 * SPC, SPC, 0)], [1])
            ).data == ok
            want1 = base_bytes[CS : CS + 4096] + new + base_bytes[CS + 8192 : 2 * CS]
            s3 = plane.statistics()
            assert await read(SPC, CS) == want1
            assert await read(2 * SPC, CS) == bytes(CS)
            assert await read(8, 4096) == base_bytes[4096:8192]  # cluster 0: the base still
            s4 = plane.statistics()
            assert s4["qcow2_backing_reads"] - s3["qcow2_backing_reads"] == 1, s4
            assert s4["qcow2_reads"] - s3["qcow2_reads"] == 2, s4  # cluster 1 from the top
            nursery.cancel_scope.cancel()
    finally:
        rig.close()
    _check(top)
    raw = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(raw)], check=True)
    data = raw.read_bytes()
    assert data[CS : 2 * CS] == want1
    assert data[2 * CS : 3 * CS] == bytes(CS)
    assert data[:CS] == base_bytes[:CS]
