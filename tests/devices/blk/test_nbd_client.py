"""The NBD client backend (``virtio/devices/blk/nbd.py``) against two real servers
started here, ``qemu-nbd`` and ``nbdkit`` (memory and file plugins; error and
delay filters for faults), on unix sockets and loopback TCP."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from virtio.devices.blk import BlkOptions, ImageFormatError, VirtioBlk
from virtio.devices.blk.nbd import NbdAddress, NbdBackend, NbdError

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]
QEMU_NBD = shutil.which("qemu-nbd")
NBDKIT = shutil.which("nbdkit")


def test_uris_as_qemu_and_libnbd_write_them():
    a = NbdAddress.parse("nbd://127.0.0.1:10900/disk%20one")
    assert (a.host, a.port, a.export, a.socket_path) == ("127.0.0.1", 10900, "disk one", None)
    assert NbdAddress.parse("nbd://example.org").port == 10809
    assert NbdAddress.parse("nbd://example.org").export == ""
    u = NbdAddress.parse("nbd+unix:///exp?socket=/run/nbd.sock")
    assert (u.socket_path, u.export, u.host) == ("/run/nbd.sock", "exp", None)
    for bad, why in [
        ("nbd+unix:///e", "socket=PATH"),
        ("nbd:///e", "no host"),
        ("http://h/e", "not an nbd"),
    ]:
        with pytest.raises(NbdError, match=why):
            NbdAddress.parse(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(uri: str, proc: subprocess.Popen) -> None:
    addr = NbdAddress.parse(uri)
    deadline = time.monotonic() + 15
    while True:
        assert proc.poll() is None, f"NBD server exited with {proc.returncode}"
        try:
            addr.connect(1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{uri} never accepted connections"
            time.sleep(0.05)


@dataclasses.dataclass
class Server:
    uri: str
    proc: subprocess.Popen


@contextlib.contextmanager
def nbd_server(kind: str, tmp: Path, *, tcp: bool = False, args: tuple[str, ...] = (),
               size: int = 8 * MiB, read_only: bool = False,
               qemu_args: tuple[str, ...] = ()) -> Iterator[Server]:  # fmt: skip
    """Start ``qemu-nbd`` (on a sparse raw file; ``qemu_args``: more options) or
    ``nbdkit`` (memory plugin unless ``args`` says otherwise); yield it; stop it."""
    if (kind == "qemu-nbd" and QEMU_NBD is None) or (kind == "nbdkit" and NBDKIT is None):
        pytest.skip(f"{kind} is not installed")
    sock = tmp / f"{kind}.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()  # left by a server that was killed
    port = _free_port()
    where = f"nbd://127.0.0.1:{port}/exp" if tcp else f"nbd+unix:///exp?socket={sock}"
    if kind == "qemu-nbd":
        img = Path(args[1]) if args[:1] == ("file",) else tmp / "export.raw"
        if not img.exists():
            img.write_bytes(b"")
            os.truncate(img, size)
        listen = ["-b", "127.0.0.1", "-p", str(port)] if tcp else ["-k", str(sock)]
        ro = ["-r"] if read_only else []
        cmd = [QEMU_NBD, "-f", "raw", "-x", "exp", "-t", "-e", "8", *ro, *listen, *qemu_args]
        cmd.append(str(img))
    else:
        listen = ["-i", "127.0.0.1", "-p", str(port)] if tcp else ["-U", str(sock)]
        ro = ["-r"] if read_only else []
        plugin = list(args) or ["memory", f"size={size}"]
        cmd = [NBDKIT, "-f", *ro, *listen, *plugin]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(where, proc)
        yield Server(where, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


SERVERS = [("qemu-nbd", False), ("qemu-nbd", True), ("nbdkit", False), ("nbdkit", True)]


@pytest.mark.parametrize(
    ("kind", "tcp"), SERVERS, ids=["qemu-nbd", "qemu-nbd-tcp", "nbdkit", "nbdkit-tcp"]
)
async def test_random_requests_in_flight_match_a_model(tmp_path, kind, tcp):
    with nbd_server(kind, tmp_path, tcp=tcp) as server:
        uri = server.uri
        backend = NbdBackend(uri)
        try:
            assert backend.size == 8 * MiB and backend.info.structured
            model = bytearray(backend.size)
            rng = random.Random(kind + str(tcp))

            async def worker(i: int) -> None:
                base = i * MiB
                for _ in range(25):
                    off = base + rng.randrange(0, 1536) * 512
                    n = rng.randrange(1, 512) * 512
                    op = rng.randrange(5)
                    if op == 0:
                        data = rng.randbytes(n)
                        await backend.write(off, [memoryview(data)], sync=rng.random() < 0.3)
                        model[off : off + n] = data
                    elif op == 1:  # two views: a vectored request
                        got = bytearray(n)
                        half = n // 1024 * 512
                        view = memoryview(got)
                        await backend.read(off, [view[:half], view[half:]])
                        assert got == model[off : off + n]
                    elif op == 2:
                        await backend.write_zeroes([(off, n)], unmap=rng.random() < 0.5)
                        model[off : off + n] = bytes(n)
                    elif op == 3:
                        await backend.discard([(off, n)])  # contents: whatever reads back
                        got = bytearray(n)
                        await backend.read(off, [memoryview(got)])
                        model[off : off + n] = got
                    else:
                        await backend.flush()

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(worker, i)
            whole = bytearray(backend.size)
            await backend.read(0, [memoryview(whole)])
            assert whole == model
        finally:
            backend.close()


async def test_large_requests_are_split_to_the_servers_maximum(tmp_path):
    # blocksize-policy advertises the maximum and fails any request above it.
    args = ("--filter=blocksize-policy", "memory", "size=8M", "blocksize-maximum=64K",
            "blocksize-error-policy=error")  # fmt: skip
    with nbd_server("nbdkit", tmp_path, args=args) as server:
        uri = server.uri
        backend = NbdBackend(uri)
        try:
            assert backend.info.max_payload == 65536
            data = random.Random(3).randbytes(3 * MiB)
            await backend.write(4096, [memoryview(data)])
            got = bytearray(len(data))
            await backend.read(4096, [memoryview(got)])
            assert got == data
        finally:
            backend.close()


async def test_server_errors_fail_one_request_only(tmp_path):
    args = ("--filter=error", "memory", "size=8M", "error-pread=EIO", "error-pread-rate=100%")
    with nbd_server("nbdkit", tmp_path, args=args) as server:
        uri = server.uri
        backend = NbdBackend(uri)
        try:
            await backend.write(0, [memoryview(b"x" * 4096)])
            with pytest.raises(NbdError) as info:
                await backend.read(0, [memoryview(bytearray(4096))])
            assert info.value.errno == errno.EIO
            await backend.write(4096, [memoryview(b"y" * 4096)])  # still connected
            await backend.flush()
            assert backend.reconnects == 0
        finally:
            backend.close()


async def test_server_restart_fails_in_flight_requests_then_reconnects(tmp_path):
    delayed = ("--filter=delay", "memory", "size=8M", "delay-read=30")
    with nbd_server("nbdkit", tmp_path, args=delayed) as server:
        backend = NbdBackend(server.uri)
        await backend.write(0, [memoryview(b"z" * 4096)])
        failed = []

        async def reader() -> None:
            try:
                await backend.read(0, [memoryview(bytearray(4096))])
            except NbdError as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            with trio.fail_after(10):  # until the read is on the wire
                while not (backend._conn and backend._conn._pending):
                    await trio.sleep(0.01)
            server.proc.kill()  # the server dies with the read in flight
        assert len(failed) == 1 and "connection lost" in str(failed[0])
        with pytest.raises(NbdError, match="cannot reconnect"):
            await backend.flush()  # nobody listening: IOERR, no crash
    # A new server on the same socket: the next request reconnects.
    with nbd_server("nbdkit", tmp_path) as again:
        assert again.uri == server.uri
        await backend.write(0, [memoryview(b"n" * 4096)])
        got = bytearray(4096)
        await backend.read(0, [memoryview(got)])
        assert got == b"n" * 4096 and backend.reconnects == 1
        backend.close()


async def test_read_only_export(tmp_path):
    with nbd_server("qemu-nbd", tmp_path, read_only=True) as server:
        uri = server.uri
        backend = NbdBackend(uri)
        try:
            assert backend.read_only and not backend.can_unmap
            with pytest.raises(NbdError, match="read-only"):
                await backend.write(0, [memoryview(bytes(512))])
        finally:
            backend.close()


def test_device_and_cli(tmp_path):
    with nbd_server("qemu-nbd", tmp_path) as server:
        uri = server.uri
        dev = VirtioBlk.from_options(BlkOptions(path=uri))
        try:
            assert dev.capacity == 8 * MiB // 512 and not hasattr(dev.backend, "fd")
        finally:
            dev.close()
        with pytest.raises(ImageFormatError, match="not served over NBD"):
            VirtioBlk.from_options(BlkOptions(path=uri), image_format="qcow2")
    r = subprocess.run(
        [sys.executable, "-m", "virtio", "serve", "blk", "--socket-path", str(tmp_path / "s"),
         "--blk-file", f"nbd+unix:///exp?socket={tmp_path}/nobody.sock"],
        capture_output=True, text=True, cwd=REPO, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot open nbd+unix" in r.stderr


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
async def test_qcow2_overlay_over_an_nbd_export(tmp_path, kind):
    from virtio.devices.blk.qcow2 import Qcow2Backend

    content = random.Random(9).randbytes(4 * MiB)
    base = tmp_path / "export.raw"
    base.write_bytes(content)
    args = ("file", str(base))  # nbdkit's file plugin; qemu-nbd serves the same file
    with nbd_server(kind, tmp_path, args=args) as server:
        top = tmp_path / "top.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", server.uri, "-F", "raw",
             str(top), "6M"],
            check=True,
        )  # fmt: skip
        backend = Qcow2Backend(top)
        model = bytearray(content + bytes(2 * MiB))
        try:
            got = bytearray(backend.size)
            await backend.read(0, [memoryview(got)])
            assert got == model  # falls through to the export, zeros past its end
            data = random.Random(10).randbytes(9 * 512)
            await backend.write(100 * 512, [memoryview(data)])  # COW from NBD
            model[100 * 512 : 100 * 512 + len(data)] = data
            await backend.flush()
            await backend.read(0, [memoryview(got)])
            assert got == model
        finally:
            backend.close()
        assert base.read_bytes() == content  # the export is only read
        r = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        raw = tmp_path / "model.raw"
        raw.write_bytes(model)
        r = subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(top), str(raw)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr
