"""docs/attach.md's QEMU command line for virtio-blk, run as written.

The ``qemu-blk`` block is parsed: its machine/memory options must be the ones the
QEMU harness boots every guest with (``-object memory-backend-memfd,...,share=on``
+ ``-numa node,memdev=mem``), and its ``-chardev``/``-device`` options are passed to
QEMU verbatim (the socket path pointed at a temporary directory); a Linux guest
must see the disk through our back-end, with the queues the doc asks for.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from virtio.testing.qemu import QemuGuest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "attach.md"
MiB = 1 << 20

pytestmark = [pytest.mark.qemu]


def doc_block(tag: str) -> list[str]:
    """The shell words of the fenced block after ``<!-- tag -->`` (no trailing ``...``)."""
    text = DOC.read_text()
    m = re.search(rf"<!-- {tag} -->\n```sh\n(.*?)```", text, re.S)
    assert m, f"no {tag} block in {DOC}"
    lines = [line.split("#")[0].rstrip() for line in m.group(1).splitlines()]
    words = shlex.split(" ".join(line.rstrip("\\") for line in lines))
    return [w for w in words if w != "..."]


@asynccontextmanager
async def backend(sock: Path, device: str, *args: str) -> AsyncIterator[None]:
    """``virtio serve DEVICE --socket-path SOCK ARGS`` until the block ends."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "virtio", "serve", device, "--socket-path", os.fspath(sock), *args],
        cwd=REPO,
    )
    try:
        with trio.fail_after(20):
            while not sock.exists():
                await trio.sleep(0.01)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(20):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def options(words: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for flag, value in zip(words[1::2], words[2::2], strict=False):
        out.setdefault(flag, []).append(value)
    return out


async def test_qemu_blk_command_line_of_the_doc(guest_image, tmp_path: Path) -> None:
    words = doc_block("qemu-blk")
    assert words[0] == "qemu-system-x86_64"
    opts = options(words)
    assert re.fullmatch(r"memory-backend-memfd,id=mem,size=\d+M,share=on", opts["-object"][0])
    assert opts["-numa"] == ["node,memdev=mem"]
    sock = tmp_path / "blk0.sock"
    chardev = opts["-chardev"][0].replace("/run/pyvirtio/blk0.sock", os.fspath(sock))
    device = opts["-device"][0]
    queues = int(re.search(r"num-queues=(\d+)", device).group(1))
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(64 * MiB))
    async with backend(sock, "blk", "--blk-file", os.fspath(img), "--num-queues", str(queues)):
        script = "cat /sys/block/vda/size; ls /sys/block/vda/mq | wc -l"
        guest = QemuGuest(
            guest_image, script=script, smp=2, extra_args=["-chardev", chardev, "-device", device]
        )
        async with guest:
            # The doc's memory setup is the one this guest boots with.
            line = guest.command_line("qemu-system-x86_64")
            mem = re.sub(r"size=\d+M", "size=", opts["-object"][0])
            assert mem in [re.sub(r"size=\d+M", "size=", w) for w in line]
            assert "node,memdev=mem" in line
            result = await guest.wait_script(timeout=180)
        assert result.rc == 0, result.output
        size, nqueues = result.output.split()
        assert int(size) == 64 * MiB // 512
        assert int(nqueues) == queues


async def test_qemu_rng_command_line_of_the_doc(guest_image, tmp_path: Path) -> None:
    opts = options(doc_block("qemu-rng"))
    assert opts["-numa"] == ["node,memdev=mem"]
    assert "share=on" in opts["-object"][0]
    sock = tmp_path / "rng0.sock"
    chardev = opts["-chardev"][0].replace("/run/pyvirtio/rng0.sock", os.fspath(sock))
    async with backend(sock, "rng"):
        script = (
            "cat /sys/class/misc/hw_random/rng_current; "
            "dd if=/dev/hwrng bs=256 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n'"
        )
        guest = QemuGuest(
            guest_image,
            script=script,
            extra_args=["-chardev", chardev, "-device", opts["-device"][0]],
        )
        async with guest:
            result = await guest.wait_script(timeout=180)
        assert result.rc == 0, result.output
        current, hexdata = result.output.split()
        assert current.startswith("virtio_rng")
        data = bytes.fromhex(hexdata)
        assert len(data) == 256 and len(set(data)) > 64  # not constant
