"""The server's connection lifecycle: a second front-end while one is connected, the
idle timeout, and no memory kept per connection that ends in a protocol error."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from virtio.testing.vhost_user_frontend import EchoDevice, GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.messages import HEADER
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.server import ERROR_HISTORY, VhostUserServer

BUSY = "device busy"


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll real state until ``condition()`` holds; fail after ``timeout`` s."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


@asynccontextmanager
async def listening(server: VhostUserServer, tmp_path: Path) -> AsyncIterator[Path]:
    async with trio.open_nursery() as nursery:
        path = await nursery.start(server.serve_path, tmp_path / "vu.sock")
        yield path
        nursery.cancel_scope.cancel()


async def served(fe: VhostUserFrontend) -> bool:
    """The back-end answers ``fe`` (GET_FEATURES)."""
    return await fe.get_u64(R.GET_FEATURES) != 0


# ------------------------------------------------------------------ a second front-end


async def test_second_frontend_is_refused_at_once_while_an_idle_one_holds_the_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = VhostUserServer(EchoDevice(), name="echo")
    async with listening(server, tmp_path) as path:
        first = await VhostUserFrontend.connect(path)  # connects, sends nothing
        await wait_until(lambda: server.handler is not None)
        holder = server.frontend
        assert holder is not None
        for n in range(1, 4):
            other = await VhostUserFrontend.connect(path)
            await other.expect_closed(timeout=5)  # closed at once, nothing sent
            await other.aclose()
            assert server.refused == n
        busy = [r for r in caplog.records if BUSY in r.getMessage()]
        assert len(busy) == 3 and all(r.levelno == logging.WARNING for r in busy)
        assert all(r.getMessage().startswith("echo#") for r in busy)
        assert all(f"front-end {holder} is connected" in r.getMessage() for r in busy)
        # the idle front-end starts talking: it is served as if nothing happened
        await first.negotiate()
        assert await first.get_u64(R.GET_QUEUE_NUM) == 1
        await first.aclose()
        # (b) once it is gone, a new front-end is served
        await wait_until(lambda: server.frontend is None)
        second = await VhostUserFrontend.connect(path)
        assert await served(second)
        await second.aclose()
    assert server.connections == 2
    assert server.refused == 3


async def test_frontend_arriving_during_teardown_waits_and_is_served(tmp_path: Path) -> None:
    """A reconnecting QEMU must not be refused because the previous connection is still
    draining its in-flight requests: it waits for the teardown, then is served."""
    device = EchoDevice()
    device.hold = {b"held"}  # never completes: teardown waits drain_timeout
    server = VhostUserServer(device, drain_timeout=0.5)
    ram = GuestRam(2 << 20)
    try:
        async with listening(server, tmp_path) as path:
            fe = await VhostUserFrontend.connect(path)
            await fe.negotiate()
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=16)
            vq.driver.add([b"held"], [4])
            vq.publish_and_kick()
            await wait_until(lambda: server.in_flight() == 1)
            await fe.aclose()
            # the front-end is gone, the old handler is still draining
            await wait_until(lambda: server.frontend is None)
            assert server.handler is not None
            fe2 = await VhostUserFrontend.connect(path)
            with trio.fail_after(5):
                assert await served(fe2)
            await fe2.aclose()
    finally:
        ram.close()
    assert server.refused == 0
    assert server.connections == 2


async def test_frontend_arriving_just_after_a_probe_hung_up_is_served(tmp_path: Path) -> None:
    """Connect-and-close probes (the test harness's wait_for_socket, a monitoring
    check) followed at once by the real front-end: it is never refused, even when it is
    accepted before the server has read the probe's end of file."""
    server = VhostUserServer(EchoDevice())
    async with listening(server, tmp_path) as path:
        for _ in range(20):
            probe = await VhostUserFrontend.connect(path)
            await wait_until(lambda: server.frontend is not None)
            await probe.aclose()
            fe = await VhostUserFrontend.connect(path)
            with trio.fail_after(5):
                assert await served(fe)
            await fe.aclose()
            await wait_until(lambda: server.frontend is None)
    assert server.refused == 0
    assert server.connections == 40


# ------------------------------------------------------------------ idle timeout


async def test_idle_timeout_closes_a_silent_connection_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    timeout = 0.3
    server = VhostUserServer(EchoDevice(), idle_timeout=timeout)
    async with listening(server, tmp_path) as path:
        silent = await VhostUserFrontend.connect(path)
        start = trio.current_time()
        await silent.expect_closed(timeout=5)
        assert trio.current_time() - start >= timeout * 0.9
        await silent.aclose()
        assert server.error_counts["IdleTimeout"] == 1
        assert "sent nothing in 0.3 s (idle timeout)" in caplog.text
        # a front-end that has spoken is never timed out, however long it stays silent
        await wait_until(lambda: server.frontend is None)
        talker = await VhostUserFrontend.connect(path)
        await talker.negotiate()
        with trio.move_on_after(3 * timeout) as quiet:
            await talker.expect_closed(timeout=10)
        assert quiet.cancelled_caught, "a connection that had spoken was closed"
        assert await served(talker)
        await talker.aclose()
    assert server.error_counts["IdleTimeout"] == 1


def test_idle_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        VhostUserServer(EchoDevice(), idle_timeout=0)


# ------------------------------------------------------------------ no memory per bad connection

TRUNCATED_HEADER = HEADER.pack(R.GET_FEATURES, 1, 0)[:5]
UNKNOWN_REQUEST = HEADER.pack(9999, 1, 0)
BAD_CONNECTIONS = 1000
MAX_GROWTH_PER_CONNECTION = 100
"""Bytes.  Measured over 1,000 connections (tracemalloc, after 2 * ERROR_HISTORY to fill
the history): before the fix ~5,400 B per truncated header and ~560 B per unknown
request (every exception was kept, a raised one with its traceback and so every frame
of the dead connection); after it ~0-20 B, the bounded history settling."""


@pytest.mark.parametrize(
    ("data", "kind", "message"),
    [
        (TRUNCATED_HEADER, "PartialMessage", "connection closed after 5 bytes"),
        (UNKNOWN_REQUEST, "UnknownRequest", "unknown front-end request 9999"),
    ],
    ids=["truncated-header", "unknown-request"],
)
async def test_connections_ending_in_protocol_errors_keep_no_memory(
    data: bytes, kind: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL)  # caplog itself would keep every record
    server = VhostUserServer(EchoDevice())

    async def bad_connection() -> None:
        ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        await ours.send(data)
        ours.shutdown(socket.SHUT_WR)
        await server.serve_connection(theirs)
        ours.close()

    tracemalloc.start()
    try:
        for _ in range(2 * ERROR_HISTORY):  # fills the error history
            await bad_connection()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(BAD_CONNECTIONS):
            await bad_connection()
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth / BAD_CONNECTIONS < MAX_GROWTH_PER_CONNECTION, growth
    total = 2 * ERROR_HISTORY + BAD_CONNECTIONS
    assert server.connections == total
    assert server.error_counts[kind] == total
    assert len(server.errors) == ERROR_HISTORY
    last = server.errors[-1]
    assert last.kind == kind and last.connection == f"{server.name}#{total}"
    assert message in last.message


# ------------------------------------------------------------------ the CLI

REPO = Path(__file__).resolve().parents[3]


async def test_cli_refuses_a_busy_device_and_times_out_a_silent_connection(
    tmp_path: Path,
) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    path = tmp_path / "blk.sock"
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "virtio", "-v", "serve", "blk", "--socket-path",
         os.fspath(path), "--blk-file", os.fspath(img), "--idle-timeout", "0.5"],
        stderr=subprocess.PIPE,
        cwd=REPO,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = proc.stderr
    log = bytearray()

    async def wait_for_log(text: str) -> None:
        while text.encode() not in log:
            chunk = await stderr.receive_some(65536)
            assert chunk, log.decode()
            log.extend(chunk)

    try:
        with trio.fail_after(20):
            await wait_for_log("listening on")
            talker = await VhostUserFrontend.connect(path)
            await talker.negotiate()
            other = await VhostUserFrontend.connect(path)
            await other.expect_closed()
            await other.aclose()
            await wait_for_log("virtio-blk#2: device busy: front-end virtio-blk#1 is connected")
            assert await served(talker)
            await talker.aclose()
            await wait_for_log("virtio-blk#1: connection closed: front-end disconnected")
            silent = await VhostUserFrontend.connect(path)
            start = trio.current_time()
            await silent.expect_closed(timeout=10)
            assert trio.current_time() - start >= 0.45
            await silent.aclose()
            await wait_for_log("virtio-blk#3: sent nothing in 0.5 s (idle timeout); closing")
            proc.send_signal(signal.SIGTERM)
            await wait_for_log("statistics: connections=2 refused=1 errors=1 ")
            assert await proc.wait() == 0
        assert not path.exists() and not Path(f"{path}.lock").exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await stderr.aclose()


async def test_busy_refusals_are_rate_limited_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A local process connecting in a loop cannot flood the log (issue 13 §0.5)."""
    caplog.set_level(logging.INFO)
    server = VhostUserServer(EchoDevice(), name="echo")
    async with listening(server, tmp_path) as path:
        first = await VhostUserFrontend.connect(path)
        await wait_until(lambda: server.handler is not None)
        for _ in range(20):
            other = await VhostUserFrontend.connect(path)
            await other.expect_closed(timeout=5)
            await other.aclose()
        assert server.refused == 20
        busy = [r for r in caplog.records if BUSY in r.getMessage()]
        assert len(busy) == 5  # the burst; the other 15 are counted, not printed
        assert server.busy_log.suppressed == {"busy": 15}
        await first.aclose()
