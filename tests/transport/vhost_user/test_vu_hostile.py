"""A hostile front-end and hostile rings against the vhost-user server.

Every case: the back-end reports a typed error in a log line naming it, the device
goes NEEDS_RESET (GET_STATUS) or the connection is closed, the server keeps serving
a NEW connection, no fd is leaked, and no guest byte outside the buffers a request
offered for writing changes (canary pattern).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from virtio.devices.blk import BlkOptions, VirtioBlk
from virtio.spec.blk import BlkReqType, BlkStatus, virtio_blk_outhdr
from virtio.spec.ring import VringDescFlag, split_ring_sizes
from virtio.testing.vhost_user_frontend import (
    USER_BASE,
    EchoDevice,
    FrontendError,
    GuestRam,
    VhostUserFrontend,
    serve_device,
)
from virtio.transport.vhost_user.messages import (
    HEADER,
    ConfigSpace,
    FrontendRequest,
    InflightDescription,
    LogDescription,
    MemoryRegion,
    MemoryTable,
    VringAddr,
    VringFd,
    VringState,
    encode_request,
)
from virtio.transport.vhost_user.server import VhostUserServer

R = FrontendRequest
MiB = 1 << 20
NEEDS_RESET = 0x40
CANARY = 0xA5
WRITE = int(VringDescFlag.VRING_DESC_F_WRITE)
NEXT = int(VringDescFlag.VRING_DESC_F_NEXT)

Scenario = Callable[[VhostUserFrontend, GuestRam], Awaitable[None]]


async def _bring_up_and_echo(fe: VhostUserFrontend, ram: GuestRam) -> None:
    await fe.negotiate()
    await fe.set_mem_table(ram)
    vq = await fe.setup_vring(0, ram, size=16, data_size=64 * 1024)
    vq.driver.add([b"still alive"], [16])
    vq.publish_and_kick()
    (used,) = await vq.wait_used()
    assert used.data[:11] == b"evila llits"


async def serve_then_next(
    scenario: Scenario,
    *,
    device: EchoDevice | None = None,
    drain_timeout: float = 0.3,
    timeout: float = 10,
) -> VhostUserServer:
    """Run ``scenario`` on one connection, then check a new connection still works."""
    server = VhostUserServer(device or EchoDevice(), drain_timeout=drain_timeout)
    async with trio.open_nursery() as nursery:
        for step in ("hostile", "next"):
            a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            done = trio.Event()

            async def serve(sock=b, done=done) -> None:
                try:
                    await server.serve_connection(sock)
                finally:
                    done.set()

            nursery.start_soon(serve)
            fe = VhostUserFrontend(a)
            ram = GuestRam(2 * MiB)
            try:
                with trio.fail_after(timeout):
                    if step == "hostile":
                        await scenario(fe, ram)
                    else:
                        await _bring_up_and_echo(fe, ram)
            finally:
                await fe.aclose()
                with trio.fail_after(10):
                    await done.wait()
                ram.close()
    assert server.connections == 2
    return server


async def run_case(
    scenario: Scenario, caplog: pytest.LogCaptureFixture, expect_log: str
) -> VhostUserServer:
    """``serve_then_next`` for a hostile ``scenario`` that must log ``expect_log``."""
    caplog.set_level(logging.INFO)
    server = await serve_then_next(scenario)
    assert expect_log in caplog.text, caplog.text
    return server


async def status(fe: VhostUserFrontend) -> int:
    return await fe.get_u64(R.GET_STATUS)


def fd_canary() -> tuple[int, int]:
    """A pipe: send ``w``; once every copy of it is closed, ``r`` reads EOF."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def assert_closed_by_peer(r: int) -> None:
    try:
        assert os.read(r, 1) == b""  # EOF: nobody holds the write end any more
    finally:
        os.close(r)


# ------------------------------------------------------------------ malformed messages


async def test_wrong_payload_size(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        await fe.send_raw(HEADER.pack(R.SET_VRING_NUM, 1 | 8, 4) + b"\0\0\0\0")
        data, _ = await fe.recv_reply(R.SET_VRING_NUM)
        assert int.from_bytes(data, "little") != 0
        await _bring_up_and_echo_after_reject(fe, ram)

    await run_case(scenario, caplog, "PayloadSizeMismatch")


async def _bring_up_and_echo_after_reject(fe: VhostUserFrontend, ram: GuestRam) -> None:
    """The connection goes on after a rejected message."""
    await fe.set_mem_table(ram)
    vq = await fe.setup_vring(0, ram, size=16, data_size=64 * 1024)
    vq.driver.add([b"ok"], [2])
    vq.publish_and_kick()
    (used,) = await vq.wait_used()
    assert used.data == b"ko"


async def test_missing_and_extra_fds(caplog: pytest.LogCaptureFixture) -> None:
    r, w = fd_canary()

    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        # SET_VRING_KICK without fd and without the NOFD bit
        with pytest.raises(FrontendError):
            await fe.request(R.SET_VRING_KICK, VringFd(0), need_reply=True)
        # SET_FEATURES with an fd it must not carry: rejected, fd closed
        with pytest.raises(FrontendError):
            await fe.request(R.SET_FEATURES, fe.features, [w], need_reply=True)
        os.close(w)
        await _bring_up_and_echo_after_reject(fe, ram)

    await run_case(scenario, caplog, "IncorrectFds")
    assert_closed_by_peer(r)


async def test_unknown_request(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        with pytest.raises(FrontendError):
            await fe.request(99, b"xyz", need_reply=True)
        await fe.send(1234)  # no reply wanted: skipped
        await _bring_up_and_echo_after_reject(fe, ram)

    await run_case(scenario, caplog, "UnknownRequest")


async def test_bad_vring_index_and_sizes(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        for state in (VringState(5, 16), VringState(0, 0), VringState(0, 100), VringState(0, 4096)):
            with pytest.raises(FrontendError):
                await fe.request(R.SET_VRING_NUM, state, need_reply=True)
        assert await status(fe) & NEEDS_RESET

    await run_case(scenario, caplog, "InvalidMessage")


async def test_oversized_message_closes_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.send_raw(HEADER.pack(R.SET_FEATURES, 1, 1 << 20))
        await fe.expect_closed()

    await run_case(scenario, caplog, "OversizedMessage")


async def test_bad_header_version_closes_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.send_raw(HEADER.pack(R.GET_FEATURES, 2, 0))
        await fe.expect_closed()

    await run_case(scenario, caplog, "InvalidMessage")


async def test_partial_message_then_hangup(caplog: pytest.LogCaptureFixture) -> None:
    r, w = fd_canary()

    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        msg = encode_request(R.SET_VRING_CALL, VringFd(0))
        await fe.send_raw(msg[:10], [w])
        os.close(w)
        fe.sock.shutdown(socket.SHUT_WR)
        await fe.expect_closed()

    await run_case(scenario, caplog, "PartialMessage")
    assert_closed_by_peer(r)


async def test_get_config_out_of_bounds(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        assert await fe.get_config(8, 16) == b""  # 16-byte config space
        assert await fe.get_config(0, 16) == bytes(range(16))

    await run_case(scenario, caplog, "beyond the 16-byte config space")


# ------------------------------------------------------------------ memory tables


def _fd_of_size(size: int) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize(
    ("regions", "expect"),
    [
        # guest ranges overlap
        ([(0, MiB, 0x10000000, MiB), (MiB // 2, MiB, 0x20000000, MiB)], "overlaps"),
        # user ranges overlap
        ([(0, MiB, 0x10000000, MiB), (4 * MiB, MiB, 0x10000000 + 4096, MiB)], "overlap"),
        # region larger than the file behind it
        ([(0, 2 * MiB, 0x10000000, MiB)], "larger than the file"),
        # mmap offset beyond the file
        ([(0, MiB, 0x10000000, MiB, 4 * MiB)], "larger than the file"),
    ],
)
async def test_bad_memory_tables(
    caplog: pytest.LogCaptureFixture, regions: list[tuple[int, ...]], expect: str
) -> None:
    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        fds = [_fd_of_size(spec[3]) for spec in regions]
        table = MemoryTable(
            tuple(
                MemoryRegion(gpa, size, uaddr, spec[4] if len(spec) > 4 else 0)
                for spec in regions
                for gpa, size, uaddr in [spec[:3]]
            )
        )
        try:
            with pytest.raises(FrontendError):
                await fe.request(R.SET_MEM_TABLE, table, fds, need_reply=True)
        finally:
            for fd in fds:
                os.close(fd)
        assert await status(fe) & NEEDS_RESET

    await run_case(scenario, caplog, expect)


async def test_empty_memfd_region_rejected_not_sigbus(caplog: pytest.LogCaptureFixture) -> None:
    """A region backed by a memfd of size 0 would map and then SIGBUS on access."""

    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        fd = _fd_of_size(0)
        try:
            table = MemoryTable((MemoryRegion(0, MiB, 0x10000000, 0),))
            with pytest.raises(FrontendError):
                await fe.request(R.SET_MEM_TABLE, table, [fd], need_reply=True)
        finally:
            os.close(fd)
        assert await status(fe) & NEEDS_RESET

    await run_case(scenario, caplog, "larger than the file")


async def test_log_beyond_its_file_rejected(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        fd = _fd_of_size(4096)
        try:
            reply = await fe.request(R.SET_LOG_BASE, LogDescription(8192, 0), [fd], reply=True)
            assert int.from_bytes(reply or b"", "little") != 0
        finally:
            os.close(fd)

    await run_case(scenario, caplog, "beyond its file")


async def test_kick_fd_that_is_a_regular_file(caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    """A kick "eventfd" that cannot be polled must not wedge the server loop."""

    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        await fe.set_mem_table(ram)
        vq = await fe.setup_vring(0, ram, size=16, data_size=64 * 1024)
        with open(tmp_path / "kick", "wb+") as f:
            await fe.request(R.SET_VRING_KICK, VringFd(0), [f.fileno()], need_reply=True)
        vq.driver.add([b"polled"], [6])
        vq.driver.publish()
        (u,) = await vq.wait_used()
        assert u.data == b"dellop"
        assert await fe.get_u64(R.GET_QUEUE_NUM) == 1  # the control path still answers

    await run_case(scenario, caplog, "cannot be waited on")


async def test_zero_size_region_rejected(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        fd = _fd_of_size(MiB)
        try:
            table = MemoryTable((MemoryRegion(0, 0, 0x1000, 0),))
            with pytest.raises(FrontendError):
                await fe.request(R.SET_MEM_TABLE, table, [fd], need_reply=True)
        finally:
            os.close(fd)

    await run_case(scenario, caplog, "size 0")


async def test_ring_addresses_outside_memory(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        await fe.set_mem_table(ram)
        await fe.request(R.SET_VRING_NUM, VringState(0, 16), need_reply=True)
        base = ram.user_addr(0)
        for addr in (
            VringAddr(0, 0, base + 2 * MiB, base + 4096, base + 8192, 0),  # past the end
            VringAddr(0, 0, 0x1000, base + 4096, base + 8192, 0),  # guest address, not user
            VringAddr(0, 0, base, base + 2 * MiB - 8, base + 8192, 0),  # used ring crosses end
        ):
            with pytest.raises(FrontendError):
                await fe.request(R.SET_VRING_ADDR, addr, need_reply=True)
        assert await status(fe) & NEEDS_RESET

    await run_case(scenario, caplog, "outside guest memory")


# ------------------------------------------------------------------ hostile rings


def _snapshot(ram: GuestRam) -> bytes:
    return ram.memory.read(0, 2 * MiB)


def _changed_outside(before: bytes, after: bytes, allowed: list[tuple[int, int]]) -> list[int]:
    bad = []
    for i in range(0, len(before), 4096):
        if before[i : i + 4096] == after[i : i + 4096]:
            continue
        for j in range(i, min(i + 4096, len(before))):
            if before[j] != after[j] and not any(a <= j < a + n for a, n in allowed):
                bad.append(j)
    return bad


async def _hostile_ring(
    fe: VhostUserFrontend,
    ram: GuestRam,
    build: Callable[..., list[tuple[int, int]]],
) -> None:
    """Bring up a ring over canary-filled RAM, let ``build`` write hostile descriptors
    (returning the writable ranges it offered), kick, then check the outcome."""
    await fe.negotiate()
    await fe.set_mem_table(ram)
    ram.memory.write(0, bytes([CANARY]) * 2 * MiB)
    vq = await fe.setup_vring(0, ram, size=16, data_size=64 * 1024, enable=False)
    d = vq.driver
    _, _, used_size = split_ring_sizes(16, d.event_idx)
    writable = build(d)
    before = _snapshot(ram)
    await fe.request(R.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    d.set_avail_idx(d._avail_idx + 1)  # publish whatever build() put in avail[0..]
    with trio.fail_after(5):
        # Kicking until then: a ring whose first look showed an impossible avail idx
        # waits for a kick the device sees after that look (Virtqueue.start_unproven).
        while not await status(fe) & NEEDS_RESET:
            vq.kick()
            await trio.sleep(0.01)
    assert vq.error_signalled()
    after = _snapshot(ram)
    allowed = [(d.device_addr, used_size), (d.driver_addr + 2, 2), *writable]  # + avail idx
    assert _changed_outside(before, after, allowed) == []
    # GET_VRING_BASE still answers for the broken ring
    await fe.get_vring_base(0)


async def test_descriptor_outside_memory(caplog: pytest.LogCaptureFixture) -> None:
    def build(d):
        d.write_desc(0, 0x10, 16, NEXT, 1)
        d.write_desc(1, 3 * MiB, 64, WRITE)  # beyond the 2 MiB of RAM
        d.write_avail(0, 0)
        return []

    await run_case(lambda fe, ram: _hostile_ring(fe, ram, build), caplog, "DescriptorChainError")


async def test_descriptor_loop(caplog: pytest.LogCaptureFixture) -> None:
    def build(d):
        a = d.data_addr
        d.write_desc(0, a, 16, NEXT, 1)
        d.write_desc(1, a + 64, 16, NEXT | WRITE, 0)  # back to 0: a loop
        d.write_avail(0, 0)
        return [(a + 64, 16)]

    await run_case(lambda fe, ram: _hostile_ring(fe, ram, build), caplog, "DescriptorChainError")


async def test_readable_after_writable(caplog: pytest.LogCaptureFixture) -> None:
    def build(d):
        a = d.data_addr
        d.write_desc(0, a, 16, NEXT | WRITE, 1)
        d.write_desc(1, a + 64, 16, 0)
        d.write_avail(0, 0)
        return [(a, 16)]

    await run_case(lambda fe, ram: _hostile_ring(fe, ram, build), caplog, "DescriptorChainError")


async def test_avail_index_jump(caplog: pytest.LogCaptureFixture) -> None:
    def build(d):
        d._avail_idx = 100  # _hostile_ring publishes idx 101 > queue size 16
        return []

    await run_case(lambda fe, ram: _hostile_ring(fe, ram, build), caplog, "InvalidAvailIdx")


async def test_head_index_out_of_range(caplog: pytest.LogCaptureFixture) -> None:
    def build(d):
        d.write_avail(0, 999)
        return []

    await run_case(lambda fe, ram: _hostile_ring(fe, ram, build), caplog, "DescriptorChainError")


async def test_echo_writes_only_its_writable_buffers(caplog: pytest.LogCaptureFixture) -> None:
    """A benign request over canary RAM: only the used ring and its 8-byte writable
    buffer change, although 64 bytes were readable."""

    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        await fe.set_mem_table(ram)
        ram.memory.write(0, bytes([CANARY]) * 2 * MiB)
        vq = await fe.setup_vring(0, ram, size=16, data_size=64 * 1024)
        d = vq.driver
        a = d.data_addr
        d.write_desc(0, a, 64, NEXT, 1)
        d.write_desc(1, a + 128, 8, WRITE, 0)
        d.write_avail(0, 0)
        before = _snapshot(ram)
        d.set_avail_idx(1)
        vq.kick()
        with trio.fail_after(5):
            while ram.memory.read_u16(d.device_addr + 2) != 1:
                await trio.sleep(0.01)
        after = _snapshot(ram)
        _, _, used_size = split_ring_sizes(16, d.event_idx)
        allowed = [(d.device_addr, used_size), (d.driver_addr + 2, 2), (a + 128, 8)]
        assert _changed_outside(before, after, allowed) == []
        head, length = struct.unpack("<II", ram.memory.read(d.device_addr + 4, 8))
        assert (head, length) == (0, 8)
        assert await status(fe) & NEEDS_RESET == 0
        logging.getLogger("test").info("benign request done")

    await run_case(scenario, caplog, "benign request done")


message = st.tuples(
    st.one_of(st.integers(0, 45), st.sampled_from([99, 0xFFFFFFFF])),
    st.binary(max_size=48),
    st.integers(0, 2),  # eventfds attached
    st.booleans(),  # NEED_REPLY
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(message, min_size=1, max_size=12))
async def test_random_messages_never_break_the_server(messages) -> None:
    """Random well-framed messages after a partial bring-up: whatever happens to that
    connection, the server survives and serves the next one."""

    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        await fe.set_mem_table(ram)
        for request, payload, nfds, need_reply in messages:
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
            flags = 1 | (8 if need_reply else 0)
            try:
                await fe.send_raw(HEADER.pack(request, flags, len(payload)) + payload, fds)
            except OSError:
                break  # the back-end closed this connection
            finally:
                for fd in fds:
                    os.close(fd)

    await serve_then_next(scenario, drain_timeout=0.1)


_ring = st.integers(0, 1)
_u32 = st.integers(0, 0xFFFFFFFF)
structured = st.one_of(
    st.builds(lambda i, n: (R.SET_VRING_NUM, VringState(i, n)), _ring,
              st.sampled_from([0, 1, 2, 3, 16, 64, 256, 1 << 15])),
    st.builds(lambda i, n: (R.SET_VRING_BASE, VringState(i, n)), _ring, _u32),
    st.builds(lambda i: (R.GET_VRING_BASE, VringState(i, 0)), _ring),
    st.builds(lambda i, n: (R.SET_VRING_ENABLE, VringState(i, n)), _ring, st.integers(0, 1)),
    st.builds(
        lambda i, f, d, u, a: (R.SET_VRING_ADDR, VringAddr(i, f, d, u, a, 0)),
        _ring,
        st.integers(0, 1),
        *[st.one_of(st.integers(0, 1 << 64 - 1), st.integers(USER_BASE, USER_BASE + 2 * MiB))]
        * 3,
    ),
    st.builds(lambda r, i, nofd: (r, VringFd(i, nofd)),
              st.sampled_from([R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR]),
              _ring, st.booleans()),
    st.builds(lambda v: (R.SET_STATUS, v), st.integers(0, 0x1FF)),
    st.builds(lambda o, n: (R.GET_CONFIG, ConfigSpace(o, 0, bytes(n))), st.integers(0, 40),
              st.integers(0, 40)),
    st.builds(lambda o, d: (R.SET_CONFIG, ConfigSpace(o, 0, d)), st.integers(0, 40),
              st.binary(max_size=20)),
    st.sampled_from([(R.RESET_DEVICE, None), (R.RESET_OWNER, None), (R.GET_STATUS, None),
                     (R.SET_MEM_TABLE, "ram"), (R.GET_INFLIGHT_FD, "inflight")]),
)  # fmt: skip
EXPLICIT = {R.GET_VRING_BASE, R.GET_CONFIG, R.GET_STATUS, R.GET_INFLIGHT_FD}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(structured, min_size=1, max_size=15))
@example(  # found by this test: an overlapping ring failing while its scope was cancelled
    ops=[
        (R.GET_VRING_BASE, VringState(1, 0)),
        (R.SET_VRING_ADDR, VringAddr(0, 0, USER_BASE, USER_BASE, USER_BASE, 0)),
    ]
)
async def test_random_ring_requests_while_io_runs(ops) -> None:
    """Structured requests (ring sizes, bases, addresses, fds, status, resets, config,
    memory, inflight) in any order while the driver keeps submitting: every request
    gets its reply (or the connection closes), and the next connection is served."""

    async def scenario(fe: VhostUserFrontend, ram: GuestRam) -> None:
        await fe.negotiate()
        await fe.set_mem_table(ram)
        vq = await fe.setup_vring(0, ram, size=16, data_size=64 * 1024)
        for request, payload in ops:
            with contextlib.suppress(Exception):
                vq.driver.add([b"io"], [2])
                vq.publish_and_kick()
            fds: list[int] = []
            if payload == "ram":
                payload, fds = ram.table(), list(ram.fds)
            elif payload == "inflight":
                payload = InflightDescription(0, 0, 2, 16)
            elif isinstance(payload, VringFd) and not payload.no_fd:
                fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)]
            try:
                explicit = request in EXPLICIT
                await fe.send(request, payload, fds, need_reply=not explicit)
                _, extra = await fe.recv_reply(request)
                for fd in extra:
                    os.close(fd)
            except (FrontendError, OSError):
                break  # the back-end closed this connection
            finally:
                if payload is not None and fds and not isinstance(payload, MemoryTable):
                    for fd in fds:
                        os.close(fd)

    await serve_then_next(scenario, device=EchoDevice(num_queues=2), drain_timeout=0.1, timeout=20)


# ------------------------------------------------- a ring the firmware left running


def _blk_device(tmp_path) -> VirtioBlk:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(MiB))
    return VirtioBlk.from_options(BlkOptions(path=path, serial="foreign"))


@pytest.mark.parametrize("kind", ["echo", "blk-native"])
async def test_ring_over_memory_that_is_not_a_ring_is_left_alone(kind, tmp_path) -> None:
    """SeaBIOS sets DRIVER_OK and boots the OS without resetting the device; QEMU
    starts the vhost-user ring then, with its kick eventfd signalled, and a back-end
    that gets there late (a loaded machine) finds the OS's data where the ring was
    (the initrd: avail idx 0xa5b3).  A ring that showed no valid avail idx and got
    no kick since it started is neither failed (no NEEDS_RESET, no vring error) nor
    written to; the OS's driver then resets the device and sets up its own ring,
    which is served.  (A kick on such a ring is a driver error:
    ``test_avail_index_jump``.)  Python's service loop (echo) and the native data
    plane (blk) alike."""
    device = EchoDevice() if kind == "echo" else _blk_device(tmp_path)
    try:
        async with serve_device(device, 2 * MiB, timeout=20) as (server, fe, ram):
            vq = await fe.setup_vring(0, ram, size=16, data_size=64 * 1024, enable=False)
            d = vq.driver
            # the OS's data over the ring, as it looks to the device
            end = d.data_addr
            noise = b"".join(
                hashlib.sha256(i.to_bytes(4, "little")).digest()
                for i in range((end - d.desc_addr) // 32 + 1)
            )
            ram.memory.write(d.desc_addr, noise[: end - d.desc_addr])
            ram.memory.write(d.driver_addr + 2, (0xA5B3).to_bytes(2, "little"))
            vq.kick()  # QEMU creates the kick eventfd signalled
            before = _snapshot(ram)
            await fe.request(R.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
            assert server.handler is not None
            ring = server.handler.vrings[0]
            while ring.queue is None or ring.queue.stale_avail is None:
                await trio.sleep(0.005)  # until the device has looked at the ring
            assert ring.queue.stale_avail == 0xA5B3
            assert not await status(fe) & NEEDS_RESET
            assert not vq.error_signalled()
            assert _changed_outside(before, _snapshot(ram), []) == []
            # The OS's driver: reset, then a ring of its own where the old one was.
            assert await fe.get_vring_base(0) == 0
            vq = await fe.setup_vring(0, ram, size=16, data_size=64 * 1024)
            if kind == "echo":
                vq.driver.add([b"a ring now"], [16])
            else:
                hdr = virtio_blk_outhdr.build(
                    {"type": BlkReqType.VIRTIO_BLK_T_GET_ID, "reserved": 0, "sector": 0}
                )
                vq.driver.add([hdr], [20, 1])
            vq.publish_and_kick()
            (used,) = await vq.wait_used()
            if kind == "echo":
                assert used.data[:10] == b"won gnir a"
            else:
                assert used.data == b"foreign" + bytes(13) + bytes([BlkStatus.VIRTIO_BLK_S_OK])
            assert not await status(fe) & NEEDS_RESET
    finally:
        if kind != "echo":
            device.close()
