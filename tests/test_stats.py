"""Per-queue statistics (``virtio/stats.py``): counted on both paths (native data
plane and Python), kept across connections, summed into export totals."""

from __future__ import annotations

import socket

import pytest
import trio

from virtio.devices.blk import BlkOptions, VirtioBlk
from virtio.spec.blk import BlkReqType, BlkStatus, virtio_blk_outhdr
from virtio.stats import LATENCY_BOUNDS_US, latency_quantile, sum_queues
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.server import VhostUserServer

MiB = 1 << 20
T = BlkReqType
OK = int(BlkStatus.VIRTIO_BLK_S_OK)
UNSUPP = int(BlkStatus.VIRTIO_BLK_S_UNSUPP)


def hdr(req_type: int, sector: int = 0) -> bytes:
    return virtio_blk_outhdr.build({"type": req_type, "reserved": 0, "sector": sector})


async def one_connection(server: VhostUserServer, ram: GuestRam, rounds: int) -> None:
    """Connect, set up both queues, run ``rounds`` x (write 8 KiB, read it, flush,
    get-id, an unknown type) on each queue, disconnect."""
    async with trio.open_nursery() as nursery:
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        nursery.start_soon(server.serve_connection, b)
        fe = VhostUserFrontend(a)
        await fe.negotiate()
        await fe.set_mem_table(ram)
        vqs = [
            await fe.setup_vring(0, ram, size=64, offset=0),
            await fe.setup_vring(1, ram, size=64, offset=4 * MiB),
        ]
        data = bytes(range(256)) * 32  # 8 KiB
        for _ in range(rounds):
            for q, vq in enumerate(vqs):
                vq.driver.add([hdr(T.VIRTIO_BLK_T_OUT, 16 * (q + 1)), data], [1])
                vq.publish_and_kick()
                (used,) = await vq.wait_used()
                assert used.data == bytes([OK])
                vq.driver.add([hdr(T.VIRTIO_BLK_T_IN, 16 * (q + 1))], [len(data) + 1])
                vq.driver.add([hdr(T.VIRTIO_BLK_T_FLUSH)], [1])
                vq.driver.add([hdr(T.VIRTIO_BLK_T_GET_ID)], [20, 1])
                vq.driver.add([hdr(0x7777)], [1])
                vq.publish_and_kick()
                got = await vq.wait_used(4)
                assert sorted(u.data[-1] for u in got) == [OK, OK, OK, UNSUPP]
        await fe.aclose()


@pytest.mark.parametrize("native", [True, False], ids=["dataplane", "python"])
async def test_stats_count_both_paths_across_connections(tmp_path, native) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4 * MiB))
    dev = VirtioBlk.from_options(BlkOptions(path=path, num_queues=2))
    dev.native_dataplane = native
    dev.stats.set_latency_sample(1)  # every request (the default samples batches)
    server = VhostUserServer(dev)
    ram = GuestRam(8 * MiB)
    try:
        with trio.fail_after(30):
            await one_connection(server, ram, rounds=2)
            first = dev.stats.snapshot()
            await one_connection(server, ram, rounds=3)
    finally:
        ram.close()
        dev.close()
    snap = dev.stats.snapshot()
    assert first["totals"]["completed"] == 2 * 2 * 5
    for q in snap["queues"]:
        # 5 rounds over two connections, 5 requests each: nothing vanished with the first
        assert q["completed"] == 25
        assert q["requests"] == {
            "in": 5, "out": 5, "flush": 5, "get-id": 5, "discard": 0, "write-zeroes": 0,
            "other": 5,
        }  # fmt: skip
        assert q["bytes"]["in"] == q["bytes"]["out"] == 5 * 8192
        assert q["status"] == {"ok": 20, "ioerr": 0, "unsupp": 5, "other": 0}
        assert q["in_flight"] == 0
        assert q["dataplane"] + q["python"] == 25
        if native:  # in, out and flush are the data plane's; the rest is deferred
            assert q["dataplane"] == 15  # (sector 0 of a probed image is Python's: not used)
        else:
            assert q["dataplane"] == 0
        lat = q["latency"]
        assert lat["count"] == 25 == sum(lat["buckets_us"])
        assert lat["sum_us"] >= 0
        notes = q["notifications"]
        # one decision per publication: the lone OUT, then the other four in one or more
        decisions = notes["sent"] + notes["suppressed"]
        assert 10 <= decisions <= 25 and notes["sent"] >= 2  # the first of each connection
    totals = snap["totals"]
    assert totals["completed"] == 50 and totals["requests"]["get-id"] == 10
    assert totals["latency"]["buckets_us"] == [
        a + b
        for a, b in zip(
            snap["queues"][0]["latency"]["buckets_us"],
            snap["queues"][1]["latency"]["buckets_us"],
            strict=True,
        )
    ]


def test_sum_and_quantile() -> None:
    a = {"queue": 0, "n": 1, "d": {"x": 2}, "l": [1, 2]}
    b = {"queue": 1, "n": 3, "d": {"x": 5}, "l": [0, 4]}
    assert sum_queues([a, b]) == {"n": 4, "d": {"x": 7}, "l": [1, 6]}
    buckets = [0] * (len(LATENCY_BOUNDS_US) + 1)
    assert latency_quantile(buckets, 0.5) is None
    buckets[3] = 90  # [4, 8) us
    buckets[10] = 10  # [512, 1024) us
    assert latency_quantile(buckets, 0.5) == 8
    assert latency_quantile(buckets, 0.99) == 1024


async def test_latency_histogram_measures_pop_to_used(tmp_path) -> None:
    """Requests held 20 ms by the device land in the [16.4, 32.8) ms bucket or above."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4 * MiB))
    dev = VirtioBlk.from_options(BlkOptions(path=path, num_queues=2))
    dev.native_dataplane = False
    handle = dev.handle

    async def slow(queue_index, chain):
        await trio.sleep(0.02)
        return await handle(queue_index, chain)

    dev.handle = slow
    dev.stats.set_latency_sample(1)
    server = VhostUserServer(dev)
    ram = GuestRam(8 * MiB)
    try:
        with trio.fail_after(30):
            await one_connection(server, ram, rounds=1)
    finally:
        ram.close()
        dev.close()
    lat = dev.stats.snapshot()["totals"]["latency"]
    assert lat["count"] == 10
    assert sum(lat["buckets_us"][15:]) == 10  # bucket 15: [16384, 32768) us
    assert lat["sum_us"] >= 10 * 20_000
    assert latency_quantile(lat["buckets_us"], 0.5) >= 32768


def test_latency_sample_must_be_a_power_of_two() -> None:
    from virtio.stats import QueueStats

    q = QueueStats(0, 8, ("requests",), ("ok",))
    assert q.latency_sample == 4
    q.latency_sample = 1
    assert int(q.c.sample_mask) == 0
    with pytest.raises(ValueError, match="power of two"):
        q.latency_sample = 3


def test_sampled_pops_alone_are_timed_and_stale_stamps_cleared() -> None:
    """One popped batch in ``latency_sample`` is stamped; only its chains count a
    latency when used.  A chain popped in a sampled batch and handed back unused
    (``net_give_back``) has its stamp cleared by the unsampled pop that takes it
    again, so its use counts no latency -- and once no stamp is left, unsampled
    pops and uses skip the per-chain work (``stamped``)."""
    from virtio.native import ffi, lib
    from virtio.stats import QueueStats

    q = QueueStats(0, 8, ("requests",), ("ok",), latency_sample=2)
    c = q.c

    def pop(*heads: int) -> None:
        chains = ffi.new("struct vq_chain[]", len(heads))
        for i, h in enumerate(heads):
            chains[i].head = h
        lib.vq_stats_popped(c, chains, len(heads))

    def use(*ids: int) -> None:
        lib.vq_stats_used(c, ffi.new("uint16_t[]", list(ids)), len(ids))

    pop(0, 1)  # pop 0: sampled
    pop(2)  # pop 1: not
    assert [bool(q._t0[i]) for i in range(4)] == [True, True, False, False]
    assert c.stamped == 2
    use(2, 0, 1)
    assert (c.latency_count, c.completed, c.stamped) == (2, 3, 0)
    pop(3)  # pop 2: sampled, then given back unused
    assert c.stamped == 1
    pop(3)  # pop 3: not sampled: the stale stamp goes
    assert (bool(q._t0[3]), c.stamped) == (False, 0)
    use(3)
    assert (c.latency_count, c.completed) == (2, 4)
    pop(4, 5)  # pop 4: sampled
    pop(6)  # pop 5: not
    use(4, 5, 6)
    assert (c.latency_count, c.completed, c.stamped) == (4, 7, 0)
    assert sum(c.latency[b] for b in range(lib.VQS_LAT_BUCKETS)) == 4
