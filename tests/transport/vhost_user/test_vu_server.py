"""The trio vhost-user server + handler against a Python front-end over a socketpair."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator

import pytest
import trio

from virtio.testing.vhost_user_frontend import EchoDevice, GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.server import VhostUserServer

MiB = 1 << 20


@contextlib.asynccontextmanager
async def connected(
    server: VhostUserServer, nursery: trio.Nursery
) -> AsyncIterator[VhostUserFrontend]:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    done = trio.Event()

    async def serve() -> None:
        try:
            await server.serve_connection(b)
        finally:
            done.set()

    nursery.start_soon(serve)
    fe = VhostUserFrontend(a)
    try:
        yield fe
    finally:
        await fe.aclose()
        with trio.fail_after(10):
            await done.wait()


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
            await trio.sleep(0.05)  # popped, not completed
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
