"""docs/attach.md's QEMU command lines (blk, rng, net, input), run as written.

Each ``qemu-*`` block is parsed: its machine/memory options must be the ones the
QEMU harness boots every guest with (``-object memory-backend-memfd,...,share=on``
+ ``-numa node,memdev=mem``), and its ``-chardev``/``-netdev``/``-device`` options
are passed to QEMU verbatim (the socket path pointed at a temporary directory); a
Linux guest must see the device through our back-end.  The net block runs on both
QEMU versions (two guests on one ``virtio serve net`` switch, TCP between them; under
TCG ``vectors=0`` is appended, the QEMU 7.2 quirk the doc names), the input block on
QEMU 10 (QEMU 7.2 refuses vhost-user-input-pci without KVM).
"""

from __future__ import annotations

import itertools
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

from virtio.testing.qemu import QemuBinary, QemuGuest

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
    """``virtio serve DEVICE --socket-path SOCK ARGS`` until the block ends (every
    ``--socket-path`` among ARGS listening too)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "virtio", "serve", device, "--socket-path", os.fspath(sock), *args],
        cwd=REPO,
    )
    socks = [sock] + [Path(a) for f, a in itertools.pairwise(args) if f == "--socket-path"]
    try:
        with trio.fail_after(20):
            while not all(s.exists() for s in socks):
                assert proc.returncode is None, f"virtio serve {device} exited"
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


def _memory_is_shared(opts: dict[str, list[str]]) -> None:
    assert re.fullmatch(r"memory-backend-memfd,id=mem,size=\d+M,share=on", opts["-object"][0])
    assert opts["-numa"] == ["node,memdev=mem"]


async def test_qemu_net_command_line_of_the_doc(
    guest_image, qemu: QemuBinary, tmp_path: Path
) -> None:
    """Two guests, each with the doc's lines (the second on the switch's second port
    with another MAC), exchange 4 MiB over TCP through ``virtio serve net``."""
    opts = options(doc_block("qemu-net"))
    _memory_is_shared(opts)
    (chardev,), (netdev,), (device,) = opts["-chardev"], opts["-netdev"], opts["-device"]
    assert "reconnect=1" in chardev and "vectors" not in device
    doc_mac = re.search(r"mac=([0-9a-f:]+)", device).group(1)
    socks = [tmp_path / "net0.sock", tmp_path / "net1.sock"]
    macs = [doc_mac, "52:54:00:12:34:57"]
    guests = []
    for sock, mac in zip(socks, macs, strict=True):
        dev = device.replace(doc_mac, mac)
        if os.environ.get("PYVIRTIO_QEMU_ACCEL", "tcg").startswith("tcg"):
            dev += ",vectors=0"  # the QEMU 7.2 TCG quirk the doc names (harmless on 10)
        args = ["-chardev", chardev.replace("/run/pyvirtio/net0.sock", os.fspath(sock)),
                "-netdev", netdev, "-device", dev]  # fmt: skip
        guests.append(QemuGuest(guest_image, qemu=qemu, extra_args=args))
    async with backend(socks[0], "net", "--socket-path", os.fspath(socks[1])):
        a, b = guests
        async with a, b:
            for g, ip in ((a, "10.0.13.1"), (b, "10.0.13.2")):
                r = await g.run(f"ip link set eth0 up && ip addr add {ip}/24 dev eth0")
                assert r.rc == 0, r.output
            mac_a = (await a.run("cat /sys/class/net/eth0/address")).output.strip()
            assert mac_a == doc_mac
            r = await b.run(
                "rm -f /tmp/rx.sha; "
                "(sleep 100000 | nc -l -p 5001 | sha256sum > /tmp/rx.sha) >/dev/null 2>&1 &"
            )
            r = await a.run("dd if=/dev/urandom of=/tmp/tx bs=1M count=4 2>/dev/null")
            sent = (await a.run("sha256sum < /tmp/tx")).output.split()[0]
            r = await a.run("ping -c 1 -W 10 10.0.13.2 >/dev/null; nc 10.0.13.2 5001 < /tmp/tx")
            assert r.rc == 0, r.output
            got = await b.run(
                "for i in $(seq 600); do [ -s /tmp/rx.sha ] && break; sleep 0.2; done; "
                "cat /tmp/rx.sha",
                timeout=150,
            )
            assert got.output.split()[0] == sent


@pytest.fixture
def input_qemu(qemu: QemuBinary) -> QemuBinary:
    """``qemu`` but 7.2, skipped here (a sync fixture: pytest-trio drops the reason of a
    skip raised inside the async test)."""
    if int(qemu.version.split(".")[0]) < 10:
        pytest.skip("QEMU 7.2 refuses vhost-user-input-pci without KVM (the doc says so)")
    return qemu


async def test_qemu_input_command_line_of_the_doc(
    guest_image, input_qemu: QemuBinary, tmp_path: Path
) -> None:
    qemu = input_qemu
    opts = options(doc_block("qemu-input"))
    _memory_is_shared(opts)
    sock = tmp_path / "input0.sock"
    chardev = opts["-chardev"][0].replace("/run/pyvirtio/input0.sock", os.fspath(sock))
    async with backend(sock, "input", "--kind", "keyboard"):
        guest = QemuGuest(
            guest_image,
            qemu=qemu,
            script="cat /proc/bus/input/devices",
            extra_args=["-chardev", chardev, "-device", opts["-device"][0]],
        )
        async with guest:
            result = await guest.wait_script(timeout=180)
        assert result.rc == 0, result.output
        # The guest's evdev layer sees our keyboard on the virtio bus (vendor 0x1af4).
        assert re.search(r"Bus=0006 Vendor=1af4 Product=0001", result.output), result.output
