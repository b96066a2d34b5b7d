"""Guest-side checks of a vhost-user-blk backend, reusable against any backend.

A *backend starter* is ``async def start(socket_path, image_path, num_queues) ->
trio.Process``: it starts a vhost-user-blk backend serving the raw image at
``image_path`` on the unix socket ``socket_path`` and returns once the socket
accepts connections.  :func:`start_qemu_storage_daemon` is the reference one.

::

    async with vhost_user_blk_guest(image, start_qemu_storage_daemon, num_queues=2) as s:
        await run_all_checks(s.guest, s.disk)
        await s.restart_backend()          # kill -9 + start again on the same socket

Each check is an ``async def check_*(guest, disk)`` that raises AssertionError (or
:class:`~virtio.testing.qemu.GuestCommandError`) on failure; the shell they run is
built by the ``sh_*`` functions, usable in script mode too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from virtio.testing.guest_image import GuestImage
from virtio.testing.qemu import QemuGuest, QemuUnavailable, VhostUserBlk

__all__ = [
    "ALL_CHECKS",
    "BackendStarter",
    "BlkDisk",
    "BlkSession",
    "check_direct_io_pattern",
    "check_mkfs_mount",
    "check_parallel_io",
    "check_queues",
    "check_size",
    "host_digest",
    "run_all_checks",
    "run_fio",
    "sh_fio",
    "start_qemu_storage_daemon",
    "start_server",
    "stop_process",
    "stop_server",
    "vhost_user_blk_guest",
    "wait_for_socket",
]

BackendStarter = Callable[[Path, Path, int], Awaitable[trio.Process]]

SECTOR = 512


@dataclasses.dataclass
class BlkDisk:
    """The disk under test: guest device name, host image, size, queue count."""

    device: str  # "vda"
    image: Path
    size: int
    num_queues: int

    @property
    def dev(self) -> str:
        return f"/dev/{self.device}"


# --------------------------------------------------------------------------- backends


async def stop_process(proc: trio.Process, *, grace: float = 5.0) -> int:
    """SIGTERM ``proc`` (ours), SIGKILL after ``grace`` s; its exit status."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return await proc.wait()


def start_server(cmd: list[str], *, stderr: Any = None) -> subprocess.Popen:
    """Start a storage server the test does not own (qemu-nbd, nbdkit) from the
    calling thread -- the trio thread, alive for the whole test.

    Not ``trio.lowlevel.open_process``: that forks from a trio worker thread, and
    the worker thread exits after 10 idle seconds.  nbdkit (1.32.5 here, with or
    without ``--exit-with-parent``) sets ``PR_SET_PDEATHSIG(SIGTERM)`` at start-up,
    and the kernel sends that signal when the *thread* that forked the process
    exits: nbdkit then shut down ~10 s into a test, failing every request in flight
    with ESHUTDOWN (what looked like "nbdkit fails after the guest's first reads")."""
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=stderr)


async def stop_server(proc: subprocess.Popen, *, grace: float = 5.0) -> int:
    """SIGTERM a :func:`start_server` process, SIGKILL after ``grace`` s; its status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            await trio.to_thread.run_sync(proc.wait, grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return await trio.to_thread.run_sync(proc.wait)


async def wait_for_socket(
    path: Path, proc: trio.Process | None = None, timeout: float = 30.0
) -> None:
    """Wait until a unix socket at ``path`` accepts connections (and leave it).

    Note this connects once: use only for backends that survive a client that
    goes away before sending anything.
    """
    with trio.fail_after(timeout):
        while True:
            if proc is not None and proc.returncode is not None:
                raise RuntimeError(f"backend exited with {proc.returncode} before listening")
            if path.exists():
                try:
                    sock = await trio.open_unix_socket(os.fspath(path))
                except OSError:
                    pass
                else:
                    await sock.aclose()
                    return
            await trio.sleep(0.02)


async def start_qemu_storage_daemon(
    socket_path: Path,
    image_path: Path,
    num_queues: int = 1,
    *,
    writable: bool = True,
    binary: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> trio.Process:
    """The reference backend: ``qemu-storage-daemon`` exporting ``image_path`` (raw).

    Returns once its pidfile is written, i.e. after the export listens.
    """
    qsd = binary or shutil.which("qemu-storage-daemon")
    if qsd is None:
        raise QemuUnavailable("qemu-storage-daemon not found (Debian: qemu-system-common)")
    pidfile = Path(f"{socket_path}.pid")
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    with contextlib.suppress(FileNotFoundError):
        Path(socket_path).unlink()
    cmd = [
        qsd,
        "--blockdev", f"driver=file,node-name=file0,filename={image_path}",
        "--blockdev", "driver=raw,node-name=disk0,file=file0",
        "--export",
        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
        f"addr.path={socket_path},writable={'on' if writable else 'off'},"
        f"num-queues={num_queues}",
        "--pidfile", str(pidfile),
        *extra_args,
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL)
    try:
        with trio.fail_after(10):
            while not (pidfile.exists() and pidfile.read_text().strip()):
                if proc.returncode is not None or proc.poll() is not None:
                    raise RuntimeError(f"qemu-storage-daemon exited with {proc.returncode}")
                await trio.sleep(0.02)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stop_process(proc)
        raise
    return proc


# --------------------------------------------------------------------------- session


@dataclasses.dataclass
class BlkSession:
    """A booted guest with one vhost-user-blk disk served by a backend process."""

    guest: QemuGuest
    disk: BlkDisk
    socket: Path
    start_backend: BackendStarter
    backend: trio.Process

    async def stop_backend(self, *, kill: bool = True) -> int:
        """SIGKILL (``kill``) or SIGTERM the backend; its exit status."""
        if kill and self.backend.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.backend.kill()
        return await stop_process(self.backend)

    async def restart_backend(self, *, kill: bool = True) -> trio.Process:
        """Stop the backend and start a new one on the same socket and image."""
        await self.stop_backend(kill=kill)
        self.backend = await self.start_backend(self.socket, self.disk.image, self.disk.num_queues)
        return self.backend


@contextlib.asynccontextmanager
async def vhost_user_blk_guest(
    image: GuestImage,
    start_backend: BackendStarter,
    *,
    disk_size: int = 64 << 20,
    num_queues: int = 2,
    reconnect: int | None = None,
    device_props: Mapping[str, object] | None = None,
    guest_kwargs: Mapping[str, Any] | None = None,
) -> AsyncIterator[BlkSession]:
    """Make a sparse raw image, start the backend on it, boot a guest on it.

    Everything lives in a fresh temporary directory, removed afterwards; the
    guest is stopped before the backend.
    """
    workdir = Path(tempfile.mkdtemp(prefix="pyvirtio-blk-"))
    try:
        img = workdir / "disk.img"
        with open(img, "wb") as f:
            f.truncate(disk_size)
        sock = workdir / "blk.sock"
        backend = await start_backend(sock, img, num_queues)
        try:
            dev = VhostUserBlk(
                sock, num_queues=num_queues, reconnect=reconnect, props=dict(device_props or {})
            )
            kwargs = dict(guest_kwargs or {})
            kwargs["devices"] = [dev, *kwargs.get("devices", ())]
            async with QemuGuest(image, **kwargs) as guest:
                session = BlkSession(
                    guest=guest,
                    disk=BlkDisk("vda", img, disk_size, num_queues),
                    socket=sock,
                    start_backend=start_backend,
                    backend=backend,
                )
                try:
                    yield session
                finally:
                    backend = session.backend
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(backend)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- shell snippets


def sh_size_sectors(disk: BlkDisk) -> str:
    return f"cat /sys/block/{disk.device}/size"


def sh_queue_count(disk: BlkDisk) -> str:
    return f"ls /sys/block/{disk.device}/mq | wc -l"


def sh_write_pattern(
    disk: BlkDisk, *, seek_blocks: int, count: int, bs: int = 4096, name: str = "pat"
) -> str:
    """Write ``count`` random ``bs`` blocks at ``seek_blocks`` with O_DIRECT; print md5."""
    return (
        f"dd if=/dev/urandom of=/tmp/{name} bs={bs} count={count} 2>/dev/null && "
        f"dd if=/tmp/{name} of={disk.dev} bs={bs} seek={seek_blocks} count={count} "
        f"oflag=direct conv=notrunc,fsync 2>/dev/null && "
        f"md5sum < /tmp/{name} | cut -d' ' -f1"
    )


def sh_read_digest(disk: BlkDisk, *, skip_blocks: int, count: int, bs: int = 4096) -> str:
    """md5 of ``count`` ``bs`` blocks at ``skip_blocks`` read with O_DIRECT."""
    return (
        f"dd if={disk.dev} bs={bs} skip={skip_blocks} count={count} iflag=direct 2>/dev/null"
        " | md5sum | cut -d' ' -f1"
    )


def sh_mkfs_mount_write(disk: BlkDisk, *, mnt: str = "/mnt/t") -> str:
    # A subshell, so the trace (set -x) does not leak into the guest's persistent shell.
    return f"""(
set -x
mkfs.ext4 -q -F {disk.dev} &&
mkdir -p {mnt} &&
mount -t ext4 {disk.dev} {mnt} &&
echo "hello from pyvirtio" > {mnt}/hello.txt &&
dd if=/dev/urandom of={mnt}/blob bs=64k count=16 2>/dev/null &&
md5sum {mnt}/blob > /tmp/blob.md5 &&
sync &&
umount {mnt} &&
mount -t ext4 -o ro {disk.dev} {mnt} &&
cat {mnt}/hello.txt &&
md5sum -c /tmp/blob.md5 &&
umount {mnt} &&
e2fsck -fn {disk.dev}
)
"""


def sh_fio(
    disk: BlkDisk,
    *,
    rw: str = "randread",
    bs: str = "4k",
    iodepth: int = 16,
    numjobs: int = 1,
    runtime: float = 3,
    ioengine: str = "libaio",
    extra: str = "",
) -> str:
    """A time-based O_DIRECT fio run on the disk, JSON on stdout (needs ``fio=True`` guests)."""
    return (
        f"fio --name=pyvirtio --filename={disk.dev} --rw={rw} --bs={bs} --direct=1 "
        f"--ioengine={ioengine} --iodepth={iodepth} --numjobs={numjobs} --group_reporting "
        f"--time_based --runtime={runtime} --output-format=json {extra}".strip()
    )


def host_digest(image: Path, offset: int, length: int) -> str:
    """md5 of ``length`` bytes of the host image at ``offset``."""
    with open(image, "rb") as f:
        f.seek(offset)
        return hashlib.md5(f.read(length)).hexdigest()


# --------------------------------------------------------------------------- checks


async def check_size(guest: QemuGuest, disk: BlkDisk) -> None:
    """The guest sees the disk with the image's size."""
    out = (await guest.run(sh_size_sectors(disk))).output.strip()
    assert int(out) == disk.size // SECTOR, f"/sys/block/{disk.device}/size = {out}"


async def check_queues(guest: QemuGuest, disk: BlkDisk) -> None:
    """blk-mq has one hardware queue per virtqueue."""
    out = (await guest.run(sh_queue_count(disk))).output.strip()
    assert int(out) == disk.num_queues, f"{out} hw queues, expected {disk.num_queues}"


async def check_direct_io_pattern(
    guest: QemuGuest, disk: BlkDisk, *, seek_blocks: int = 100, count: int = 256
) -> None:
    """O_DIRECT write of a random pattern reads back identical, in the guest and on the host."""
    wrote = (await guest.run(sh_write_pattern(disk, seek_blocks=seek_blocks, count=count))).output
    read = (await guest.run(sh_read_digest(disk, skip_blocks=seek_blocks, count=count))).output
    assert wrote.strip() == read.strip(), f"guest read-back differs: {wrote!r} != {read!r}"
    on_host = host_digest(disk.image, seek_blocks * 4096, count * 4096)
    assert on_host == wrote.strip(), f"host image differs: {on_host} != {wrote.strip()}"


async def check_parallel_io(guest: QemuGuest, disk: BlkDisk, *, count: int = 128) -> None:
    """Writers pinned to each CPU (so both queues are used) on disjoint ranges."""
    ncpu = int((await guest.run("nproc")).output.strip())
    parts = []
    for cpu in range(ncpu):
        seek = 4096 + cpu * count
        snippet = sh_write_pattern(disk, seek_blocks=seek, count=count, name=f"par{cpu}")
        parts.append(f"cat > /tmp/par{cpu}.sh <<'EOF'\n{snippet}\nEOF")
        parts.append(f"taskset -c {cpu} sh /tmp/par{cpu}.sh > /tmp/par{cpu}.md5 &")
    await guest.run("\n".join(parts) + "\nwait")
    for cpu in range(ncpu):
        seek = 4096 + cpu * count
        wrote = (await guest.run(f"cat /tmp/par{cpu}.md5")).output.strip()
        read = (await guest.run(sh_read_digest(disk, skip_blocks=seek, count=count))).output
        assert wrote and wrote == read.strip(), f"cpu {cpu}: {wrote!r} != {read!r}"
        assert host_digest(disk.image, seek * 4096, count * 4096) == wrote


async def check_mkfs_mount(guest: QemuGuest, disk: BlkDisk) -> None:
    """mkfs.ext4, mount, write, sync, remount read-only, read back, fsck clean."""
    out = (await guest.run(sh_mkfs_mount_write(disk), timeout=120)).output
    assert "hello from pyvirtio" in out, out
    assert "blob: OK" in out, out


async def run_fio(guest: QemuGuest, disk: BlkDisk, **kwargs: Any) -> dict[str, Any]:
    """Run :func:`sh_fio` in the guest; fio's JSON report (``jobs[0]["read"]["iops"]``...)."""
    runtime = float(kwargs.get("runtime", 3))
    out = (await guest.run(sh_fio(disk, **kwargs), timeout=runtime * 3 + 60)).output
    return json.loads(out[out.index("{") :])


ALL_CHECKS: tuple[Callable[[QemuGuest, BlkDisk], Awaitable[None]], ...] = (
    check_size,
    check_queues,
    check_direct_io_pattern,
    check_parallel_io,
    check_mkfs_mount,  # last: it overwrites the disk
)


async def run_all_checks(guest: QemuGuest, disk: BlkDisk) -> dict[str, float]:
    """Run :data:`ALL_CHECKS` in order; seconds each took."""
    timings: dict[str, float] = {}
    for check in ALL_CHECKS:
        t0 = time.monotonic()
        await check(guest, disk)
        timings[check.__name__] = round(time.monotonic() - t0, 2)
    return timings
