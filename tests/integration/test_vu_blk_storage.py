"""Real storage behind our vhost-user-blk back-end, judged by a Linux guest (issue 8 §5).

Three TCG guests boot with vhost-user-blk disks, each served by its own
``virtio serve blk`` process:

* every cache mode (none, writeback, writethrough, unsafe) on both I/O engines
  (io_uring, threads): fio writes random blocks and verifies them (crc32c) with
  O_DIRECT, many requests in flight; with io_uring, two of the four back-ends
  serve both queues from one thread (``--queue-threads 1``);
* a disk whose image lives on a 16 MiB tmpfs: writes past what fits fail with
  ENOSPC, which reaches the guest as an I/O error (VIRTIO_BLK_S_IOERR), and the
  back-end keeps serving reads and writes of allocated blocks (the kernel has no
  device-mapper here, so no dm-error target: a file system that fills up);
* a disk under fault injection (``virtio.testing.faults``, through the data
  plane's hook that reaches io_uring operations): EIO on a read, a write and a
  flush reaches the guest; after the failed flush every later flush fails (the
  sticky writeback error);
* a loop device with 4096-byte logical sectors served with ``--cache none``: the
  guest sees 4096-byte logical and physical blocks (BLK_SIZE / TOPOLOGY, §5.2.4)
  and fio verifies;
* flush durability: a write acknowledged after a FLUSH (``dd conv=fsync``) is in
  the image after the back-end is SIGKILLed and the host's caches dropped, and the
  FLUSH reached ``fdatasync`` (not with ``--cache unsafe``, which ignores it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from virtio.testing.blk_checks import stop_process, wait_for_socket
from virtio.testing.faults import FaultInjector
from virtio.testing.guest_image import GuestImage
from virtio.testing.qemu import QemuGuest, VhostUserBlk

pytestmark = pytest.mark.qemu

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
SIZE = 48 * MiB


class Backend:
    """One ``virtio serve blk`` process, its log and its disk name in the guest."""

    def __init__(self, work: Path, name: str, image: Path, args: list[str], env=None):
        self.sock = work / f"{name}.sock"
        self.log = work / f"{name}.log"
        self.image = image
        self.args = args
        self.env = env
        self.proc: trio.Process | None = None
        self.dev = ""

    async def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "virtio", "-v", "serve", "blk",
                 "--socket-path", os.fspath(self.sock), "--blk-file", os.fspath(self.image),
                 "--num-queues", "2",
                 *self.args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                cwd=REPO, env=self.env,
            )  # fmt: skip
        await wait_for_socket(self.sock, self.proc, timeout=30)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def stats(self) -> dict[str, str]:
        """SIGUSR1; the statistics line it prints (``line``: all of it)."""
        before = self.text().count("statistics:")
        self.proc.send_signal(signal.SIGUSR1)
        with trio.fail_after(10):
            while self.text().count("statistics:") <= before:
                await trio.sleep(0.05)
        line = [ln for ln in self.text().splitlines() if "statistics:" in ln][before]
        stats = dict(
            kv.split("=", 1) for kv in line.split("statistics:", 1)[1].split() if "=" in kv
        )
        return stats | {"line": line}


def fio_verify(dev: str, *, bs: str = "4k", size: str = "8M", rw: str = "randwrite") -> str:
    return (
        f"fio --name=v --filename={dev} --rw={rw} --bs={bs} --size={size} --direct=1 "
        "--ioengine=libaio --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 "
        "--output-format=json"
    )


def fio_ok(output: str) -> dict:
    job = json.loads(output[output.index("{") :])["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["total_ios"] > 0 and job["read"]["total_ios"] > 0, job  # read = verify
    return job


def sh_write(dev: str, *, seek_mib: int, mib: int, sync: bool = True) -> str:
    """Random data written with O_DIRECT (and fsync: a FLUSH); prints its md5."""
    conv = "notrunc,fsync" if sync else "notrunc"
    return (
        f"dd if=/dev/urandom of=/tmp/w bs=1M count={mib} 2>/dev/null && "
        f"dd if=/tmp/w of={dev} bs=64k seek={seek_mib * 16} oflag=direct conv={conv} "
        f"2>&1 && md5sum < /tmp/w | cut -d' ' -f1"
    )


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def host_md5(path: Path, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.md5(f.read(length)).hexdigest()


@contextlib.contextmanager
def small_tmpfs(size_mib: int):
    with tempfile.TemporaryDirectory(prefix="pyvirtio-enospc-") as mnt:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", mnt], check=True
        )
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", "-l", mnt], check=False)


@contextlib.contextmanager
def loop_device(backing: Path, sector_size: int):
    dev = subprocess.run(
        ["losetup", "-f", "--show", "--sector-size", str(sector_size), os.fspath(backing)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _can_mount() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(
    not _can_mount(), reason="needs root (tmpfs mount, losetup, drop_caches)"
)


@contextlib.asynccontextmanager
async def guest_with(guest_image: GuestImage, backends: list[Backend]):
    """Start the back-ends, boot one guest with their disks (vda, vdb, ...) in order.

    At most four disks per guest: with six or more vhost-user-blk disks served by
    the native data plane, the guest's memory gets corrupted during boot (fio
    segfaults in ld.so; not with the Python path, not with qemu-storage-daemon) --
    a bug of the data plane on main as well, reported, not fixed here."""
    assert len(backends) <= 4
    try:
        for b in backends:
            await b.start()
        for i, b in enumerate(backends):
            b.dev = f"/dev/vd{chr(ord('a') + i)}"
        devices = [VhostUserBlk(b.sock, num_queues=2) for b in backends]
        with trio.fail_after(420):
            async with QemuGuest(guest_image, devices=devices, fio=True) as g:
                yield g
    finally:
        with trio.CancelScope(shield=True):
            for b in backends:
                if b.proc is not None and b.proc.returncode is None:
                    await stop_process(b.proc)


@needs_root
@pytest.mark.parametrize("aio", ["io_uring", "threads"])
async def test_cache_modes_verify_and_flush_durability(guest_image: GuestImage, tmp_path, aio):
    modes = ("none", "writeback", "writethrough", "unsafe")
    # io_uring: "none" and "writethrough" serve both queues from one thread
    shared = ("none", "writethrough") if aio == "io_uring" else ()
    backends = [
        Backend(
            tmp_path,
            c,
            sparse(tmp_path / f"{c}.img", SIZE),
            ["--cache", c, "--aio", aio, *(["--queue-threads", "1"] if c in shared else [])],
        )
        for c in modes
    ]
    async with guest_with(guest_image, backends) as g:
        for b in backends:
            fio_ok((await g.run(fio_verify(b.dev), timeout=180)).output)
            line = (await b.stats())["line"]
            engine = 2 if aio == "io_uring" else 1
            assert line.count("engine_used=") == line.count(f"engine_used={engine}") == 2, line
            thread = "0" if b.image.stem in shared else "-1"
            assert line.count(f"queue_thread={thread} ") == 2, line
        # 64 KiB sequential with verification, O_DIRECT on the host
        fio_ok((await g.run(fio_verify(backends[0].dev, bs="64k", rw="write"))).output)
        # A write acknowledged after FLUSH survives SIGKILL + drop_caches, and the
        # FLUSH reached fdatasync (unless --cache unsafe, which ignores flushes).
        for cache, b in zip(modes, backends, strict=True):
            before = int((await b.stats())["fdatasync"])
            md5 = (await g.run(sh_write(b.dev, seek_mib=20, mib=2))).output.split()[-1]
            after = int((await b.stats())["fdatasync"])
            assert (after == before) if cache == "unsafe" else (after > before), (cache, before)
            b.proc.kill()
            await b.proc.wait()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            assert host_md5(b.image, 20 * MiB, 2 * MiB) == md5, cache


@needs_root
async def test_enospc_eio_and_4k_sectors(guest_image: GuestImage, tmp_path):
    faults = FaultInjector(tmp_path / "faults")
    with small_tmpfs(16) as full, contextlib.ExitStack() as stack:
        small = sparse(full / "disk.img", SIZE)  # 48 MiB of disk on 16 MiB of file system
        enospc = Backend(tmp_path, "enospc", small, ["--format", "raw"])
        eio = Backend(tmp_path, "eio", sparse(tmp_path / "eio.img", SIZE), [], env=faults.env())
        loop = stack.enter_context(loop_device(sparse(tmp_path / "4k.img", SIZE), 4096))
        four_k = Backend(tmp_path, "4k", loop, ["--cache", "none", "--format", "raw"])
        async with guest_with(guest_image, [enospc, eio, four_k]) as g:
            await _enospc(g, enospc)
            await _eio(g, eio, faults)
            await _four_k(g, four_k)


async def _enospc(g: QemuGuest, enospc: Backend) -> None:
    """ENOSPC reaches the guest as an I/O error; the back-end keeps serving."""
    r = await g.run(
        f"dd if=/dev/urandom of={enospc.dev} bs=1M count=40 oflag=direct 2>&1", check=False
    )
    assert r.rc != 0 and "Input/output error" in r.output, r.output
    assert "No space left on device" in enospc.text(), enospc.text()[-2000:]
    md5 = (await g.run(sh_write(enospc.dev, seek_mib=0, mib=1))).output.split()[-1]
    r = await g.run(f"dd if={enospc.dev} bs=1M count=1 iflag=direct 2>/dev/null | md5sum")
    assert r.output.split()[0] == md5
    assert host_md5(enospc.image, 0, MiB) == md5


async def _eio(g: QemuGuest, eio: Backend, faults: FaultInjector) -> None:
    """EIO on a read, a write and a flush (fault injection reaches io_uring)."""
    await g.run(sh_write(eio.dev, seek_mib=1, mib=1))
    read = f"dd if={eio.dev} of=/dev/null bs=4k skip=256 count=1 iflag=direct 2>&1"
    faults.arm("preadv", errno.EIO)
    r = await g.run(read, check=False)
    assert r.rc != 0 and "Input/output error" in r.output, r.output
    await g.run(read)  # still serving
    faults.arm("pwritev", errno.EIO)
    r = await g.run(
        f"dd if=/dev/zero of={eio.dev} bs=4k seek=300 count=1 oflag=direct 2>&1", check=False
    )
    assert r.rc != 0 and "Input/output error" in r.output, r.output
    faults.arm("fdatasync", errno.EIO)
    r = await g.run(sh_write(eio.dev, seek_mib=2, mib=1), check=False)
    assert r.rc != 0, r.output  # the fsync (FLUSH) failed
    assert not faults.armed("fdatasync")
    r = await g.run(sh_write(eio.dev, seek_mib=3, mib=1), check=False)
    assert r.rc != 0, r.output  # sticky: a later flush fails too
    assert eio.text().count("a flush of the image failed (EIO)") == 1


async def _four_k(g: QemuGuest, four_k: Backend) -> None:
    """4096-byte logical sectors: reported in BLK_SIZE / TOPOLOGY, fio verifies."""
    name = four_k.dev[5:]
    r = await g.run(
        f"cat /sys/block/{name}/queue/logical_block_size"
        f" /sys/block/{name}/queue/physical_block_size"
    )
    assert r.output.split() == ["4096", "4096"], r.output
    fio_ok((await g.run(fio_verify(four_k.dev), timeout=180)).output)
