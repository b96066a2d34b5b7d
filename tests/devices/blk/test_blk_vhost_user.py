"""VirtioBlk behind the vhost-user server, driven by the Python front-end over a
socketpair: memfd-backed guest memory (mmap) straight into preadv/pwritev."""

from __future__ import annotations

import socket

import trio

from virtio.devices.blk import BlkOptions, VirtioBlk
from virtio.devices.blk.config import CONFIG_SIZE
from virtio.spec.blk import (
    VIRTIO_BLK_SECTOR_SIZE,
    BlkReqType,
    BlkStatus,
    virtio_blk_config,
    virtio_blk_outhdr,
)
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.server import VhostUserServer

MiB = 1 << 20
SECTOR = VIRTIO_BLK_SECTOR_SIZE
T = BlkReqType
OK = BlkStatus.VIRTIO_BLK_S_OK


def hdr(req_type: int, sector: int = 0) -> bytes:
    return virtio_blk_outhdr.build({"type": req_type, "reserved": 0, "sector": sector})


async def test_blk_over_vhost_user(tmp_path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4 * MiB))
    dev = VirtioBlk.from_options(BlkOptions(path=path, num_queues=2, serial="vu-disk"))
    server = VhostUserServer(dev)
    ram = GuestRam(8 * MiB)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                nursery.start_soon(server.serve_connection, b)
                fe = VhostUserFrontend(a)
                await fe.negotiate()
                cfg = virtio_blk_config.parse(await fe.get_config(0, CONFIG_SIZE))
                assert cfg.capacity == 4 * MiB // SECTOR and cfg.num_queues == 2
                await fe.set_mem_table(ram)
                vqs = [
                    await fe.setup_vring(0, ram, size=64, offset=0),
                    await fe.setup_vring(1, ram, size=64, offset=4 * MiB),
                ]
                data = bytes(range(256)) * 32  # 8 KiB
                for q, vq in enumerate(vqs):
                    vq.driver.add([hdr(T.VIRTIO_BLK_T_OUT, 16 * q), data], [1])
                    vq.publish_and_kick()
                    (used,) = await vq.wait_used()
                    assert used.data == bytes([OK])
                    vq.driver.add([hdr(T.VIRTIO_BLK_T_IN, 16 * q)], [len(data) + 1])
                    vq.driver.add([hdr(T.VIRTIO_BLK_T_FLUSH)], [1])
                    vq.driver.add([hdr(T.VIRTIO_BLK_T_GET_ID)], [20, 1])
                    vq.publish_and_kick()
                    got = await vq.wait_used(3)
                    by_len = sorted(got, key=lambda u: u.written)
                    assert [u.written for u in by_len] == [1, 21, len(data) + 1]
                    assert by_len[0].data == bytes([OK])
                    assert by_len[1].data == b"vu-disk" + bytes(13) + bytes([OK])
                    assert by_len[2].data == data + bytes([OK])
                await fe.aclose()
    finally:
        ram.close()
        dev.close()
    disk = path.read_bytes()
    assert disk[: len(data)] == data and disk[16 * SECTOR : 16 * SECTOR + len(data)] == data
    assert dev.backend.sync_calls >= 2
