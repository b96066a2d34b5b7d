"""Our ``virtio serve blk`` process as the vhost-user-blk back-end of a real QEMU guest.

The guest's own virtio_blk driver is the judge: identity (capacity, block size,
serial, queue count, read-only flag), data integrity with O_DIRECT over the whole
disk, a file system, durability (fsync reaches the image and the back-end called
fdatasync), discard and write-zeroes reaching the image, a read-only export, both
queues in use, and a SIGKILL of the back-end with I/O in flight followed by a
restart on the same socket (QEMU reconnects; the inflight area lets nothing get lost),
and a resize announced with CONFIG_CHANGE_MSG.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from virtio.testing.backend_stats import Statistics, counter, parse_statistics
from virtio.testing.blk_checks import (
    BackendStarter,
    BlkSession,
    check_direct_io_pattern,
    check_mkfs_mount,
    check_parallel_io,
    host_digest,
    vhost_user_blk_guest,
    wait_for_socket,
)
from virtio.testing.guest_image import GuestImage

pytestmark = pytest.mark.qemu

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]

ZEROOUT_C = r"""
/* zo punch|zero DEV OFFSET LEN: fallocate(2) on a block device; exit status = errno. */
static long sys4(long n, long a, long b, long c, long d) {
    long ret;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return ret;
}
static long num(const char *s) {
    long v = 0;
    while (*s >= '0' && *s <= '9') v = v * 10 + (*s++ - '0');
    return v;
}
__attribute__((used)) void start_c(long *sp) {
    long argc = sp[0]; char **argv = (char **)(sp + 1);
    long rc = 2;
    if (argc == 5) {
        long fd = sys4(2, (long)argv[2], 2 /* O_RDWR */, 0, 0);
        if (fd < 0) rc = -fd;
        else {
            long mode = 1; /* KEEP_SIZE, | PUNCH_HOLE or ZERO_RANGE */
            mode |= argv[1][0] == 'p' ? 2 : 0x10;
            long r = sys4(285 /* fallocate */, fd, mode, num(argv[3]), num(argv[4]));
            rc = r < 0 ? -r : 0;
        }
    }
    sys4(60, rc, 0, 0, 0);
}
__asm__(".globl _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call start_c\n hlt\n");
"""
"""Guest helper (x86-64, no libc: 9 KB, quick to pass through fw_cfg): fallocate on
the block device.  PUNCH_HOLE on a block device is
``blkdev_issue_zeroout(NOFALLBACK)``: it succeeds only if a VIRTIO_BLK_T_WRITE_ZEROES
request (unmap allowed) completed, so its success proves write-zeroes reached us."""


_LOGS: dict[str, Path] = {}
"""Socket path -> the back-end's stderr log."""


def our_backend(*extra: str, prepare=None, log_dir: Path | None = None) -> BackendStarter:
    """A starter for ``python -m virtio -v serve blk`` (stderr to ``<socket>.log``, or
    to ``log_dir``, which outlives the session's temporary directory)."""

    async def start(socket_path: Path, image_path: Path, num_queues: int) -> trio.Process:
        if prepare is not None:
            prepare(image_path)
        path = Path(f"{socket_path}.log") if log_dir is None else log_dir / "backend.log"
        _LOGS[os.fspath(socket_path)] = path
        log = open(path, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "virtio",
                    "-v",
                    "serve",
                    "blk",
                    "--socket-path",
                    os.fspath(socket_path),
                    "--blk-file",
                    os.fspath(image_path),
                    "--num-queues",
                    str(num_queues),
                    *extra,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=REPO,
            )
        finally:
            log.close()
        await wait_for_socket(Path(socket_path), proc)
        return proc

    return start


async def query_totals(control: Path) -> dict:
    """The export's ``totals`` from ``query-stats`` on the back-end's control socket."""
    from virtio.control.client import ControlClient

    async with await ControlClient.connect(control) as client:
        (export,) = (await client.execute("query-stats"))["exports"]
    return export["totals"]


def backend_log(s: BlkSession) -> str:
    return _LOGS[os.fspath(s.socket)].read_text(errors="replace")


async def backend_stats(s: BlkSession) -> Statistics:
    """SIGUSR1 the back-end; parse the statistics line it prints on stderr."""
    before = backend_log(s).count("statistics:")
    s.backend.send_signal(signal.SIGUSR1)
    with trio.fail_after(10):
        while backend_log(s).count("statistics:") <= before:
            await trio.sleep(0.05)
    line = [ln for ln in backend_log(s).splitlines() if "statistics:" in ln][before]
    return parse_statistics(line)


def vring_requests(stats: Statistics) -> list[int]:
    """Chains served per vring (``vring_requests=N,M``; empty before any)."""
    text = stats["vring_requests"]
    assert isinstance(text, str)
    return [int(n) for n in text.split(",") if n]


async def wait_for_stats(
    s: BlkSession, what: str, ready: Callable[[Statistics], bool], *, timeout: float = 30.0
) -> Statistics:
    """Poll the back-end's statistics until ``ready(stats)``; fail after ``timeout`` s."""
    stats: Statistics = {}
    with trio.move_on_after(timeout):
        while not ready(stats := await backend_stats(s)):
            await trio.sleep(0.05)
        return stats
    raise AssertionError(f"back-end never reported {what} in {timeout} s: {stats}")


@contextlib.contextmanager
def zeroout_helper() -> Iterator[Path | None]:
    """Compile the static guest helper (None if no C compiler can)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    with tempfile.TemporaryDirectory(prefix="pyvirtio-zo-") as tmp:
        src, exe = Path(tmp) / "zo.c", Path(tmp) / "zo"
        src.write_text(ZEROOUT_C)
        ok = cc is not None and (
            subprocess.run(
                [cc, "-static", "-nostdlib", "-O2", "-s", "-o", exe, src], capture_output=True
            ).returncode
            == 0
        )
        yield exe if ok else None


def image_blocks(path: Path) -> int:
    return os.stat(path).st_blocks


async def test_guest_driver_on_our_backend(guest_image: GuestImage) -> None:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    size = 32 * MiB
    with zeroout_helper() as zo, tempfile.TemporaryDirectory(prefix="pyvirtio-log-") as logs:
        extra = [] if zo is None else ["-fw_cfg", f"name=opt/pyvirtio/zo,file={zo}"]
        with trio.fail_after(170):
            control = Path(logs) / "control.sock"
            async with vhost_user_blk_guest(
                guest_image,
                our_backend(
                    "--serial", "pyvirtio-disk0", "--control", str(control), log_dir=Path(logs)
                ),
                disk_size=size,
                num_queues=2,
                guest_kwargs={"extra_args": extra},
            ) as s:
                g, disk = s.guest, s.disk
                timings["boot"] = round(time.monotonic() - t0, 2)
                # -- identity as the guest driver sees it
                r = await g.run(
                    "cat /sys/block/vda/size; cat /sys/block/vda/serial; echo;"
                    " cat /sys/block/vda/ro /sys/block/vda/queue/logical_block_size;"
                    " ls /sys/block/vda/mq | wc -l"
                )
                assert r.output.split() == [str(size // 512), "pyvirtio-disk0", "0", "512", "2"]

                # -- the whole disk: random pattern, O_DIRECT, read back, host image
                t = time.monotonic()
                stats_before = await query_totals(control)
                wrote = (
                    await g.run(
                        f"dd if=/dev/urandom of=/tmp/whole bs=1M count={size // MiB} 2>/dev/null"
                        " && dd if=/tmp/whole of=/dev/vda bs=1M oflag=direct 2>/dev/null"
                        " && md5sum < /tmp/whole && rm /tmp/whole",
                        timeout=120,
                    )
                ).output.split()[0]
                read = (
                    await g.run("dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | md5sum")
                ).output.split()[0]
                assert wrote == read
                assert host_digest(disk.image, 0, size) == wrote
                # ... and the control socket's statistics counted the guest's I/O
                stats = await query_totals(control)
                assert stats["bytes"]["out"] - stats_before["bytes"]["out"] >= size
                assert stats["bytes"]["in"] - stats_before["bytes"]["in"] >= size
                assert stats["requests"]["out"] - stats_before["requests"]["out"] >= size // MiB
                assert stats["status"]["ioerr"] == 0 and stats["in_flight"] == 0
                assert stats["dataplane"] > stats_before["dataplane"]
                assert 0 < stats["latency"]["count"] <= stats["completed"]  # sampled
                timings["whole_disk_pattern"] = round(time.monotonic() - t, 2)

                # -- discard reaches the image: hole punched, zeros read back
                t = time.monotonic()
                zeros_md5 = hashlib.md5(bytes(4 * MiB)).hexdigest()
                blocks = image_blocks(disk.image)
                await g.run(f"blkdiscard -o {8 * MiB} -l {4 * MiB} /dev/vda")
                assert host_digest(disk.image, 8 * MiB, 4 * MiB) == zeros_md5
                assert image_blocks(disk.image) <= blocks - (4 * MiB // 512)
                r = await g.run(
                    "dd if=/dev/vda bs=1M skip=8 count=4 iflag=direct 2>/dev/null | md5sum"
                )
                assert r.output.split()[0] == zeros_md5
                timings["discard"] = round(time.monotonic() - t, 2)

                # -- write-zeroes reaches the image (needs the compiled helper)
                if zo is not None:
                    t = time.monotonic()
                    await g.run(
                        "cat /sys/firmware/qemu_fw_cfg/by_name/opt/pyvirtio/zo/raw > /tmp/zo"
                        " && chmod +x /tmp/zo"
                    )
                    blocks = image_blocks(disk.image)
                    # PUNCH_HOLE on a block device: write-zeroes with unmap, no fallback
                    await g.run(f"/tmp/zo punch /dev/vda {16 * MiB} {4 * MiB}")
                    assert host_digest(disk.image, 16 * MiB, 4 * MiB) == zeros_md5
                    assert image_blocks(disk.image) <= blocks - (4 * MiB // 512)
                    # ZERO_RANGE: write-zeroes without unmap (blocks stay allocated)
                    await g.run(f"/tmp/zo zero /dev/vda {20 * MiB} {4 * MiB}")
                    assert host_digest(disk.image, 20 * MiB, 4 * MiB) == zeros_md5
                    r = await g.run(
                        "dd if=/dev/vda bs=1M skip=16 count=8 iflag=direct 2>/dev/null | md5sum"
                    )
                    assert r.output.split()[0] == hashlib.md5(bytes(8 * MiB)).hexdigest()
                    timings["write_zeroes"] = round(time.monotonic() - t, 2)

                # -- the shared guest checks (pattern, both queues at once, ext4)
                t = time.monotonic()
                before = await backend_stats(s)
                await check_direct_io_pattern(g, disk)
                await check_parallel_io(g, disk)
                after = await backend_stats(s)
                per_ring_before = vring_requests(before)
                per_ring_after = vring_requests(after)
                assert len(per_ring_after) == 2
                assert all(a > b for a, b in zip(per_ring_after, per_ring_before, strict=True)), (
                    before,
                    after,
                )
                timings["pattern_and_two_queues"] = round(time.monotonic() - t, 2)
                t = time.monotonic()
                await check_mkfs_mount(g, disk)
                timings["mkfs_mount"] = round(time.monotonic() - t, 2)

                # -- fsync reaches the image, and the back-end called fdatasync
                t = time.monotonic()
                syncs = counter(await backend_stats(s), "fdatasync")
                marker = f"pyvirtio-fsync-marker-{os.getpid()}-{time.time_ns()}"
                await g.run(
                    "mount -t ext4 /dev/vda /mnt/t && "
                    f"echo {marker} > /mnt/t/marker.txt && "
                    "dd if=/mnt/t/marker.txt of=/mnt/t/marker2.txt conv=fsync 2>/dev/null && "
                    "sync"
                )
                assert marker.encode() in disk.image.read_bytes()
                assert counter(await backend_stats(s), "fdatasync") > syncs
                await g.run("umount /mnt/t")
                timings["fsync"] = round(time.monotonic() - t, 2)

                # -- resize: grow the image, SIGHUP; CONFIG_CHANGE_MSG reaches the guest
                t = time.monotonic()
                os.truncate(disk.image, size + 16 * MiB)
                s.backend.send_signal(signal.SIGHUP)
                r = await g.run(
                    "set +x; for i in $(seq 100); do"
                    f" [ $(cat /sys/block/vda/size) = {(size + 16 * MiB) // 512} ] && break;"
                    " sleep 0.1; done; cat /sys/block/vda/size"
                )
                last = r.output.strip().splitlines()[-1]
                assert last == str((size + 16 * MiB) // 512), backend_log(s)[-2000:]
                timings["resize"] = round(time.monotonic() - t, 2)
                assert "needs reset" not in backend_log(s)
                assert "rejected" not in backend_log(s)  # QEMU sent nothing we refused
                session = s
        # the guest is gone, then the harness sent SIGTERM: a clean exit
        assert session.backend.returncode == 0, backend_log(session)[-2000:]
        assert "SIGTERM: shutting down" in backend_log(session)
    timings["total"] = round(time.monotonic() - t0, 2)
    print("timings:", timings)


async def test_read_only_export_refuses_writes(guest_image: GuestImage) -> None:
    size = 16 * MiB
    content = os.urandom(MiB)

    def prepare(image: Path) -> None:
        with open(image, "r+b") as f:
            f.write(content)

    with trio.fail_after(90):
        async with vhost_user_blk_guest(
            guest_image,
            our_backend("--read-only", prepare=prepare),
            disk_size=size,
            num_queues=1,
        ) as s:
            g = s.guest
            r = await g.run("cat /sys/block/vda/ro")
            assert r.output.strip() == "1"
            # the block layer refuses to open it for writing
            r = await g.run("echo x | dd of=/dev/vda bs=512 count=1 2>&1", check=False)
            assert r.rc != 0, r.output
            # even with the block device forced writable, a write fails (Linux 6.1 checks
            # the disk's read-only flag, VIRTIO_BLK_F_RO, at submission: EPERM)
            r = await g.run(
                "blockdev --setrw /dev/vda; "
                "dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>&1",
                check=False,
            )
            assert r.rc != 0, r.output
            assert "Operation not permitted" in r.output or "I/O error" in r.output, r.output
            r = await g.run("dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum")
            assert r.output.split()[0] == hashlib.md5(content).hexdigest()
            assert s.disk.image.read_bytes()[:MiB] == content


@pytest.mark.parametrize("dataplane", [False, True], ids=["python-loop", "native-dataplane"])
async def test_backend_killed_with_io_in_flight_and_restarted(
    guest_image: GuestImage, dataplane: bool
) -> None:
    """Four O_DIRECT writers (two per CPU, so both queues) loop over their own 2 MiB
    regions; the back-end is SIGKILLed mid-stream and restarted on the same socket.
    QEMU reconnects and hands the new process the inflight area; every writer
    finishes and every region holds its pattern, in the guest and in the image.
    ``--debug-request-delay`` (50 ms before each request runs) keeps requests in
    flight, and the kill waits for a moment the back-end reports some (SIGUSR1
    statistics), so the new process must resubmit some.

    ``native-dataplane``: the same without the delay, so the native data plane
    (``virtio/devices/blk/dataplane.py``) serves the writes and marks the inflight
    area itself; requests are rarely in flight at the kill, so only data integrity
    is asserted."""
    writers = 4
    with trio.fail_after(120):
        async with vhost_user_blk_guest(
            guest_image,
            our_backend() if dataplane else our_backend("--debug-request-delay", "0.05"),
            disk_size=16 * MiB,
            num_queues=2,
            reconnect=1,
        ) as s:
            g = s.guest
            digests = []
            for w in range(writers):
                out = await g.run(
                    f"dd if=/dev/urandom of=/tmp/big{w} bs=1M count=2 2>/dev/null;"
                    f" md5sum < /tmp/big{w}"
                )
                digests.append(out.output.split()[0])
            jobs = []
            for w in range(writers):
                jobs.append(
                    await g.spawn(
                        f"n=0; while [ ! -e /tmp/stop ] || [ $n -lt 2 ]; do "
                        f"taskset -c {w % 2} dd if=/tmp/big{w} of=/dev/vda bs=256k seek={8 * w}"
                        " oflag=direct conv=notrunc 2>/dev/null || exit 1; "
                        "n=$((n+1)); done; echo writes-done"
                    )
                )
            # writes flow on both queues before the kill
            await wait_for_stats(
                s, "writes on both queues", lambda st: all(n > 0 for n in vring_requests(st) or [0])
            )
            if not dataplane:  # kill with requests in flight
                await wait_for_stats(
                    s, "requests in flight", lambda st: counter(st, "in_flight") > 0
                )
            assert await jobs[0].poll() is None
            old_pid = s.backend.pid
            await s.restart_backend(kill=True)  # SIGKILL (with requests in flight)
            assert s.backend.pid != old_pid
            # QEMU reconnected and the writers' I/O goes on against the new process
            await wait_for_stats(
                s, "writes after the restart", lambda st: sum(vring_requests(st)) > 0
            )
            await g.run("touch /tmp/stop")
            for job in jobs:
                result = await job.wait(timeout=60)
                assert "writes-done" in result.output
            for w, digest in enumerate(digests):
                read = await g.run(
                    f"dd if=/dev/vda bs=256k skip={8 * w} count=8 iflag=direct 2>/dev/null | md5sum"
                )
                assert read.output.split()[0] == digest, w
                assert host_digest(s.disk.image, w * 2 * MiB, 2 * MiB) == digest, w
            stats = await backend_stats(s)
            log = backend_log(s)
            resubmits = re.findall(r"resubmitting (\d+) in-flight", log)
            print("after restart:", stats, "resubmissions:", resubmits)
            assert "inflight area set" in log  # QEMU handed the area back
            if not dataplane:  # in flight at the kill: redone
                assert counter(stats, "resubmitted") > 0, log[-4000:]
            assert "needs reset" not in log
            assert "rejected" not in log


async def test_packed_rings(guest_image: GuestImage) -> None:
    """``packed=on``: the guest driver uses packed virtqueues (virtio 1.4 §2.8)."""
    with trio.fail_after(90):
        async with vhost_user_blk_guest(
            guest_image,
            our_backend(),
            disk_size=32 * MiB,  # check_parallel_io writes past 16 MiB
            num_queues=2,
            device_props={"packed": True},
        ) as s:
            features = (await s.guest.run("cat /sys/bus/virtio/devices/*/features")).output
            assert features.strip()[34] == "1", features  # VIRTIO_F_RING_PACKED negotiated
            await check_direct_io_pattern(s.guest, s.disk)
            await check_parallel_io(s.guest, s.disk)
            assert "rejected" not in backend_log(s)
