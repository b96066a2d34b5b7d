"""``virtio serve rng``: QEMU's back-end program conventions (capabilities, usage errors,
clean SIGTERM) and a vhost-user front-end reading random bytes from it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import trio

from virtio.testing.blk_checks import wait_for_socket
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend

REPO = Path(__file__).resolve().parents[3]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtio", "serve", "rng", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_print_capabilities_and_usage_errors():
    out = _cli("--print-capabilities")
    assert out.returncode == 0 and json.loads(out.stdout) == {"type": "rng"}, out.stderr
    out = _cli()
    assert out.returncode == 2 and "--socket-path or --fd" in out.stderr, out.stderr


async def test_frontend_reads_random_bytes_then_sigterm(tmp_path):
    sock = tmp_path / "rng.sock"
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "virtio", "serve", "rng", "--socket-path", str(sock)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    ram = GuestRam(1 << 20)
    try:
        await wait_for_socket(sock, proc)
        fe = await VhostUserFrontend.connect(sock)
        try:
            await fe.negotiate()
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=8)
            vq.driver.add([], [64])
            vq.driver.add([], [64])
            vq.publish_and_kick()
            used = await vq.wait_used(2)
            assert [u.written for u in used] == [64, 64]
            assert used[0].data != used[1].data and len(set(used[0].data)) > 8
        finally:
            await fe.aclose()
    finally:
        ram.close()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await proc.wait() == 0
        assert proc.stderr is not None
        chunks = []
        while chunk := await proc.stderr.receive_some(65536):
            chunks.append(chunk)
        err = b"".join(chunks).decode()
        assert "virtio serve rng: statistics:" in err and "buffers_filled=2" in err, err
