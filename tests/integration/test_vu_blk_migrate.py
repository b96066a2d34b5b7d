"""Live migration of a guest whose disk is our vhost-user-blk back-end (issue 13 §5).

Two QEMUs on one machine, each with its own ``virtio serve blk`` process on the same
(shared) image; ``migrate`` over a unix socket while fio writes and verifies in the
guest.  What makes it work: the source back-end logs every guest page it writes --
used rings and the data of reads, also from the native data plane -- in the dirty
log QEMU gives it (SET_LOG_BASE, VHOST_F_LOG_ALL), QEMU stops its rings with
GET_VRING_BASE (which drains in-flight requests first) and the destination resumes
at those indices.  Afterwards fio goes on against the destination and every block
verifies; the migration's downtime is printed (bench/migration.py compares it with
qemu-storage-daemon).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import trio
from test_vu_blk_qemu import our_backend

from virtio.testing.blk_checks import stop_process
from virtio.testing.guest_image import GuestImage
from virtio.testing.migration import migrate
from virtio.testing.qemu import GuestJob, GuestTimeout, QemuBinary, QemuGuest, VhostUserBlk

pytestmark = pytest.mark.qemu

MiB = 1 << 20
FIO = (
    "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --direct=1 --ioengine=libaio "
    "--iodepth=8 --numjobs=2 --size=8M --offset_increment=8M --verify=crc32c "
    "--verify_fatal=1 --do_verify=1 --group_reporting --output=/tmp/fio.out"
)
FIO_LOOP = (
    f"n=0; while [ ! -e /tmp/stop ] || [ $n -lt 1 ]; do {FIO} || {{ cat /tmp/fio.out; exit 1; }};"
    " n=$((n+1)); done; echo fio-ok $n"
)

# Measured with /tmp loops of bench/migration.py's one_migration (docs/migration.md): on
# QEMU 7.2 under TCG the guest breaks after switch-over with qemu-storage-daemon as the
# back-end too (3 of 6 migrations: fio hung or verify failed), while both back-ends
# migrate cleanly on QEMU 10.0 (qsd 5/5, ours 6/6).  Real users have KVM; the test keeps
# QEMU 10.0, where a failure is ours.
QEMU_72_TCG = (
    "QEMU 7.2 under TCG corrupts or hangs the migrated guest under disk I/O with "
    "qemu-storage-daemon as well (docs/migration.md); checked on QEMU 10.0"
)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_live_migration_under_fio_verify(
    guest_image: GuestImage, qemu: QemuBinary, packed: bool
) -> None:
    if qemu.version == "7.2":
        pytest.skip(QEMU_72_TCG)
    props = {"packed": True} if packed else {}
    with tempfile.TemporaryDirectory(prefix="pyvirtio-mig-") as tmp, trio.fail_after(240):
        work = Path(tmp)
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(32 * MiB)
        src_sock, dst_sock = work / "src.sock", work / "dst.sock"
        src_be = await our_backend()(src_sock, image, 2)
        dst_be = await our_backend("--incoming")(dst_sock, image, 2)
        try:
            async with QemuGuest(
                guest_image,
                devices=[VhostUserBlk(src_sock, num_queues=2, props=props)],
                fio=True,
                qmp=True,
                qemu=qemu,
            ) as src:
                job = await src.spawn(FIO_LOOP)
                with trio.fail_after(60):  # fio is writing before the migration starts
                    while await _sectors(src) < 4096:
                        await trio.sleep(0.2)
                async with QemuGuest(
                    guest_image,
                    devices=[VhostUserBlk(dst_sock, num_queues=2, props=props)],
                    fio=True,
                    qmp=True,
                    qemu=qemu,
                    incoming=f"unix:{work / 'mig.sock'}",
                ) as dst:
                    reads_before = await _sectors(src)
                    info = await migrate(src, dst, f"unix:{work / 'mig.sock'}")
                    dst.take_over_console(src)
                    job = GuestJob(dst, job.number)
                    assert await job.poll() in (None, 0), await job.output()
                    await dst.run("touch /tmp/stop")
                    try:
                        result = await job.wait(timeout=120, check=False)
                    except GuestTimeout:
                        raise AssertionError(await _stuck_report(dst, src_sock, dst_sock)) from None
                    assert result.rc == 0 and "fio-ok" in result.output, result.output[-3000:]
                    assert await _sectors(dst) > reads_before  # I/O went on after the switch
                    # every block fio wrote verifies once more, read on the destination
                    r = await dst.run(FIO.replace("--do_verify=1", "--verify_only"), check=False)
                    assert r.rc == 0, (await dst.run("cat /tmp/fio.out")).output[-3000:]
            src_log = Path(f"{src_sock}.log").read_text(errors="replace")
            dst_log = Path(f"{dst_sock}.log").read_text(errors="replace")
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(src_be)
                await stop_process(dst_be)
    for log in (src_log, dst_log):
        assert "needs reset" not in log and "rejected" not in log, log[-3000:]
    assert "dirty page logging on" in src_log  # QEMU's log was handed to the source
    print(
        f"migration ({'packed' if packed else 'split'}, QEMU {qemu.version}): "
        f"downtime {info['downtime']} ms, total {info['total-time']} ms, "
        f"{info['ram']['transferred'] >> 20} MiB"
    )


async def _sectors(guest: QemuGuest) -> int:
    """Sectors read + written on /dev/vda so far (its /sys stat)."""
    out = (await guest.run("cat /sys/block/vda/stat")).output
    # The console may interleave a kernel message with the command's output: use the
    # line that is the stat record (all numbers).
    for line in reversed(out.splitlines()):
        fields = line.split()
        if len(fields) >= 7 and all(f.isdigit() for f in fields):
            return int(fields[2]) + int(fields[6])
    raise AssertionError(f"no /sys/block/vda/stat record in {out!r}")


async def _stuck_report(dst: QemuGuest, src_sock: Path, dst_sock: Path) -> str:
    """What the guest and both back-ends say when fio does not finish after the switch:
    requests the guest still counts in flight (a lost request or interrupt) or progress
    (slowness)."""
    parts = []
    for cmd in (
        "cat /sys/block/vda/inflight /sys/block/vda/stat",
        "sleep 2; cat /sys/block/vda/inflight /sys/block/vda/stat",
        "grep -i virtio /proc/interrupts",
        "ps -o pid,stat,time,args | grep -v ' ps '",
        "tail -c 1500 /tmp/fio.out",
    ):
        r = await dst.run(cmd, check=False)
        parts.append(f"$ {cmd}\n{r.output}")
    for sock in (src_sock, dst_sock):
        log = Path(f"{sock}.log").read_text(errors="replace")
        parts.append(f"--- {sock.name}.log (tail) ---\n{log[-2500:]}")
    return "fio did not finish after the switch-over\n" + "\n".join(parts)
