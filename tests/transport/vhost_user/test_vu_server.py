"""The trio vhost-user server + handler against a Python front-end over a socketpair."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from virtio.spec.features import TransportFeature as TF
from virtio.testing.driver import DriverQueue
from virtio.testing.vhost_user_frontend import (
    EchoDevice,
    FrontendError,
    GuestRam,
    VhostUserFrontend,
    connected,
)
from virtio.transport.vhost_user.frontend import RequestFailed
from virtio.transport.vhost_user.messages import (
    HEADER,
    VHOST_F_LOG_ALL,
    BackendRequest,
    LogDescription,
    MemoryTable,
    SingleMemoryRegion,
    VringFd,
    VringState,
)
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.server import VhostUserServer

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll real state until ``condition()`` holds; fail after ``timeout`` s."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


async def test_bring_up_io_vring_base_and_reconnect(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    device = EchoDevice(num_queues=2)
    server = VhostUserServer(device)
    ram = GuestRam(8 * MiB)
    try:
        async with trio.open_nursery() as nursery:
            async with connected(server, nursery) as fe:
                await fe.negotiate()
                assert fe.reply_ack
                assert await fe.get_u64(R.GET_QUEUE_NUM) == 2
                await fe.set_mem_table(ram)
                vq0 = await fe.setup_vring(0, ram, size=64, offset=0)
                vq1 = await fe.setup_vring(1, ram, size=64, offset=2 * MiB)
                for vq, text in ((vq0, b"hello"), (vq1, b"world!")):
                    token = vq.driver.add([text], [32])
                    vq.publish_and_kick()
                    (used,) = await vq.wait_used()
                    assert used.id == token
                    assert used.written == len(text)
                    assert used.data[: len(text)] == text[::-1]
                # many requests on both queues
                for i in range(25):
                    vq0.driver.add([bytes([i]) * 100], [100])
                vq0.publish_and_kick()
                got = await vq0.wait_used(25)
                assert len(got) == 25
                assert await fe.get_vring_base(0) == 26
                assert await fe.get_vring_base(1) == 1
            assert device.resets >= 1
            # a new connection: the device serves again from the given base
            async with connected(server, nursery) as fe:
                await fe.negotiate()
                await fe.set_mem_table(ram)
                vq = await fe.setup_vring(0, ram, size=64, offset=4 * MiB)
                vq.driver.add([b"again"], [8])
                vq.publish_and_kick()
                (used,) = await vq.wait_used()
                assert used.data[:5] == b"niaga"
                assert await fe.get_vring_base(0) == 1
    finally:
        ram.close()
    assert server.connections == 2
    assert "front-end connected" in caplog.text


async def test_get_vring_base_drains_in_flight_requests() -> None:
    device = EchoDevice()
    device.delay = 0.2
    server = VhostUserServer(device)
    ram = GuestRam(4 * MiB)
    try:
        async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
            await fe.negotiate()
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=16)
            for _ in range(5):
                vq.driver.add([b"x" * 10], [10])
            vq.publish_and_kick()
            await wait_until(lambda: server.in_flight() == 5)  # popped, not completed
            assert vq.driver.get_used() == []
            base = await fe.get_vring_base(0)
            assert base == 5
            assert len(vq.driver.get_used()) == 5  # all completed before the reply
    finally:
        ram.close()


async def test_config_and_status() -> None:
    device = EchoDevice(config=bytes(range(32)))
    server = VhostUserServer(device)
    async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
        await fe.negotiate()
        assert await fe.get_config(4, 8) == bytes(range(4, 12))
        await fe.request(R.SET_STATUS, 0x0F, need_reply=True)
        assert await fe.get_u64(R.GET_STATUS) == 0x0F
        assert await fe.get_u64(R.GET_MAX_MEM_SLOTS) == 32


async def test_reconnect_resubmits_in_flight_requests_from_the_inflight_area() -> None:
    """Out-of-order completion, then the connection dies: B was used, A and C were
    popped but never used.  A new connection with the same inflight fd resubmits
    exactly A and C (a back-end restarting at the used index would redo B and lose A)."""
    device = EchoDevice()
    server = VhostUserServer(device, drain_timeout=0.2)
    ram = GuestRam(4 * MiB)
    try:
        async with trio.open_nursery() as nursery:
            async with connected(server, nursery) as fe:
                await fe.negotiate()
                fd, size = await fe.get_inflight_fd(1, 16)
                await fe.set_inflight_fd(fd, size, 1, 16)
                await fe.set_mem_table(ram)
                vq = await fe.setup_vring(0, ram, size=16)
                device.hold = {b"AAAA", b"CCCC"}
                tokens = {name: vq.driver.add([name * 4], [8]) for name in (b"A", b"B", b"C")}
                vq.publish_and_kick()
                (used,) = await vq.wait_used()
                assert used.id == tokens[b"B"]
                driver = vq.driver
            device.hold = set()
            assert server.handler is None
            async with connected(server, nursery) as fe:
                await fe.negotiate()
                await fe.set_inflight_fd(fd, size, 1, 16)
                await fe.set_mem_table(ram)
                used_idx = ram.memory.read_u16(driver.device_addr + 2)
                assert used_idx == 1
                vq = await fe.setup_vring(0, ram, vring_base=used_idx, driver=driver)
                got = await vq.wait_used(2)
                assert {u.id for u in got} == {tokens[b"A"], tokens[b"C"]}
                assert all(u.data[:4] in (b"AAAA", b"CCCC") for u in got)
                assert server.resubmitted == 2
                # the ring goes on normally afterwards
                vq.driver.add([b"next"], [4])
                vq.publish_and_kick()
                (u,) = await vq.wait_used()
                assert u.data == b"txen"
                assert await fe.get_vring_base(0) == 4
            os.close(fd)
    finally:
        ram.close()


async def test_dirty_log_marks_written_pages() -> None:
    device = EchoDevice()
    server = VhostUserServer(device)
    ram = GuestRam(4 * MiB)
    log_fd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(log_fd, 4096)
    try:
        async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
            await fe.negotiate()
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=16)
            reply = await fe.request(R.SET_LOG_BASE, LogDescription(4096, 0), [log_fd], reply=True)
            assert reply == bytes(8)
            await fe.request(R.SET_FEATURES, fe.features | 1 << VHOST_F_LOG_ALL, need_reply=True)
            token = vq.driver.add([b"x" * 6000], [6000])  # spans two pages
            vq.publish_and_kick()
            (used,) = await vq.wait_used()
            assert used.id == token
            log = os.pread(log_fd, 4096, 0)
            dirty = {i * 8 + b for i, byte in enumerate(log) for b in range(8) if byte >> b & 1}
            assert vq.driver.device_addr // 4096 in dirty  # the used ring
            assert len(dirty) >= 2  # and the written buffer's page
    finally:
        os.close(log_fd)
        ram.close()


async def test_add_and_remove_memory_regions_while_running() -> None:
    device = EchoDevice()
    server = VhostUserServer(device)
    ram = GuestRam(regions=[(0, 2 * MiB), (16 * MiB, 2 * MiB)])
    table = ram.table()
    try:
        async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
            await fe.negotiate()
            await fe.request(
                R.SET_MEM_TABLE, MemoryTable(table.regions[:1]), ram.fds[:1], need_reply=True
            )
            vq = await fe.setup_vring(0, ram, size=16, data_size=64 * 1024)
            vq.driver.add([b"one"], [3])
            vq.publish_and_kick()
            (u,) = await vq.wait_used()
            assert u.data == b"eno"
            await fe.add_mem_reg(table.regions[1], ram.fds[1])
            # a chain in the new region, written by hand (the driver queue's data area is
            # in region 0): readable at 16 MiB, writable at 16 MiB + 4 KiB
            d = vq.driver
            ram.memory.write(16 * MiB, b"two")
            d.write_desc(5, 16 * MiB, 3, 1, 6)  # NEXT
            d.write_desc(6, 16 * MiB + 4096, 3, 2)  # WRITE
            d.write_avail(d._avail_idx, 5)
            d.set_avail_idx(d._avail_idx + 1)
            vq.kick()
            await wait_until(lambda: ram.memory.read_u16(d.device_addr + 2) == 2)
            assert ram.memory.read(16 * MiB + 4096, 3) == b"owt"
            await fe.request(R.REM_MEM_REG, SingleMemoryRegion(table.regions[1]), need_reply=True)
            assert await fe.get_u64(R.GET_STATUS) & 0x40 == 0
            assert server.handler is not None and server.handler.memory is not None
            assert len(server.handler.memory.regions) == 1
            assert await fe.get_vring_base(0) == 2
    finally:
        ram.close()


async def test_same_region_added_twice_is_counted_not_refused() -> None:
    """QEMU 7.2's vhost-user-net with N queue pairs sends each ADD_MEM_REG and
    REM_MEM_REG N times (one vhost_dev per pair): the region stays mapped until it
    was removed as often as it was added; the device never needs a reset."""
    device = EchoDevice()
    server = VhostUserServer(device)
    ram = GuestRam(regions=[(0, 2 * MiB), (16 * MiB, 2 * MiB)])
    table = ram.table()
    try:
        async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
            await fe.negotiate()
            for _ in range(2):
                await fe.add_mem_reg(table.regions[0], ram.fds[0])
                await fe.add_mem_reg(table.regions[1], ram.fds[1])
            vq = await fe.setup_vring(0, ram, size=16, data_size=64 * 1024)
            vq.driver.add([b"one"], [3])
            vq.publish_and_kick()
            assert (await vq.wait_used())[0].data == b"eno"
            handler = server.handler
            assert handler is not None and handler.memory is not None
            assert len(handler.memory.regions) == 2
            await fe.request(R.REM_MEM_REG, SingleMemoryRegion(table.regions[1]), need_reply=True)
            assert len(handler.memory.regions) == 2  # added twice: still there
            await fe.request(R.REM_MEM_REG, SingleMemoryRegion(table.regions[1]), need_reply=True)
            assert len(handler.memory.regions) == 1
            assert await fe.get_u64(R.GET_STATUS) & 0x40 == 0
            # one removal too many is still an error
            with pytest.raises(RequestFailed):
                await fe.request(
                    R.REM_MEM_REG, SingleMemoryRegion(table.regions[1]), need_reply=True
                )
    finally:
        ram.close()


async def test_packed_vring_base_with_only_the_avail_half() -> None:
    """QEMU and DPDK's virtio-user send SET_VRING_BASE for a packed ring as
    ``avail | wrap << 15`` only: the used side starts there too (found with
    dpdk-testpmd: used descriptors written with wrap counter 0 were never seen)."""
    device = EchoDevice()
    server = VhostUserServer(device)
    ram = GuestRam(4 * MiB)
    try:
        async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
            await fe.negotiate(packed=True)
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=8, vring_base=1 << 15)
            vq.driver.add([b"abc"], [3])
            vq.publish_and_kick()
            (u,) = await vq.wait_used()
            assert u.data == b"cba"
    finally:
        ram.close()


async def test_packed_ring_and_its_vring_base() -> None:
    device = EchoDevice()
    server = VhostUserServer(device)
    ram = GuestRam(4 * MiB)
    try:
        async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
            await fe.negotiate(packed=True)
            assert fe.features & TF.VIRTIO_F_RING_PACKED.mask
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=8)
            assert vq.driver.packed
            for i in range(10):  # wraps the 8-entry ring
                vq.driver.add([bytes([65 + i]) * 3], [3])
                vq.publish_and_kick()
                (u,) = await vq.wait_used()
                assert u.data == bytes([65 + i]) * 3
            # 10 chains of 2 descriptors: 20 = 2 wraps of 8 + 4 (wrap counters back to 1)
            assert await fe.get_vring_base(0) == VringState.packed_num(4, True, 4, True)
    finally:
        ram.close()


async def test_disabled_ring_is_not_served_until_enabled() -> None:
    device = EchoDevice()
    server = VhostUserServer(device)
    ram = GuestRam(4 * MiB)
    try:
        async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
            await fe.negotiate()
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=16, enable=False)
            assert server.handler is not None
            ring = server.handler.vrings[0]
            vq.driver.add([b"wait"], [4])
            vq.driver.publish()
            vq.kick()
            # nothing serves a disabled ring: no queue, nobody reads its kick fd
            assert not ring.running and ring.notifier.kicks == 0
            assert vq.driver.get_used() == []
            await fe.request(R.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
            (u,) = await vq.wait_used()
            assert u.data == b"tiaw"
            await fe.request(R.SET_VRING_ENABLE, VringState(0, 0), need_reply=True)
            assert not ring.running  # stopped before the ack
            kicks = ring.notifier.kicks
            vq.driver.add([b"later"], [5])
            vq.publish_and_kick()
            assert not ring.running and ring.notifier.kicks == kicks
            assert vq.driver.get_used() == []
            await fe.request(R.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
            (u,) = await vq.wait_used()
            assert u.data == b"retal"
    finally:
        ram.close()


async def test_config_change_message_on_the_backend_channel() -> None:
    device = EchoDevice()
    server = VhostUserServer(device)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
            await fe.negotiate()
            await fe.request(R.SET_BACKEND_REQ_FD, None, [theirs.fileno()], need_reply=True)
            theirs.close()
            assert server.handler is not None
            device.config[0] = 0xEE
            assert server.handler.notify_config_change()
            request, _flags, size = HEADER.unpack(ours.recv(HEADER.size))
            assert (request, size) == (BackendRequest.CONFIG_CHANGE_MSG, 0)
            assert await fe.get_config(0, 1) == b"\xee"
    finally:
        ours.close()


async def test_read_only_blk_device_answers_writes_with_ioerr() -> None:
    from virtio.devices.blk import MemoryBackend, VirtioBlk

    device = VirtioBlk(MemoryBackend(bytes(range(256)) * 4096, read_only=True))
    server = VhostUserServer(device)
    ram = GuestRam(4 * MiB)
    try:
        async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
            await fe.negotiate()
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=16)
            out = struct.pack("<IIQ", 1, 0, 0)  # VIRTIO_BLK_T_OUT, sector 0
            vq.driver.add([out, bytes(512)], [1])
            vq.publish_and_kick()
            (u,) = await vq.wait_used()
            assert u.data == b"\x01"  # VIRTIO_BLK_S_IOERR
            read = struct.pack("<IIQ", 0, 0, 1)  # VIRTIO_BLK_T_IN, sector 1
            vq.driver.add([read], [512, 1])
            vq.publish_and_kick()
            (u,) = await vq.wait_used()
            assert u.data == (bytes(range(256)) * 2) + b"\x00"
    finally:
        ram.close()


def _run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtio", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        **kwargs,
    )


def test_cli_capabilities_and_errors(tmp_path: Path) -> None:
    r = _run_cli("serve", "blk", "--print-capabilities")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"type": "block", "features": ["read-only", "blk-file"]}
    sock = os.fspath(tmp_path / "s.sock")
    r = _run_cli("serve", "blk", "--socket-path", sock, "--blk-file", os.fspath(tmp_path / "no"))
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "No such file" in r.stderr, r.stderr
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    r = _run_cli(
        "serve", "blk", "--socket-path", sock, "--blk-file", os.fspath(img), "--queue-size", "3"
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    r = _run_cli("serve", "blk", "--blk-file", os.fspath(img))
    assert r.returncode == 2 and "--socket-path" in r.stderr, r.stderr
    from virtio.devices.blk import RawFileBackend

    with RawFileBackend(img):  # holds the image lock
        r = _run_cli("serve", "blk", "--socket-path", sock, "--blk-file", os.fspath(img))
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "in use" in r.stderr, r.stderr
    assert not Path(sock).exists()


async def test_cli_serves_an_inherited_listening_fd_and_stops_on_sigterm(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(2 * MiB))
    path = os.fspath(tmp_path / "blk.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "virtio", "-v", "serve", "blk", "--fd", str(fd),
         "--blk-file", os.fspath(img), "--num-queues", "2", "--serial", "abc"],
        pass_fds=(fd,),
        stderr=subprocess.PIPE,
        cwd=REPO,
    )  # fmt: skip
    listener.close()
    try:
        with trio.fail_after(20):
            fe = await VhostUserFrontend.connect(path)
            try:
                await fe.negotiate()
                assert await fe.get_u64(R.GET_QUEUE_NUM) == 2
                capacity = int.from_bytes(await fe.get_config(0, 8), "little")
                assert capacity == 2 * MiB // 512
            finally:
                await fe.aclose()
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            assert proc.stderr is not None
            err = b""
            while chunk := await proc.stderr.receive_some(65536):
                err += chunk
            assert b"SIGTERM: shutting down" in err
            assert b"statistics: connections=1" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if proc.stderr is not None:
            await proc.stderr.aclose()


async def test_without_protocol_features_a_ring_is_enabled_when_kicked() -> None:
    """vhost-user "Ring states": if VHOST_USER_F_PROTOCOL_FEATURES is not negotiated
    (bit 30 absent from SET_FEATURES), a ring starts directly enabled."""
    device = EchoDevice()
    server = VhostUserServer(device)
    ram = GuestRam(4 * MiB)
    try:
        async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
            offered = await fe.get_u64(R.GET_FEATURES)
            fe.features = offered & ~(1 << 30 | 1 << 26 | TF.VIRTIO_F_RING_PACKED.mask)
            await fe.request(R.SET_OWNER)
            await fe.request(R.SET_FEATURES, fe.features)
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=16, enable=False)
            vq.driver.add([b"on"], [2])
            vq.publish_and_kick()
            (u,) = await vq.wait_used()
            assert u.data == b"no"
    finally:
        ram.close()


async def test_status_zero_resets_the_device_but_keeps_the_vring_base() -> None:
    """QEMU 7.2 sends SET_STATUS 0 when it stops the device: the rings stop, the
    device is reset, and GET_VRING_BASE still reports where each ring was."""
    device = EchoDevice()
    server = VhostUserServer(device)
    ram = GuestRam(4 * MiB)
    try:
        async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
            await fe.negotiate()
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=16)
            for _ in range(3):
                vq.driver.add([b"abc"], [3])
            vq.publish_and_kick()
            await vq.wait_used(3)
            resets = device.resets
            await fe.request(R.SET_STATUS, 0, need_reply=True)
            assert device.resets == resets + 1
            assert server.handler is not None
            assert not server.handler.vrings[0].running  # stopped before the ack
            vq.driver.add([b"late"], [4])
            vq.publish_and_kick()
            assert vq.driver.get_used() == []
            assert await fe.get_vring_base(0) == 3
    finally:
        ram.close()


async def test_cli_serves_an_inherited_connected_fd_then_exits(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "virtio", "serve", "blk", "--fd", str(theirs.fileno()),
         "--blk-file", os.fspath(img), "--read-only"],
        pass_fds=(theirs.fileno(),),
        cwd=REPO,
    )  # fmt: skip
    theirs.close()
    try:
        with trio.fail_after(20):
            fe = VhostUserFrontend(trio.socket.from_stdlib_socket(ours))
            await fe.negotiate()
            assert fe.features & 1 << 5  # VIRTIO_BLK_F_RO
            await fe.aclose()  # the only connection ends: the back-end exits
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_no_fd_leaks_over_a_full_session() -> None:
    """Everything received (memory, kick/call/err, inflight, log, back-end channel) is
    closed by the time the connection is gone."""

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def fd_map() -> dict[str, str]:
        out = {}
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        return out

    device = EchoDevice(num_queues=2)
    server = VhostUserServer(device)
    before = open_fds()
    before_map = fd_map()
    ram = GuestRam(4 * MiB)
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            async with connected(server, nursery) as fe:
                await fe.negotiate()
                fd, size = await fe.get_inflight_fd(2, 16)
                await fe.set_inflight_fd(fd, size, 2, 16)
                os.close(fd)
                log_fd = os.memfd_create("log", os.MFD_CLOEXEC)
                os.ftruncate(log_fd, 4096)
                await fe.request(R.SET_LOG_BASE, LogDescription(4096, 0), [log_fd], reply=True)
                os.close(log_fd)
                a, b = socket.socketpair()
                await fe.request(R.SET_BACKEND_REQ_FD, None, [b.fileno()], need_reply=True)
                a.close()
                b.close()
                await fe.set_mem_table(ram)
                for i in range(2):
                    vq = await fe.setup_vring(i, ram, size=16, offset=i * MiB)
                    vq.driver.add([b"fd"], [2])
                    vq.publish_and_kick()
                    await vq.wait_used()
                # replace call fds while running, then stop one ring
                call = os.eventfd(0, os.EFD_CLOEXEC)
                await fe.request(R.SET_VRING_CALL, VringFd(0), [call], need_reply=True)
                os.close(call)
                await fe.get_vring_base(1)
    ram.close()  # (its mmap held a dup of the memfd: mmap.mmap dups the fd it maps)
    after_map = fd_map()
    assert open_fds() == before, {k: v for k, v in after_map.items() if k not in before_map}


async def test_serve_path_replaces_a_stale_socket_but_not_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "blk.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()  # the file stays, nobody listens: stale
    device = EchoDevice()
    async with trio.open_nursery() as nursery:
        await nursery.start(VhostUserServer(device).serve_path, path)
        fe = await VhostUserFrontend.connect(path)
        assert await fe.get_u64(R.GET_FEATURES)
        await fe.aclose()
        with pytest.raises(OSError, match="another back-end"):
            await VhostUserServer(EchoDevice()).serve_path(path)
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_errors_name_their_cause(caplog) -> None:
    """issue 13 §2: ring addresses with no memory table name the shared-RAM fix; a
    front-end leaving right after GET_QUEUE_NUM gets the --num-queues hint logged."""
    device = EchoDevice()
    server = VhostUserServer(device)
    ram = GuestRam(4 * MiB)
    try:
        async with trio.open_nursery() as nursery:
            async with connected(server, nursery) as fe:
                await fe.negotiate()
                assert await fe.get_u64(R.GET_QUEUE_NUM) == device.num_queues
            with trio.fail_after(10):
                while "left right after GET_QUEUE_NUM" not in caplog.text:
                    await trio.sleep(0.01)  # bounded wait for the server's log line
            async with connected(server, nursery) as fe:
                await fe.negotiate()
                vq_driver = DriverQueue(ram.memory, 16)
                with pytest.raises(FrontendError):
                    await fe.set_vring_addr(0, ram, vq_driver)
            assert "guest RAM is not shared with the back-end" in caplog.text
            assert "share=on" in caplog.text
    finally:
        ram.close()
