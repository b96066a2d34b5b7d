"""The QEMU harness's command channel (virtio.testing.qemu + the guest's /init).

Commands reach the guest shell as lines on the serial console.  busybox ash's
``read`` loses the part of a line it has already read when a signal (SIGCHLD from a
background job of that shell) interrupts it while it waits for the rest; in raw
tty mode that wait happens mid-line, and a command vanished (the reconnect test's
former intermittent "hang").  The guest's tty is in canonical mode, which hands
``read`` whole lines only.
"""

from __future__ import annotations

import hashlib
import os
import pty
import shutil
import subprocess
import termios
import time
import tty

import pytest
import trio

from virtio.testing.guest_image import (
    BUSYBOX,
    GuestImage,
    GuestImageError,
    GuestImageUnavailable,
    module_closure,
)
from virtio.testing.qemu import LINE_CHUNK, QemuGuest, command_lines


def test_busybox_read_gets_whole_lines_from_a_canonical_tty() -> None:
    """The property /init relies on, on the host's busybox: a SIGCHLD while the
    writer is in the middle of a line does not cost ``read`` the line's start."""
    if not os.path.isfile(BUSYBOX) or shutil.which("sleep") is None:
        pytest.skip(f"{BUSYBOX} (busybox-static) not installed")
    master, slave = pty.openpty()
    try:
        tty.setraw(slave)
        attrs = termios.tcgetattr(slave)
        attrs[3] |= termios.ICANON  # lflag: the same as /init's `stty raw -echo icanon`
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        shell = subprocess.Popen(
            [BUSYBOX, "sh", "-c", 'sleep 0.3 & IFS= read -r line; echo "[$line]"'],
            stdin=slave,
            stdout=subprocess.PIPE,
        )
        os.write(master, b"@@C 1 aGVsbG8K")
        # the background sleep exits (SIGCHLD to the reading shell) before the rest comes
        deadline = time.monotonic() + 10
        while not _has_no_children(shell.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _has_no_children(shell.pid)
        os.write(master, b"PQ==\n")
        out, _ = shell.communicate(timeout=10)
    finally:
        os.close(master)
        os.close(slave)
    assert out.decode().strip() == "[@@C 1 aGVsbG8KPQ==]"


def _has_no_children(pid: int) -> bool:
    """True once ``pid``'s background child has exited (no live child in /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    for child in children:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return False
        except FileNotFoundError:
            continue
    return True


def test_command_lines_split_long_commands() -> None:
    command = "echo " + "x" * (3 * LINE_CHUNK)
    lines = command_lines(command, "7-ab").decode().splitlines()
    assert [ln.split()[0] for ln in lines] == ["@@P"] * (len(lines) - 1) + ["@@C"]
    assert all(len(ln.split()[2]) <= LINE_CHUNK for ln in lines)
    assert all(ln.split()[1] == "7-ab" for ln in lines)
    assert command_lines("", "1-00") == b"@@C 1-00 \n"


@pytest.mark.qemu
async def test_commands_survive_background_jobs_exiting(guest_image: GuestImage) -> None:
    """A hundred background jobs of the guest shell exit while the harness sends
    forty commands (long lines, so several UART interrupts each): every command
    runs, in order, and a command longer than a tty line arrives whole."""
    with trio.fail_after(150):
        async with QemuGuest(guest_image) as g:
            await g.run("for i in $(seq 100); do (usleep $((i * 30000))) & done")
            padding = "#" + "p" * 600
            for i in range(40):
                r = await g.run(f"echo {i} {padding}", timeout=20)
                assert r.output.strip() == str(i)
            assert (await g.run("jobs -p | wc -l; wait; echo waited")).output.split()[-1] == (
                "waited"
            )
            text = os.urandom(6000).hex()  # 12,000 characters: 16 console lines
            r = await g.run(f"printf %s {text} | md5sum", timeout=30)
            assert r.output.split()[0] == hashlib.md5(text.encode()).hexdigest()


def test_module_closure_names_a_module_modprobe_does_not_know(tmp_path) -> None:
    release = "0.0.0-test"
    (tmp_path / "lib" / "modules" / release).mkdir(parents=True)
    depmod = shutil.which("depmod", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if depmod is None:
        pytest.skip("depmod (kmod) not installed")
    subprocess.run([depmod, "-b", str(tmp_path), release], check=True)
    try:
        with pytest.raises(GuestImageError, match="kernel module 'virtio_nope'"):
            module_closure(tmp_path, release, ["virtio_nope"])
    except GuestImageUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.qemu
async def test_guest_loads_the_module_closure(guest_image: GuestImage) -> None:
    """Every module modprobe put in the image (wanted ones and what they need, soft
    dependencies included) is loaded in the booted guest."""
    modules = set(guest_image.manifest["modules"])
    assert {"virtio_blk", "virtio_ring", "ext4", "jbd2", "crc32c_generic"} <= modules
    with trio.fail_after(120):
        async with QemuGuest(guest_image) as g:
            loaded = {
                ln.split()[0] for ln in (await g.run("cat /proc/modules")).output.splitlines()
            }
    assert modules <= loaded, sorted(modules - loaded)
