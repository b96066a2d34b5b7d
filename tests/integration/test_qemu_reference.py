"""The QEMU harness and the vhost-user-blk guest checks, proven on the reference
backend (qemu-storage-daemon), so the same checks can judge our own backend."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import trio

from virtio.testing.blk_checks import (
    BackendStarter,
    BlkDisk,
    host_digest,
    run_all_checks,
    run_fio,
    sh_queue_count,
    sh_size_sectors,
    stop_process,
    vhost_user_blk_guest,
)
from virtio.testing.guest_image import GuestImage
from virtio.testing.qemu import (
    Disk,
    GuestCommandError,
    GuestError,
    GuestExited,
    GuestTimeout,
    QemuGuest,
    VhostUserBlk,
    run_guest_script,
)

pytestmark = pytest.mark.qemu

MiB = 1 << 20


async def test_reference_backend_passes_guest_checks(
    guest_image: GuestImage, reference_blk_backend: BackendStarter
) -> None:
    with trio.fail_after(150):
        async with vhost_user_blk_guest(
            guest_image, reference_blk_backend, disk_size=64 * MiB, num_queues=2
        ) as s:
            timings = await run_all_checks(s.guest, s.disk)
    assert set(timings) >= {"check_size", "check_queues", "check_mkfs_mount"}


async def test_fio_runs_in_the_guest(
    guest_image: GuestImage, reference_blk_backend: BackendStarter
) -> None:
    with trio.fail_after(150):
        async with vhost_user_blk_guest(
            guest_image, reference_blk_backend, num_queues=2, guest_kwargs={"fio": True}
        ) as s:
            report = await run_fio(s.guest, s.disk, rw="randrw", runtime=1, numjobs=2)
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] > 0
    assert job["write"]["io_bytes"] > 0


async def test_script_mode_with_vhost_user_blk(
    guest_image: GuestImage, reference_blk_backend: BackendStarter
) -> None:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-t-") as tmp:
        img = Path(tmp) / "disk.img"
        with open(img, "wb") as f:
            f.truncate(32 * MiB)
        sock = Path(tmp) / "blk.sock"
        backend = await reference_blk_backend(sock, img, 1)
        try:
            disk = BlkDisk("vda", img, 32 * MiB, 1)
            script = (
                f"{sh_size_sectors(disk)}\n{sh_queue_count(disk)}\n"
                "printf pyvirtio-was-here | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null\n"
                "echo marker-like text: @@PYVIRTIO-EXIT 0@@\n"
                "exit 5\n"
            )
            with trio.fail_after(120):
                result = await run_guest_script(
                    guest_image, script, devices=[VhostUserBlk(sock, num_queues=1)]
                )
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(backend)
        assert result.rc == 5, result.output
        lines = result.output.splitlines()
        assert lines[:2] == [str(32 * MiB // 512), "1"], result.output
        assert "@@PYVIRTIO-EXIT 0@@" in lines[2]
        with open(img, "rb") as f:
            f.seek(8 * 512)
            assert f.read(17) == b"pyvirtio-was-here"


async def test_backend_killed_and_restarted_with_io_in_flight(
    guest_image: GuestImage, reference_blk_backend: BackendStarter
) -> None:
    with trio.fail_after(150):
        async with vhost_user_blk_guest(
            guest_image, reference_blk_backend, disk_size=32 * MiB, num_queues=2, reconnect=1
        ) as s:
            g = s.guest
            digest = (
                await g.run(
                    "dd if=/dev/urandom of=/tmp/big bs=1M count=4 2>/dev/null; md5sum < /tmp/big"
                )
            ).output.split()[0]
            # writes the 4 MiB pattern over and over until told to stop (at least twice)
            job = await g.spawn(
                "n=0; while [ ! -e /tmp/stop ] || [ $n -lt 2 ]; do "
                "dd if=/tmp/big of=/dev/vda bs=4k oflag=direct conv=fsync 2>/dev/null || exit 1; "
                "n=$((n+1)); done; echo writes-done"
            )
            await trio.sleep(0.5)
            assert await job.poll() is None
            old_pid = s.backend.pid
            await s.restart_backend(kill=True)  # SIGKILL while requests are in flight
            assert s.backend.pid != old_pid
            await g.run("touch /tmp/stop")
            result = await job.wait(timeout=90)
            assert "writes-done" in result.output
            read = await g.run("dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | md5sum")
            assert read.output.split()[0] == digest
            assert host_digest(s.disk.image, 0, 4 * MiB) == digest


async def test_harness_commands_errors_plain_disks_and_qmp(guest_image: GuestImage) -> None:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-t-") as tmp:
        ide = Path(tmp) / "ide.img"
        vblk = Path(tmp) / "vblk.img"
        for path, size in ((ide, 8 * MiB), (vblk, 16 * MiB)):
            with open(path, "wb") as f:
                f.truncate(size)
        log = Path(tmp) / "console.log"
        with trio.fail_after(120):
            async with QemuGuest(
                guest_image,
                devices=[Disk(ide, interface="ide"), Disk(vblk, interface="virtio")],
                qmp=True,
                console_log=log,
            ) as g:
                assert g.boot_seconds is not None
                r = await g.run("echo out; echo err >&2; printf no-newline")
                assert (r.rc, r.output) == (0, "out\nerr\nno-newline")
                r = await g.run("exit_status() { return 3; }; exit_status", check=False)
                assert r.rc == 3
                with pytest.raises(GuestCommandError) as ei:
                    await g.run("echo oops; false")
                assert "oops" in str(ei.value)
                # state persists between commands, background jobs can be waited for
                await g.run("cd /tmp; VAR=42; (sleep 0.2; echo bg > /tmp/bg) & BGPID=$!")
                r = await g.run("pwd; echo $VAR; wait $BGPID; cat /tmp/bg")
                assert r.output.split() == ["/tmp", "42", "bg"]
                # plain disks: virtio-blk-pci -> vda, IDE -> sda
                r = await g.run("cat /sys/block/vda/size /sys/block/sda/size")
                assert r.output.split() == [str(16 * MiB // 512), str(8 * MiB // 512)]
                assert g.qmp is not None
                status = await g.qmp.execute("query-status")
                assert status["running"] is True
                names = {
                    b["device"] or b.get("qdev", "") for b in await g.qmp.execute("query-block")
                }
                assert names
                # a timeout says what it waited for and shows the console; guest is then unusable
                with pytest.raises(GuestTimeout) as ti:
                    await g.run("echo before-timeout; sleep 30", timeout=1)
                assert "before-timeout" in str(ti.value)
                with pytest.raises(GuestError, match="unusable"):
                    await g.run("true")
            assert g.returncode is not None
            assert "@@PYVIRTIO-READY" in log.read_text()


async def test_hotplug_vhost_user_blk(
    guest_image: GuestImage, reference_blk_backend: BackendStarter
) -> None:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-t-") as tmp:
        img = Path(tmp) / "disk.img"
        with open(img, "wb") as f:
            f.truncate(16 * MiB)
        sock = Path(tmp) / "blk.sock"
        backend = await reference_blk_backend(sock, img, 1)
        try:
            with trio.fail_after(120):
                async with QemuGuest(guest_image, qmp=True) as g:
                    assert (await g.run("ls /sys/block")).output.strip() == ""
                    dev_id = await g.hotplug(VhostUserBlk(sock, num_queues=1))
                    r = await g.run(
                        "for i in $(seq 100); do [ -e /sys/block/vda ] && break; sleep 0.1; done;"
                        "cat /sys/block/vda/size"
                    )
                    assert r.output.strip() == str(16 * MiB // 512)
                    await g.run("echo hotplugged | dd of=/dev/vda bs=512 conv=sync,fsync")
                    await g.unplug(dev_id)
                    assert (await g.run("ls /sys/block")).output.strip() == ""
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(backend)
        with open(img, "rb") as f:
            assert f.read(11) == b"hotplugged\n"


async def test_qemu_failing_to_start_reports_its_stderr(guest_image: GuestImage) -> None:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-t-") as tmp:
        missing = Path(tmp) / "nobody-listens.sock"
        with trio.fail_after(60), pytest.raises(GuestExited, match="Failed to connect"):
            async with QemuGuest(guest_image, devices=[VhostUserBlk(missing)]):
                pass  # pragma: no cover
