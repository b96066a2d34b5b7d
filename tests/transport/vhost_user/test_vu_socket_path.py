"""Claiming the socket path: only a socket proven dead is removed, never anything else;
two back-ends started on one path at once: exactly one wins and its socket survives;
at exit only our own socket is removed."""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from virtio.testing.vhost_user_frontend import EchoDevice, VhostUserFrontend
from virtio.transport.vhost_user.messages import HEADER
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.server import VhostUserServer
from virtio.transport.vhost_user.socket_path import (
    SocketPathError,
    SocketPathInUse,
    SocketPathOccupied,
)

REPO = Path(__file__).resolve().parents[3]


def lock_of(path: Path) -> Path:
    return Path(os.fspath(path) + ".lock")


def stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(path))
    s.close()  # the file stays, nobody listens


def get_features(path: Path) -> int:
    """GET_FEATURES over a plain blocking socket: the server at ``path`` answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(os.fspath(path))
        s.sendall(HEADER.pack(R.GET_FEATURES, 1, 0))
        reply = b""
        while len(reply) < HEADER.size + 8:
            chunk = s.recv(64)
            assert chunk, "the server closed the connection"
            reply += chunk
    return int.from_bytes(reply[HEADER.size :], "little")


# ------------------------------------------------------------------ what is at the path


def _make_file(p: Path) -> None:
    p.write_text("precious")


def _make_dir(p: Path) -> None:
    p.mkdir()


def _make_symlink(p: Path) -> None:
    target = p.with_name("target.sock")
    stale_socket(target)
    p.symlink_to(target)


def _make_fifo(p: Path) -> None:
    os.mkfifo(p)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (_make_file, "a regular file"),
        (_make_dir, "a directory"),
        (_make_symlink, "a symbolic link"),
        (_make_fifo, "a FIFO"),
    ],
    ids=["file", "dir", "symlink", "fifo"],
)
async def test_anything_but_a_socket_is_kept_with_a_clear_error(
    tmp_path: Path, make, kind: str
) -> None:
    path = tmp_path / "vu.sock"
    make(path)
    before = os.lstat(path)
    with pytest.raises(SocketPathOccupied) as info:
        await VhostUserServer(EchoDevice()).serve_path(path)
    assert str(info.value) == f"{path} exists and is {kind}, not a socket: not removing it"
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if kind == "a regular file":
        assert path.read_text() == "precious"
    assert not lock_of(path).exists()


async def test_a_live_socket_of_another_program_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(os.fspath(path))
    other.listen(1)
    try:
        with pytest.raises(SocketPathInUse, match=f"another server is listening on {path}"):
            await VhostUserServer(EchoDevice()).serve_path(path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(os.fspath(path))  # still the other program's socket
        conn, _ = other.accept()
        conn.close()
        probe.close()
    finally:
        other.close()


async def test_a_live_backend_on_the_path_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    winner = VhostUserServer(EchoDevice())
    async with trio.open_nursery() as nursery:
        await nursery.start(winner.serve_path, path)
        inode = os.lstat(path).st_ino
        with pytest.raises(SocketPathInUse) as info:
            await VhostUserServer(EchoDevice()).serve_path(path)
        assert str(info.value) == (
            f"another back-end (pid {os.getpid()}) is serving {path} (it holds {lock_of(path)})"
        )
        assert os.lstat(path).st_ino == inode
        fe = await VhostUserFrontend.connect(path)
        assert await fe.get_u64(R.GET_FEATURES)
        await fe.aclose()
        nursery.cancel_scope.cancel()
    assert not path.exists() and not lock_of(path).exists()


async def test_a_stale_socket_and_a_stale_lock_file_are_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "vu.sock"
    stale_socket(path)
    lock_of(path).write_text("999999\n")  # left by a killed back-end: nobody holds it
    async with trio.open_nursery() as nursery:
        await nursery.start(VhostUserServer(EchoDevice()).serve_path, path)
        assert f"removed the stale socket {path}" in caplog.text
        assert lock_of(path).read_text() == f"{os.getpid()}\n"
        fe = await VhostUserFrontend.connect(path)
        assert await fe.get_u64(R.GET_FEATURES)
        await fe.aclose()
        nursery.cancel_scope.cancel()
    assert not path.exists() and not lock_of(path).exists()


async def test_at_exit_only_our_own_socket_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "vu.sock"
    replacement = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(VhostUserServer(EchoDevice()).serve_path, path)
            os.unlink(path)  # someone else takes the path over
            replacement.bind(os.fspath(path))
            replacement.listen(1)
            inode = os.lstat(path).st_ino
            nursery.cancel_scope.cancel()
        assert os.lstat(path).st_ino == inode  # theirs: left in place
        assert f"{path} is no longer our socket: leaving it in place" in caplog.text
        assert not lock_of(path).exists()
    finally:
        replacement.close()


async def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    path = tmp_path / "no" / "vu.sock"
    with pytest.raises(SocketPathError) as info:
        await VhostUserServer(EchoDevice()).serve_path(path)
    assert str(info.value) == (f"cannot listen on {path}: directory {path.parent} does not exist")


def test_cli_keeps_a_regular_file_at_the_socket_path(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    path = tmp_path / "vu.sock"
    path.write_text("precious")
    r = subprocess.run(
        [sys.executable, "-m", "virtio", "serve", "blk", "--socket-path", os.fspath(path),
         "--blk-file", os.fspath(img)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr == (
        f"virtio serve blk: {path} exists and is a regular file, not a socket: not removing it\n"
    )
    assert path.read_text() == "precious"


# ------------------------------------------------------------------ two starters at once

WORKER = r"""
import sys, trio
from virtio.testing.vhost_user_frontend import EchoDevice
from virtio.transport.vhost_user.server import VhostUserServer

async def attempt(path):
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(VhostUserServer(EchoDevice()).serve_path, path)
        except OSError as exc:
            print("lost", type(exc).__name__, exc, flush=True)
            return
        print("won", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)  # "stop"
        nursery.cancel_scope.cancel()
    print("stopped", flush=True)

print("ready", flush=True)
while line := sys.stdin.readline():
    trio.run(attempt, line.strip())
"""


class Worker:
    """A process that tries ``serve_path`` each time it is sent a path."""

    def __init__(self, log: Path) -> None:
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO,
        )
        self._buf = b""
        assert self.line() == "ready"

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = 20) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], "worker silent"
            chunk = os.read(fd, 4096)
            assert chunk, f"worker exited: {self.proc.wait()}"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._log.close()


def test_two_backends_started_at_once_exactly_one_wins_and_its_socket_survives(
    tmp_path: Path,
) -> None:
    """30 rounds, on an empty path and on a stale socket in turn: the loser reports the
    winner and touches nothing; the winner's socket answers; at exit it is removed."""
    path = tmp_path / "race.sock"
    workers = [Worker(tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        for round_ in range(30):
            if round_ % 2:
                stale_socket(path)
            for w in workers:  # both are blocked reading: they start together
                w.send(os.fspath(path))
            results = [w.line() for w in workers]
            winners = [w for w, r in zip(workers, results, strict=True) if r == "won"]
            losers = [r for r in results if r != "won"]
            assert len(winners) == 1 and len(losers) == 1, (round_, results)
            (lost,) = losers
            # the pid is named unless the loser looked before the winner had written it
            pid = winners[0].proc.pid
            assert re.fullmatch(
                rf"lost SocketPathInUse another back-end( \(pid {pid}\))? "
                rf"is serving {re.escape(str(path))} \(it holds {re.escape(str(lock_of(path)))}\)",
                lost,
            ), lost
            assert get_features(path) != 0, round_  # the winner's socket is alive
            winners[0].send("stop")
            assert winners[0].line() == "stopped"
            assert not path.exists() and not lock_of(path).exists(), round_
    finally:
        for w in workers:
            w.close()
