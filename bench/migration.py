#!/usr/bin/env python3
"""Live-migration downtime: our vhost-user-blk back-end vs qemu-storage-daemon.

The same migration, once per back-end and round (alternating): a TCG guest
(2 vCPUs, 512 MiB, the harness of :mod:`virtio.testing.qemu`) with one
``vhost-user-blk-pci`` disk runs fio (4k random writes with crc32c verify, 2 jobs,
queue depth 8) and is migrated over a unix socket to a second QEMU on this machine,
whose disk is served by a second back-end process on the same image (ours with
``--incoming``: the image lock is handed over at the switch-over; qsd with
``locking=off``).  Reported per back-end: QEMU's
``downtime`` (ms the guest was stopped), ``total-time`` and ``setup-time`` (ms),
RAM transferred, medians over rounds; each migration is checked (fio's verify
passes on the destination).

Usage::

    python bench/migration.py                 # 3 rounds per back-end, QEMU 7.2 and 10.0
    python bench/migration.py --rounds 1 --qemu 7.2
    python bench/migration.py --rounds 6 --qemu 7.2   # the QEMU 7.2 TCG breakage (migration.md)
    python bench/migration.py --json

Exit status 0 when every migration completed and verified, 1 otherwise, 2 when
QEMU / qemu-storage-daemon / the guest image are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from virtio.testing.blk_checks import stop_process, wait_for_socket  # noqa: E402
from virtio.testing.guest_image import GuestImageUnavailable, ensure_image  # noqa: E402
from virtio.testing.migration import migrate  # noqa: E402
from virtio.testing.qemu import (  # noqa: E402
    QEMU_VERSIONS,
    GuestJob,
    QemuError,
    QemuGuest,
    QemuUnavailable,
    VhostUserBlk,
    qemu_binary,
)

MiB = 1 << 20
FIO = (
    "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --direct=1 --ioengine=libaio "
    "--iodepth=8 --numjobs=2 --size=8M --offset_increment=8M --verify=crc32c "
    "--verify_fatal=1 --do_verify=1 --group_reporting --output=/tmp/fio.out"
)
FIO_LOOP = (
    f"n=0; while [ ! -e /tmp/stop ] || [ $n -lt 1 ]; do {FIO} || exit 1; n=$((n+1)); done;"
    " echo fio-ok"
)
Starter = Callable[[Path, Path, bool], Awaitable[trio.Process]]


async def start_ours(sock: Path, image: Path, incoming: bool) -> trio.Process:
    python = REPO / ".venv" / "bin" / "python"
    cmd = [str(python if python.exists() else sys.executable), "-m", "virtio", "serve", "blk"]
    cmd += ["--socket-path", str(sock), "--blk-file", str(image), "--num-queues", "2"]
    cmd += ["--incoming"] if incoming else []
    proc = await trio.lowlevel.open_process(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    await wait_for_socket(sock, proc)
    return proc


async def start_qsd(sock: Path, image: Path, incoming: bool) -> trio.Process:
    pidfile = Path(f"{sock}.pid")
    locking = ",locking=off" if incoming else ""
    cmd = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={image}{locking}",
        "--blockdev", "driver=raw,node-name=disk0,file=file0",
        "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
        f"addr.path={sock},writable=on,num-queues=2",
        "--pidfile", str(pidfile),
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL)
    with trio.fail_after(10):
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"qemu-storage-daemon exited with {proc.returncode}")
            await trio.sleep(0.02)
    return proc


async def one_migration(image_dir, qemu, start: Starter) -> dict:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-migbench-") as tmp:
        work = Path(tmp)
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(32 * MiB)
        src_sock, dst_sock, uri = work / "src.sock", work / "dst.sock", f"unix:{work / 'm.sock'}"
        src_be = await start(src_sock, image, False)
        dst_be = await start(dst_sock, image, True)
        try:
            async with QemuGuest(
                image_dir, devices=[VhostUserBlk(src_sock, num_queues=2)], fio=True, qmp=True,
                qemu=qemu,
            ) as src:  # fmt: skip
                job = await src.spawn(FIO_LOOP)
                with trio.fail_after(60):  # fio has written something
                    while int((await src.run("cat /sys/block/vda/stat")).output.split()[6]) < 4096:
                        await trio.sleep(0.2)
                async with QemuGuest(
                    image_dir, devices=[VhostUserBlk(dst_sock, num_queues=2)], fio=True,
                    qmp=True, qemu=qemu, incoming=uri,
                ) as dst:  # fmt: skip
                    info = await migrate(src, dst, uri)
                    dst.take_over_console(src)
                    await dst.run("touch /tmp/stop")
                    result = await GuestJob(dst, job.number).wait(timeout=180, check=False)
                    verified = result.rc == 0 and "fio-ok" in result.output
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(src_be)
                await stop_process(dst_be)
    return {
        "downtime_ms": info["downtime"],
        "total_ms": info["total-time"],
        "setup_ms": info.get("setup-time", 0),
        "ram_mib": info["ram"]["transferred"] / MiB,
        "verified": verified,
    }


async def main_async(args) -> int:
    image = ensure_image()
    starters: dict[str, Starter] = {"pyvirtio": start_ours, "qsd": start_qsd}
    results: dict[str, dict[str, list[dict]]] = {}
    ok = True
    for version in args.qemu:
        try:
            qemu = qemu_binary(version)
        except QemuUnavailable as e:
            print(f"QEMU {version}: skipped ({e})", file=sys.stderr)
            continue
        per = results.setdefault(version, {name: [] for name in starters})
        for r in range(args.rounds):
            for name, start in starters.items():
                try:
                    run = await one_migration(image, qemu, start)
                except (QemuError, trio.TooSlowError) as e:  # the guest broke: a result too
                    run = {"verified": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                ok &= run["verified"]
                per[name].append(run)
                print(f"QEMU {version} round {r + 1} {name}: {run}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0 if ok else 1
    print(f"{'QEMU':6} {'back-end':9} {'downtime ms':>12} {'total ms':>9} {'RAM MiB':>8} verified")
    for version, per in results.items():
        for name, runs in per.items():

            def med(key: str, runs=runs) -> float:
                values = [run[key] for run in runs if key in run]
                return statistics.median(values) if values else float("nan")

            print(
                f"{version:6} {name:9} {med('downtime_ms'):12.0f} {med('total_ms'):9.0f} "
                f"{med('ram_mib'):8.0f} {sum(r['verified'] for r in runs)}/{len(runs)}"
            )
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--qemu", nargs="+", default=list(QEMU_VERSIONS), choices=QEMU_VERSIONS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon not found", file=sys.stderr)
        return 2
    try:
        return trio.run(main_async, args)
    except (QemuUnavailable, GuestImageUnavailable) as e:
        print(f"unavailable: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
