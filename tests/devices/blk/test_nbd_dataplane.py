"""The native NBD data plane (``virtio/devices/blk/nbd_dataplane.py``,
``virtio/native/nbd_dataplane.c``) against real servers started here (``qemu-nbd``,
``nbdkit``), driven as vhost-user drives it (kick and call eventfds).

IN / OUT / FLUSH (virtio 1.4 §5.2.6) must be served by the thread (its counters say
so) with many requests in flight, the data must be on the server (read back over a
connection of its own), an NBD error reply must reach the guest request as
VIRTIO_BLK_S_IOERR, and a server killed with requests in flight must fail them with
IOERR while the device goes on serving (Python reconnects, then the thread gets a
new connection)."""

from __future__ import annotations

import contextlib
import os
import random
import struct
import subprocess

import pytest
import trio
from test_blk_dataplane import FLUSH, GET_ID, IN, IOERR, OK, OUT, Rig, hdr
from test_nbd_client import QEMU_NBD, MiB, _wait_ready, nbd_server

from virtio.devices.blk.nbd import NbdBackend
from virtio.devices.blk.nbd_dataplane import NbdDataPlane
from virtio.spec.blk import BlkReqType

DISCARD = int(BlkReqType.VIRTIO_BLK_T_DISCARD)


async def serve_nbd(rig: Rig, nursery: trio.Nursery) -> NbdDataPlane:
    assert NbdDataPlane.supported(rig.device, rig.active, 0)
    nursery.start_soon(rig.device.serve_queue, rig.active, 0)
    with trio.fail_after(20):
        while not rig.device.dataplanes:
            await trio.sleep(0.001)
    plane = rig.device.dataplanes[0]
    assert isinstance(plane, NbdDataPlane)
    return plane


async def read_export(uri: str, size: int) -> bytes:
    backend = NbdBackend(uri)
    try:
        got = bytearray(size)
        await backend.read(0, [memoryview(got)])
        return bytes(got)
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("kind", "tcp"), [("qemu-nbd", False), ("nbdkit", False), ("nbdkit", True)],
    ids=["qemu-nbd", "nbdkit", "nbdkit-tcp"],
)  # fmt: skip
async def test_requests_in_flight_are_served_natively(tmp_path, kind, tcp):
    size = 2 * MiB
    with nbd_server(kind, tmp_path, size=size, tcp=tcp) as server:
        rig = Rig(tmp_path, image=server.uri, packed=kind == "nbdkit")
        model = bytearray(size)
        rng = random.Random(kind)
        try:
            async with trio.open_nursery() as nursery:
                plane = await serve_nbd(rig, nursery)
                for _round in range(6):
                    tokens = []  # up to 24 requests in flight, disjoint ranges
                    for i in range(24):
                        sector = i * 160 + rng.randrange(0, 32)
                        n = rng.randrange(1, 64) * 512
                        if rng.random() < 0.5:
                            data = rng.randbytes(n)
                            model[sector * 512 : sector * 512 + n] = data
                            half = n // 1024 * 512
                            t = rig.submit(
                                [hdr(OUT, sector), data[:half], data[half:]], [1], use_indirect=True
                            )
                            tokens.append((t, None))
                        else:
                            t = rig.submit([hdr(IN, sector)], [n, 1], use_indirect=True)
                            tokens.append((t, bytes(model[sector * 512 : sector * 512 + n])))
                    for t, want in tokens:
                        used = await rig.wait(t)
                        assert used.data[-1] == OK
                        if want is not None:
                            assert used.data[:-1] == want
                    used = await rig.request([hdr(FLUSH)], [1])
                    assert used.data == bytes([OK])
                used = await rig.request([hdr(GET_ID)], [20, 1])  # Python's
                assert used.data[-1] == OK
                # (the thread counts a deferral just after handing it over: one more
                # native request, and the count is certainly in)
                assert (await rig.request([hdr(FLUSH)], [1])).data == bytes([OK])
                stats = plane.statistics()
                assert stats["reads"] + stats["writes"] == 6 * 24
                assert stats["flushes"] == 7 and stats["deferred"] == 1
                assert stats["max_pending"] > 1 and stats["conn_failed"] == 0
                nursery.cancel_scope.cancel()
            assert await read_export(server.uri, size) == model  # on the server
        finally:
            rig.close()


async def test_python_writes_stay_coherent_with_the_native_connection(tmp_path):
    # DISCARD goes through Python's connection; what the guest reads next (native
    # connection) must be what it wrote around it.
    with nbd_server("qemu-nbd", tmp_path, size=MiB) as server:
        rig = Rig(tmp_path, image=server.uri)
        try:
            async with trio.open_nursery() as nursery:
                plane = await serve_nbd(rig, nursery)
                data = os.urandom(8192)
                assert (await rig.request([hdr(OUT, 16), data], [1])).data == bytes([OK])
                seg = struct.pack("<QII", 16, 8, 0)  # discard sectors 16..23
                assert (await rig.request([hdr(DISCARD), seg], [1])).data == bytes([OK])
                used = await rig.request([hdr(IN, 16)], [8192, 1])
                assert used.data[4096:-1] == data[4096:]  # not discarded
                assert plane.statistics()["deferred"] == 1
                nursery.cancel_scope.cancel()
        finally:
            rig.close()


async def test_server_error_reaches_the_guest_as_ioerr(tmp_path, caplog):
    args = ("--filter=error", "memory", "size=1M", "error-pread=EIO", "error-pread-rate=100%")
    with nbd_server("nbdkit", tmp_path, args=args) as server:
        rig = Rig(tmp_path, image=server.uri)
        try:
            async with trio.open_nursery() as nursery:
                plane = await serve_nbd(rig, nursery)
                data = os.urandom(4096)
                assert (await rig.request([hdr(OUT, 8), data], [1])).data == bytes([OK])
                used = await rig.request([hdr(IN, 8)], [4096, 1])
                assert used.data[-1] == IOERR
                assert (await rig.request([hdr(OUT, 16), data], [1])).data == bytes([OK])
                stats = plane.statistics()
                assert stats["server_errors"] == 1 and stats["reads"] == 0
                assert stats["writes"] == 2 and stats["conn_failed"] == 0
                nursery.cancel_scope.cancel()
            logged = [r.getMessage() for r in caplog.records if "VIRTIO_BLK_T_IN" in r.getMessage()]
            assert len(logged) == 1 and "Input/output error" in logged[0]
        finally:
            rig.close()


async def test_server_killed_mid_io_fails_requests_then_device_goes_on(tmp_path):
    delayed = ("--filter=delay", "memory", "size=1M", "delay-read=30")
    with nbd_server("nbdkit", tmp_path, args=delayed) as server, contextlib.ExitStack() as later:
        rig = Rig(tmp_path, image=server.uri)
        async with trio.open_nursery() as nursery:
            plane = await serve_nbd(rig, nursery)
            tokens = [rig.submit([hdr(IN, 8 * i)], [4096, 1]) for i in range(4)]
            with trio.fail_after(20):  # until the reads are on the wire
                while plane.statistics()["async_started"] < 4:
                    await trio.sleep(0.01)
            server.proc.kill()
            for t in tokens:
                assert (await rig.wait(t)).data[-1] == IOERR
            assert plane.statistics()["conn_failed"] == 1
            # A server back on the same socket: Python reconnects and serves.
            again = later.enter_context(nbd_server("nbdkit", tmp_path, size=MiB))
            assert again.uri == server.uri
            data = os.urandom(4096)
            assert (await rig.request([hdr(OUT, 8), data], [1])).data == bytes([OK])
            used = await rig.request([hdr(IN, 8)], [4096, 1])
            assert used.data == data + bytes([OK])
            # Meanwhile a new connection for the thread: native again.
            with trio.fail_after(20):
                while plane.c.new_fd < 0 and not plane.statistics()["reconnects"]:
                    await trio.sleep(0.01)
            reads = plane.statistics()["reads"]
            used = await rig.request([hdr(IN, 8)], [4096, 1])
            assert used.data == data + bytes([OK])
            stats = plane.statistics()
            assert stats["reconnects"] == 1 and stats["reads"] == reads + 1
            assert stats["deferred"] == 4 + 2
            nursery.cancel_scope.cancel()
        rig.close()  # before the new server stops: it waits for its clients


async def test_a_server_with_one_client_slot_keeps_the_python_path(tmp_path):
    # qemu-nbd's default -e 1: the data plane's handshake is never answered; the disk
    # is served by Python (its connection) and the server is not asked again.
    if QEMU_NBD is None:
        pytest.skip("qemu-nbd is not installed")
    img, sock = tmp_path / "one.raw", tmp_path / "one.sock"
    img.write_bytes(b"")
    os.truncate(img, MiB)
    cmd = [QEMU_NBD, "-f", "raw", "-x", "exp", "-t", "-k", str(sock), str(img)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"nbd+unix:///exp?socket={sock}"
        _wait_ready(uri, proc)
        rig = Rig(tmp_path, image=uri)
        try:
            async with trio.open_nursery() as nursery:
                assert NbdDataPlane.supported(rig.device, rig.active, 0)
                nursery.start_soon(rig.device.serve_queue, rig.active, 0)
                data = os.urandom(4096)
                assert (await rig.request([hdr(OUT, 8), data], [1])).data == bytes([OK])
                used = await rig.request([hdr(IN, 8)], [4096, 1])
                assert used.data == data + bytes([OK])
                assert not rig.device.dataplanes
                assert "timed out" in (rig.device.backend.native_refused or "")
                assert not NbdDataPlane.supported(rig.device, rig.active, 0)
                nursery.cancel_scope.cancel()
        finally:
            rig.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert img.read_bytes()[4096:8192] == data


@pytest.mark.parametrize("fua", [True, False], ids=["fua", "no-fua"])
async def test_writethrough_writes_are_fua_or_go_to_python(tmp_path, fua):
    # CONFIG_WCE writeback=0: every write durable before completion -- NBD_CMD_FLAG_FUA
    # natively; a server without FUA gets Python's write + FLUSH.
    log = tmp_path / "requests.log"
    # (the fua filter's default mode: FUA not advertised)
    args = ("--filter=log", *(() if fua else ("--filter=fua",)), "memory", "size=1M",
            f"logfile={log}")  # fmt: skip
    with nbd_server("nbdkit", tmp_path, args=args) as server:
        rig = Rig(tmp_path, image=server.uri)
        try:
            async with trio.open_nursery() as nursery:
                plane = await serve_nbd(rig, nursery)
                rig.device.write_config(32, b"\x00")  # writeback = 0
                assert rig.device.writethrough
                used = await rig.request([hdr(OUT, 8), b"y" * 512], [1])
                assert used.data == bytes([OK])
                used = await rig.request([hdr(IN, 8)], [512, 1])  # native either way
                assert used.data == b"y" * 512 + bytes([OK])
                stats = plane.statistics()
                assert (stats["writes"], stats["syncs"], stats["deferred"]) == (
                    (1, 1, 0) if fua else (0, 0, 1)
                )
                nursery.cancel_scope.cancel()
        finally:
            rig.close()
    lines = [line for line in log.read_text().splitlines() if "return=" not in line]
    writes = [line for line in lines if " Write " in line]
    flushes = [line for line in lines if " Flush " in line]
    assert len(writes) == 1 and ("fua=1" in writes[0]) == fua
    assert len(flushes) == (0 if fua else 1)


async def test_stop_with_the_server_not_answering_ends_in_bounded_time(tmp_path):
    # A reset (ring stop) while the server sits on a read: the thread gives it 3 s,
    # then fails it; it never waits for the server, nor writes its reply later.
    delayed = ("--filter=delay", "memory", "size=1M", "delay-read=60")
    with nbd_server("nbdkit", tmp_path, args=delayed) as server:
        rig = Rig(tmp_path, image=server.uri)
        try:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    plane = await serve_nbd(rig, nursery)
                    rig.submit([hdr(IN, 8)], [4096, 1])
                    while plane.statistics()["async_started"] < 1:
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
            stats = plane.statistics()
            assert stats["conn_failed"] == 1 and stats["reads"] == 0
            assert not rig.device.dataplanes
        finally:
            rig.close()
