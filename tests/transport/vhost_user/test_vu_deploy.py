"""Running the back-end as operators do: systemd socket activation and readiness,
the dedicated executable, and vhost-user back-end descriptor files (QEMU's
``docs/interop/vhost-user.json``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from virtio.testing.vhost_user_frontend import VhostUserFrontend

MiB = 1 << 20
BIN = Path(sys.executable).parent
BLK = BIN / "pyvirtio-vhost-user-blk"
VHOST_USER_BACKEND_TYPES = {
    "9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net", "rng",
    "rpmsg", "rproc-serial", "scsi", "vsock", "fs",
}  # fmt: skip
"""``VHostUserBackendType`` of vhost-user.json."""

needs_blk_binary = pytest.mark.skipif(
    not BLK.exists(), reason="pyvirtio-vhost-user-blk not installed (pip install -e .)"
)


async def capacity_over(path: str) -> int:
    with trio.fail_after(20):
        fe = await VhostUserFrontend.connect(path)
        try:
            await fe.negotiate()
            return int.from_bytes(await fe.get_config(0, 8), "little")
        finally:
            await fe.aclose()


async def stop(proc: trio.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        return await proc.wait()


@needs_blk_binary
async def test_socket_activation_by_listen_fds(tmp_path: Path) -> None:
    """sd_listen_fds(3): the listening socket arrives as fd 3 with LISTEN_FDS=1 and
    LISTEN_PID=<our pid>; no --socket-path."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(3 * MiB))
    path = os.fspath(tmp_path / "act.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    # What systemd does between fork and exec: the socket at fd 3, the variables set
    # for the pid that execs the back-end.
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.argv[2], sys.argv[2:])"
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", launcher, str(listener.fileno()), str(BLK), "--blk-file", str(img)],
        pass_fds=(listener.fileno(),),
    )
    listener.close()
    try:
        assert await capacity_over(path) == 3 * MiB // 512
        assert await capacity_over(path) == 3 * MiB // 512  # still listening: a reconnect
        assert await stop(proc) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@needs_blk_binary
@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate (Debian package systemd) is not installed",
)
async def test_socket_activation_by_systemd_tool(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    path = os.fspath(tmp_path / "sd.sock")
    proc = await trio.lowlevel.open_process(
        ["systemd-socket-activate", "-l", path, str(BLK), "--blk-file", str(img)],
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(20):
            while not os.path.exists(path):  # the tool binds before it waits
                await trio.sleep(0.01)
        assert await capacity_over(path) == MiB // 512
        assert await stop(proc) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@needs_blk_binary
async def test_readiness_is_notified_once_listening(tmp_path: Path) -> None:
    """Type=notify: READY=1 arrives on $NOTIFY_SOCKET when the socket is served, and
    STOPPING=1 on SIGTERM."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    notify_path = os.fspath(tmp_path / "notify")
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(notify_path)
    path = os.fspath(tmp_path / "blk.sock")
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    proc = await trio.lowlevel.open_process(
        [str(BLK), "--socket-path", path, "--blk-file", str(img)], env=env
    )
    try:
        with trio.fail_after(20):
            assert await notify.recv(4096) == b"READY=1"
        assert os.path.exists(path)  # listening before READY=1
        assert await capacity_over(path) == MiB // 512
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await notify.recv(4096) == b"STOPPING=1"
            assert await proc.wait() == 0
    finally:
        notify.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_no_socket_at_all_is_a_usage_error(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    r = subprocess.run(
        [sys.executable, "-m", "virtio", "serve", "blk", "--blk-file", str(img)],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")},
    )
    assert r.returncode == 2, r.stderr
    assert "socket activation" in r.stderr and r.stderr.count("\n") == 1


@needs_blk_binary
def test_descriptor_files_follow_vhost_user_json(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "virtio", "descriptors", "--install", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [
        "50-pyvirtio-blk.json",
        "50-pyvirtio-input.json",
        "50-pyvirtio-net.json",
        "50-pyvirtio-rng.json",
    ]
    for f in files:
        doc = json.loads(f.read_text())
        # VhostUserBackend: description (str), type (enum), binary (absolute), *tags
        assert set(doc) <= {"description", "type", "binary", "tags"}
        assert isinstance(doc["description"], str) and doc["description"]
        assert doc["type"] in VHOST_USER_BACKEND_TYPES
        binary = Path(doc["binary"])
        assert binary.is_absolute() and os.access(binary, os.X_OK)
        # Management software asks the binary what it supports.
        caps = subprocess.run(
            [str(binary), "--print-capabilities"], capture_output=True, text=True, timeout=30
        )
        assert caps.returncode == 0, caps.stderr
        assert json.loads(caps.stdout)["type"] == doc["type"]
