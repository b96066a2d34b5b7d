"""A qcow2 overlay two levels deep (top.qcow2 -> mid.qcow2 -> base.raw) served by
``virtio serve blk --format qcow2`` to a real QEMU guest (TCG), next to
qemu-storage-daemon serving a second overlay over the *same* mid/base chain.

The guest writes the same bytes (O_DIRECT dd of one random pattern, at offsets
inside, across and past the backing files) and discards the same whole clusters
on both disks and reads both back.  Once both servers stopped (SIGTERM), on the
host ``qemu-img compare`` of our top against qemu-storage-daemon's shows
identical content, ``qemu-img check`` finds nothing wrong in either, and the
shared backing files are unchanged (both servers had them open read-only at
once: the locks allow that).  Then our server restarts on the written image
(QEMU reconnects) for mkfs.ext4 + fsck on our disk.

A third disk, ours with ``--cache none``, is an overlay one level over the raw base
(its unallocated clusters read by the native data plane from base.raw): it reads
the base unchanged, takes the same writes and discards, and then reads what the
two-level disk reads wherever mid.qcow2 has no data of its own.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from virtio.testing.blk_checks import (
    BlkDisk,
    check_mkfs_mount,
    start_server,
    stop_process,
    stop_server,
    vhost_user_blk_guest,
    wait_for_socket,
)
from virtio.testing.guest_image import GuestImage
from virtio.testing.nbd_pki import make_pki, tls_server_args
from virtio.testing.qemu import VhostUserBlk

pytestmark = pytest.mark.qemu

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
SIZE = 64 * MiB


def _img(*args: str, cwd: Path) -> None:
    subprocess.run(["qemu-img", *args], check=True, cwd=cwd, capture_output=True)


def _chain(d: Path) -> None:
    base = d / "base.raw"
    with open(base, "wb") as f:
        f.write(hashlib.sha256(b"base").digest() * (32 * MiB // 32))
    _img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", "48M", cwd=d)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x6d 8M 3M", "mid.qcow2"],
        check=True,
        cwd=d,
        capture_output=True,
    )
    for top in ("top.qcow2", "top-qsd.qcow2"):
        _img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "64M", cwd=d)
    # one level over the raw base: read natively from base.raw (QCOW2_MAP_BACKING)
    _img(
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top-raw.qcow2", "64M", cwd=d
    )


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


async def _start_qsd(d: Path, sock: Path) -> trio.Process:
    pidfile = d / "qsd.pid"
    proc = await trio.lowlevel.open_process(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f0,filename={d / 'top-qsd.qcow2'},discard=unmap",
            "--blockdev",
            "driver=qcow2,node-name=q0,file=f0,discard=unmap",
            "--export",
            f"type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path={sock},writable=on",
            "--pidfile",
            str(pidfile),
        ],
        stdin=subprocess.DEVNULL,
    )
    with trio.fail_after(20):
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert proc.poll() is None, "qemu-storage-daemon exited"
            await trio.sleep(0.02)
    return proc


# Offsets in 4 KiB blocks: inside base (and across a 64 KiB cluster boundary),
# inside mid's own data, past base's end, past mid's end.
WRITES = [(15, 40), (2100, 300), (9000, 257), (13000, 100), (16000, 33)]
DISCARDS = [(4 * MiB, 1 * MiB), (8 * MiB + 64 * 1024, 512 * 1024)]  # whole clusters


async def test_two_level_overlay_against_qemu_storage_daemon(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    _chain(tmp_path)
    shared = {n: _md5(tmp_path / n) for n in ("base.raw", "mid.qcow2")}
    top = tmp_path / "top.qcow2"
    qsd_sock = tmp_path / "qsd.sock"
    log = open(tmp_path / "backend.log", "ab")  # noqa: SIM115 - handed to the child

    async def start(socket_path: Path, _raw: Path, num_queues: int) -> trio.Process:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "virtio", "-v", "serve", "blk", "--socket-path",
             os.fspath(socket_path), "--blk-file", os.fspath(top), "--format", "qcow2",
             "--num-queues", str(num_queues)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
        )  # fmt: skip
        await wait_for_socket(Path(socket_path), proc)
        return proc

    qsd = await _start_qsd(tmp_path, qsd_sock)
    top_raw, raw_sock = tmp_path / "top-raw.qcow2", tmp_path / "raw.sock"
    ours_raw: trio.Process | None = None
    try:
        ours_raw = await _serve(raw_sock, str(top_raw), log, "--format", "qcow2", "--cache", "none")
        async with vhost_user_blk_guest(
            guest_image,
            start,
            disk_size=SIZE,
            num_queues=2,
            reconnect=1,
            guest_kwargs={"devices": [VhostUserBlk(qsd_sock), VhostUserBlk(raw_sock)]},
        ) as s:
            g = s.guest
            sizes = (await g.run("cat /sys/block/vd[abc]/size")).output.split()
            assert sizes == [str(SIZE // 512)] * 3  # the virtual size
            # vdc (over base.raw, O_DIRECT): the base as it is, read by the data plane
            base_md5 = (
                await g.run("dd if=/dev/vdc bs=1M count=32 iflag=direct 2>/dev/null | md5sum")
            ).output.split()[0]
            assert base_md5 == shared["base.raw"]
            await g.run("dd if=/dev/urandom of=/tmp/pat bs=4096 count=300 2>/dev/null")
            for dev in ("vda", "vdb", "vdc"):
                for seek, count in WRITES:
                    await g.run(
                        f"dd if=/tmp/pat of=/dev/{dev} bs=4096 seek={seek} count={count} "
                        "oflag=direct conv=notrunc,fsync 2>/dev/null"
                    )
                for off, length in DISCARDS:
                    await g.run(f"blkdiscard -o {off} -l {length} /dev/{dev} && sync")
            digests = (
                await g.run(
                    "for d in vda vdb; do dd if=/dev/$d bs=1M iflag=direct 2>/dev/null"
                    " | md5sum; done"
                )
            ).output.split()
            assert digests[0] == digests[2], "the guest reads different disks"
            # vdc equals vda except where mid.qcow2 has data of its own ([8M, 11M))
            parts = (
                await g.run(
                    "for d in vda vdc; do dd if=/dev/$d bs=1M count=8 iflag=direct 2>/dev/null"
                    " | md5sum; dd if=/dev/$d bs=1M skip=11 iflag=direct 2>/dev/null | md5sum;"
                    " done"
                )
            ).output.split()
            assert parts[0:4:2] == parts[4:8:2], "the raw-backed overlay reads otherwise"
            assert await stop_process(ours_raw) == 0
            # Both servers shut down cleanly (metadata written), then qemu-img judges.
            assert await s.stop_backend(kill=False) == 0
            assert await stop_process(qsd) == 0
            r = subprocess.run(
                ["qemu-img", "compare", str(top), str(tmp_path / "top-qsd.qcow2")],
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0, r.stdout + r.stderr
            for image in (top, tmp_path / "top-qsd.qcow2"):
                r = subprocess.run(["qemu-img", "check", str(image)], capture_output=True)
                assert r.returncode == 0, r.stdout + r.stderr
            await s.restart_backend(kill=False)  # QEMU reconnects to our disk (vda)
            await check_mkfs_mount(g, BlkDisk("vda", top, SIZE, 2))
            assert await s.stop_backend(kill=False) == 0  # SIGTERM: clean shutdown
    finally:
        log.close()
        with trio.CancelScope(shield=True):
            await stop_process(qsd)
            if ours_raw is not None:
                await stop_process(ours_raw)
    for image in (top, top_raw):
        r = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    assert {n: _md5(tmp_path / n) for n in shared} == shared


async def _serve(sock: Path, blk_file: str, log, *extra: str) -> trio.Process:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "virtio", "-v", "serve", "blk", "--socket-path", os.fspath(sock),
         "--blk-file", blk_file, *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
    )  # fmt: skip
    await wait_for_socket(sock, proc)
    return proc


async def _nbd_server(cmd: list[str], sock: Path, log) -> subprocess.Popen:
    # start_server, not open_process: nbdkit dies with the thread that forked it
    proc = start_server(cmd, stderr=log)
    with trio.fail_after(20):
        while not sock.exists():
            assert proc.poll() is None, f"{cmd[0]} exited"
            await trio.sleep(0.02)
    return proc


def _nbd_cmd(kind: str, image: Path, sock: Path, *, export: str, read_only: bool) -> list[str]:
    """qemu-nbd or nbdkit's file plugin serving ``image`` on the unix socket ``sock``
    (qemu-nbd as ``export``; nbdkit's file plugin serves any export name)."""
    ro = ["-r"] if read_only else []
    if kind == "qemu-nbd":
        name = ["-x", export] if export else []
        return ["qemu-nbd", "-f", "raw", *name, *ro, "-t", "-k", str(sock), str(image)]
    return ["nbdkit", "-f", *ro, "-U", str(sock), "file", str(image)]


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
async def test_nbd_export_and_qcow2_over_nbd_in_a_guest(
    guest_image: GuestImage, tmp_path: Path, kind: str
) -> None:
    """vda: an export of ``kind`` (qemu-nbd, or nbdkit's file plugin) served through
    ``--blk-file nbd+unix://...``; vdb: a qcow2 overlay whose backing file is another
    (read-only) export of the same server kind; vdc: a third export of that kind
    requiring TLS, served through ``nbds+unix://...?tls-certificates=DIR`` (every
    request on the Python path: the native data plane has no TLS).  O_DIRECT
    patterns read back on all three, vdb outside them shows the NBD base, mkfs.ext4 +
    fsck on vda; afterwards the overlay passes qemu-img check, the base is
    unchanged, the pattern is in vdc's exported file and vda's is a clean ext4."""
    if shutil.which(kind) is None:
        pytest.skip(
            f"{kind} is needed (Debian package {'qemu-utils' if kind == 'qemu-nbd' else kind})"
        )
    plain = tmp_path / "plain.raw"
    plain.write_bytes(b"")
    os.truncate(plain, SIZE)
    base = tmp_path / "base.raw"
    base.write_bytes(hashlib.sha256(b"nbd base").digest() * (16 * MiB // 32))
    qsock, ksock = tmp_path / "plain.sock", tmp_path / "base.sock"
    secret = tmp_path / "tls.raw"
    secret.write_bytes(b"")
    os.truncate(secret, 16 * MiB)
    tsock, pki = tmp_path / "tls.sock", make_pki(tmp_path / "pki")
    log = open(tmp_path / "backend.log", "ab")  # noqa: SIM115 - handed to the children
    servers: list[subprocess.Popen] = []
    procs: list[trio.Process] = []
    try:
        cmd = _nbd_cmd(kind, plain, qsock, export="plain", read_only=False)
        servers.append(await _nbd_server(cmd, qsock, log))
        cmd = _nbd_cmd(kind, base, ksock, export="", read_only=True)
        servers.append(await _nbd_server(cmd, ksock, log))
        top = tmp_path / "top.qcow2"
        _img("create", "-q", "-f", "qcow2", "-b", f"nbd+unix:///?socket={ksock}", "-F", "raw",
             str(top), "32M", cwd=tmp_path)  # fmt: skip
        cmd = _nbd_cmd(kind, secret, tsock, export="tls", read_only=False)
        cmd = [cmd[0], *tls_server_args(kind, pki), *cmd[1:]]
        servers.append(await _nbd_server(cmd, tsock, log))
        third = tmp_path / "vdc.sock"
        tls_uri = f"nbds+unix:///tls?socket={tsock}&tls-certificates={pki}"
        procs.append(await _serve(third, tls_uri, log))
        second = tmp_path / "vdb.sock"
        procs.append(await _serve(second, os.fspath(top), log, "--format", "qcow2"))

        async def start(socket_path: Path, _raw: Path, num_queues: int) -> trio.Process:
            return await _serve(
                socket_path, f"nbd+unix:///plain?socket={qsock}", log,
                "--num-queues", str(num_queues),
            )  # fmt: skip

        async with vhost_user_blk_guest(
            guest_image,
            start,
            disk_size=SIZE,
            num_queues=2,
            guest_kwargs={"devices": [VhostUserBlk(second), VhostUserBlk(third)]},
        ) as s:
            g = s.guest
            sizes = (await g.run("cat /sys/block/vd[abc]/size")).output.split()
            assert sizes == [str(SIZE // 512), str(32 * MiB // 512), str(16 * MiB // 512)]
            await g.run("dd if=/dev/urandom of=/tmp/pat bs=4096 count=500 2>/dev/null")
            want = (await g.run("md5sum < /tmp/pat")).output.split()[0]
            for dev, seek in (("vda", 3000), ("vdb", 1000), ("vdc", 700)):  # vdb: across base
                await g.run(
                    f"dd if=/tmp/pat of=/dev/{dev} bs=4096 seek={seek} count=500 "
                    "oflag=direct conv=notrunc,fsync 2>/dev/null"
                )
                got = (
                    await g.run(
                        f"dd if=/dev/{dev} bs=4096 skip={seek} count=500 iflag=direct "
                        "2>/dev/null | md5sum"
                    )
                ).output.split()[0]
                assert got == want, dev
            # vdb outside the written range still shows the NBD base
            head = (await g.run("dd if=/dev/vdb bs=4096 count=1 iflag=direct 2>/dev/null"
                                " | md5sum")).output.split()[0]  # fmt: skip
            assert head == hashlib.md5(base.read_bytes()[:4096]).hexdigest()
            await check_mkfs_mount(g, BlkDisk("vda", plain, SIZE, 2))
            assert await s.stop_backend(kill=False) == 0
        assert await stop_process(procs.pop()) == 0  # our qcow2 server: clean close
        assert await stop_process(procs.pop()) == 0  # our TLS client: clean close
        got = hashlib.md5(secret.read_bytes()[700 * 4096 : 1200 * 4096]).hexdigest()
        assert got == want  # the pattern crossed TLS into vdc's exported file
        # (the base export still runs: qemu-img check opens the backing file)
        r = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for proc in reversed(procs):
            with trio.CancelScope(shield=True):
                await stop_process(proc)
        for server in reversed(servers):
            with trio.CancelScope(shield=True):
                await stop_server(server)
        log.close()
    assert base.read_bytes() == hashlib.sha256(b"nbd base").digest() * (16 * MiB // 32)
    # mkfs.ext4 overwrote vda's pattern; what qemu-nbd's file holds is a clean ext4
    r = subprocess.run(["e2fsck", "-fn", str(plain)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
