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

The image lock changes hands at the switch-over: before the migration the source
back-end is the image's only lock holder (the destination, ``--incoming``, holds
none), afterwards the destination is (``/proc/PID/fdinfo``, ``lock_holders``), and a
third writer (``qemu-io``) is refused.

``test_live_migration_disk_and_nic`` is the issue's own wording: one guest whose disk
*and* NIC are our back-ends (``serve blk`` + a port of ``serve net``), migrated under
fio verify and a TCP stream from a peer guest (split rings; the packed-ring run is disk
only, to keep the suite's time flat).  Its NIC keeps QEMU's default
``guest_announce=on``: the guest announces itself (VIRTIO_NET_F_GUEST_ANNOUNCE,
§5.1.9.5.4) and QEMU sends no SEND_RARP (that path is ``test_vu_net_migrate.py``).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio
from test_vu_blk_qemu import our_backend

from virtio.devices.blk.backend import lock_holders
from virtio.testing.blk_checks import stop_process
from virtio.testing.guest_image import GuestImage
from virtio.testing.migration import (
    QEMU_72_TCG,
    TcpStream,
    migrate,
    rx_bytes,
    start_switch,
)
from virtio.testing.net_sniffer import Sniffer, sniff
from virtio.testing.qemu import (
    GuestJob,
    GuestTimeout,
    QemuBinary,
    QemuGuest,
    VhostUserBlk,
    VhostUserNet,
)

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


@pytest.fixture
def migratable_qemu(qemu: QemuBinary) -> QemuBinary:
    """``qemu`` but 7.2, skipped here (a sync fixture: pytest-trio drops the reason of a
    skip raised inside the async test)."""
    if qemu.version == "7.2":
        pytest.skip(QEMU_72_TCG)
    return qemu


async def test_live_migration_under_fio_verify(
    guest_image: GuestImage, migratable_qemu: QemuBinary
) -> None:
    """Disk only, packed rings (§2.8)."""
    qemu = migratable_qemu
    info = await _migrate_under_fio(guest_image, qemu, props={"packed": True})
    print(
        f"migration (packed, QEMU {qemu.version}): downtime {info['downtime']} ms, "
        f"total {info['total-time']} ms, {info['ram']['transferred'] >> 20} MiB"
    )


MAC_A, MAC_B = "52:54:00:00:13:1a", "52:54:00:00:13:1b"
IP_A, IP_B = "10.0.13.20", "10.0.13.21"


async def test_live_migration_disk_and_nic(
    guest_image: GuestImage, migratable_qemu: QemuBinary
) -> None:
    """Disk and NIC of one guest, split rings (§2.7), fio verify + a 64 MiB TCP stream."""
    qemu = migratable_qemu
    with tempfile.TemporaryDirectory(prefix="pyvirtio-mignet-") as tmp:
        work = Path(tmp)
        a_src, a_dst, b_sock = work / "a-src.sock", work / "a-dst.sock", work / "b.sock"
        listener = work / "listen.sock"
        switch_log = work / "switch.log"
        switch = await start_switch([a_src, a_dst, b_sock, listener], switch_log)
        try:
            b = QemuGuest(guest_image, qemu=qemu, devices=[VhostUserNet(b_sock, mac=MAC_B)])
            async with b, trio.open_nursery() as nursery:
                sniffer = await nursery.start(sniff, listener)
                await b.run(f"ip link set eth0 up && ip addr add {IP_B}/24 dev eth0")
                stream = TcpStream(b, IP_A)
                info = await _migrate_under_fio(
                    guest_image,
                    qemu,
                    props={},
                    nics=(VhostUserNet(a_src, mac=MAC_A), VhostUserNet(a_dst, mac=MAC_A)),
                    stream=stream,
                    sniffer=sniffer,
                )
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(switch)
        log = switch_log.read_text(errors="replace")
    assert "Traceback" not in log and "needs reset" not in log, log[-3000:]
    assert "dirty page logging on" in log, log[-3000:]
    assert "(RARP)" not in log, log[-3000:]  # the guest announced itself: no SEND_RARP
    print(
        f"migration (disk+NIC, split, QEMU {qemu.version}): downtime {info['downtime']} ms, "
        f"total {info['total-time']} ms, {info['ram']['transferred'] >> 20} MiB"
    )


def _gratuitous_arps(frames: list[bytes], mac: str, ip: str) -> list[bytes]:
    """ARP frames from ``mac`` whose sender and target protocol address are ``ip``
    (what Linux sends for NETDEV_NOTIFY_PEERS, i.e. on VIRTIO_NET_S_ANNOUNCE)."""
    raw, addr = bytes.fromhex(mac.replace(":", "")), bytes(map(int, ip.split(".")))
    return [
        f
        for f in frames
        if f[6:12] == raw and f[12:14] == b"\x08\x06" and f[28:32] == addr == f[38:42]
    ]


async def _migrate_under_fio(
    guest_image: GuestImage,
    qemu: QemuBinary,
    *,
    props: dict[str, object],
    nics: tuple[VhostUserNet, VhostUserNet] | None = None,
    stream: TcpStream | None = None,
    sniffer: Sniffer | None = None,
) -> dict:
    """Migrate a guest with our disk (and ``nics``: source's, destination's) under fio
    verify (and ``stream`` into it); check every block, the stream, the lock hand-over,
    and with ``sniffer`` (a port on the NIC's switch) that the guest announced itself
    after the switch-over.  Returns QEMU's query-migrate answer."""
    with tempfile.TemporaryDirectory(prefix="pyvirtio-mig-") as tmp, trio.fail_after(400):
        work = Path(tmp)
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(32 * MiB)
        src_sock, dst_sock = work / "src.sock", work / "dst.sock"
        src_be = await our_backend()(src_sock, image, 2)
        dst_be = await our_backend("--incoming")(dst_sock, image, 2)
        src_devices: list = [VhostUserBlk(src_sock, num_queues=2, props=props)]
        dst_devices: list = [VhostUserBlk(dst_sock, num_queues=2, props=props)]
        if nics is not None:
            src_devices.append(nics[0])
            dst_devices.append(nics[1])
        try:
            assert lock_holders(os.fspath(image)) == [src_be.pid]
            _qemu_io_refused(image)  # a third writer, while the source holds the lock
            async with QemuGuest(
                guest_image,
                devices=src_devices,
                fio=True,
                qmp=True,
                qemu=qemu,
            ) as src:
                if stream is not None:
                    await src.run(f"ip link set eth0 up && ip addr add {IP_A}/24 dev eth0")
                    await stream.start(src)
                job = await src.spawn(FIO_LOOP)
                with trio.fail_after(60):  # fio is writing before the migration starts
                    while await _sectors(src) < 4096:
                        await trio.sleep(0.2)
                if stream is not None:
                    with trio.fail_after(120):  # and the stream is flowing
                        while await rx_bytes(src) < 4 << 20:
                            await trio.sleep(0.2)
                async with QemuGuest(
                    guest_image,
                    devices=dst_devices,
                    fio=True,
                    qmp=True,
                    qemu=qemu,
                    incoming=f"unix:{work / 'mig.sock'}",
                ) as dst:
                    reads_before = await _sectors(src)
                    rx_before = await rx_bytes(src) if stream is not None else 0
                    assert lock_holders(os.fspath(image)) == [src_be.pid]
                    seen = len(sniffer.frames) if sniffer is not None else 0
                    info = await migrate(src, dst, f"unix:{work / 'mig.sock'}")
                    dst.take_over_console(src)
                    # the lock changed hands: the destination holds it, nobody else
                    assert lock_holders(os.fspath(image)) == [dst_be.pid]
                    _qemu_io_refused(image)
                    job = GuestJob(dst, job.number)
                    assert await job.poll() in (None, 0), await job.output()
                    if stream is not None:
                        assert rx_before < stream.size, "the stream ended before the migration"
                        sent, received = await stream.finish(dst)
                        assert received == sent
                        assert await rx_bytes(dst) > rx_before  # received on the destination
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
                    if sniffer is not None:  # announced by the guest (GUEST_ANNOUNCE)
                        feats = (await dst.run("cat /sys/class/net/eth0/device/features")).output
                        bits = next(
                            w for w in feats.split() if len(w) >= 32 and set(w) <= {"0", "1"}
                        )
                        assert bits[21] == "1", feats  # VIRTIO_NET_F_GUEST_ANNOUNCE
                        assert _gratuitous_arps(sniffer.frames[seen:], MAC_A, IP_A)
            src_log = Path(f"{src_sock}.log").read_text(errors="replace")
            dst_log = Path(f"{dst_sock}.log").read_text(errors="replace")
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(src_be)
                await stop_process(dst_be)
    for log in (src_log, dst_log):
        assert "needs reset" not in log and "rejected" not in log, log[-3000:]
    assert "dirty page logging on" in src_log  # QEMU's log was handed to the source
    assert "image lock released (live migration" in src_log, src_log[-3000:]
    assert "image lock taken (vring" in dst_log, dst_log[-3000:]
    return info


def _qemu_io_refused(image: Path) -> None:
    """A third writer, QEMU's own ``qemu-io``, cannot lock the image for writing."""
    cmd = ["qemu-io", "-f", "raw", "-c", "write 0 512", os.fspath(image)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "lock" in r.stdout + r.stderr, r


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
