#!/usr/bin/env python3
"""Does QEMU's own TCG live migration break guests, with no vhost-user back-end at all?

The control experiment for the QEMU 7.2 breakage in docs/migration.md: the same
guest and harness as ``bench/migration.py`` (TCG, 2 vCPUs, 512 MiB,
:class:`~virtio.testing.qemu.QemuGuest`), migrated over a unix socket to a second
QEMU on this machine, but only QEMU-built-in devices, so no code of ours runs:

- ``mem``: no device; the guest copies a 96 MiB random file in its RAM (/tmp is the
  initramfs) over and over and compares each copy's sha256 with the original's
  (a memory-dirtying workload that verifies itself);
- ``blk``: QEMU's own ``virtio-blk-pci`` on a raw file both QEMUs open
  (``cache=none``), running bench/migration.py's fio loop (4k random writes with
  crc32c verify, 2 jobs, queue depth 8).

``--private-ram``: plain anonymous guest RAM instead of the harness's shared memfd
(``memory-backend-memfd,share=on`` + ``-numa``, which vhost-user needs), to see
whether the shared memfd matters.

A migration counts as *broken* when the workload fails or does not end (verify
failure, hang), the guest stops answering, or its kernel log has an oops/BUG/panic
after the switch-over.  Printed: per QEMU and workload, broken/total and the median
downtime.

Usage::

    python bench/migration_qemu_only.py                       # 2 rounds, both QEMUs
    python bench/migration_qemu_only.py --qemu 7.2 --rounds 4 --workload mem blk
    python bench/migration_qemu_only.py --qemu 7.2 --rounds 4 --workload mem --private-ram

Exit status 0 when every migration was clean, 1 otherwise, 2 when QEMU / the guest
image are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from virtio.testing.guest_image import GuestImageUnavailable, ensure_image  # noqa: E402
from virtio.testing.migration import migrate  # noqa: E402
from virtio.testing.qemu import (  # noqa: E402
    QEMU_VERSIONS,
    Disk,
    GuestJob,
    QemuError,
    QemuGuest,
    QemuUnavailable,
    qemu_binary,
)

MiB = 1 << 20
WORKLOADS = ("mem", "blk")
FIO = (
    "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --direct=1 --ioengine=libaio "
    "--iodepth=8 --numjobs=2 --size=8M --offset_increment=8M --verify=crc32c "
    "--verify_fatal=1 --do_verify=1 --group_reporting --output=/tmp/fio.out"
)
LOOPS = {
    "blk": f"n=0; while [ ! -e /tmp/stop ] || [ $n -lt 1 ]; do {FIO} || exit 1; n=$((n+1)); done;"
    " echo loop-ok $n",
    "mem": "ref=$(sha256sum < /tmp/a); n=0;"
    " while [ ! -e /tmp/stop ] || [ $n -lt 1 ]; do"
    '  cp /tmp/a /tmp/b; [ "$(sha256sum < /tmp/b)" = "$ref" ] || { echo MISMATCH; exit 1; };'
    "  rm /tmp/b; n=$((n+1)); done; echo loop-ok $n",
}
OOPS = (  # the kernel's own words for a crash (not "panic=-1" on its command line)
    "dmesg | grep -E 'Oops|BUG:|Kernel panic|general protection fault|Call Trace|segfault'"
    " | tail -5"
)


class PrivateRamGuest(QemuGuest):
    """The harness's guest with QEMU's default (private, anonymous) RAM."""

    def command_line(self, qemu: str | None = None) -> list[str]:
        args = super().command_line(qemu)
        out: list[str] = []
        for arg in args:
            if (
                out
                and out[-1] in ("-object", "-numa")
                and (arg.startswith("memory-backend-memfd,") or "memdev=mem" in arg)
            ):
                out.pop()  # the shared memfd backend and the node using it
            else:
                out.append(arg)
        return out


async def one_migration(image_dir, qemu, workload: str, private_ram: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-qmig-") as tmp:
        work = Path(tmp)
        disk = work / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(32 * MiB)
        devices = [Disk(disk, cache="none")] if workload == "blk" else []
        uri = f"unix:{work / 'm.sock'}"
        fio = workload == "blk"
        Guest = PrivateRamGuest if private_ram else QemuGuest
        async with Guest(image_dir, devices=devices, fio=fio, qmp=True, qemu=qemu) as src:
            if workload == "mem":
                await src.run("dd if=/dev/urandom of=/tmp/a bs=1M count=96 2>/dev/null")
            job = await src.spawn(LOOPS[workload])
            with trio.fail_after(60):  # the workload is running
                if workload == "blk":
                    while int((await src.run("cat /sys/block/vda/stat")).output.split()[6]) < 4096:
                        await trio.sleep(0.2)
                else:
                    await trio.sleep(2)
            async with Guest(
                image_dir, devices=devices, fio=fio, qmp=True, qemu=qemu, incoming=uri
            ) as dst:
                info = await migrate(src, dst, uri)
                dst.take_over_console(src)
                run = {
                    "downtime_ms": info["downtime"],
                    "total_ms": info["total-time"],
                    "ram_mib": round(info["ram"]["transferred"] / MiB),
                }
                try:
                    await dst.run("touch /tmp/stop", timeout=60)
                    result = await GuestJob(dst, job.number).wait(timeout=240, check=False)
                    oops = (await dst.run(OOPS, timeout=60, check=False)).output.strip()
                except (QemuError, trio.TooSlowError) as e:
                    return {**run, "broken": True, "why": _why(e)}
                ok = result.rc == 0 and "loop-ok" in result.output
                why = "" if ok else f"workload rc {result.rc}: {result.output[-300:]}"
                if oops:
                    why += f" kernel: {oops[-300:]}"
                return {**run, "broken": bool(why), "why": why.strip()}


def _why(exc: BaseException) -> str:
    """The error's first line and the console's crash lines (Oops, BUG, RIP), if any."""
    text = str(exc)
    crash = [ln for ln in text.splitlines() if any(k in ln for k in ("Oops", "BUG", "RIP:"))]
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]} {' | '.join(crash[:3])}".strip()


async def main_async(args) -> int:
    image = ensure_image()
    results: dict[str, dict[str, list[dict]]] = {}
    for version in args.qemu:
        try:
            qemu = qemu_binary(version)
        except QemuUnavailable as e:
            print(f"QEMU {version}: skipped ({e})", file=sys.stderr)
            continue
        per = results.setdefault(version, {w: [] for w in args.workload})
        for r in range(args.rounds):
            for workload in args.workload:
                try:
                    run = await one_migration(image, qemu, workload, args.private_ram)
                except (QemuError, trio.TooSlowError) as e:  # broke before/while migrating
                    run = {"broken": True, "why": _why(e)}
                per[workload].append(run)
                print(f"QEMU {version} round {r + 1} {workload}: {run}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'QEMU':6} {'workload':8} {'broken':>7} {'downtime ms':>12} {'total ms':>9}")
        for version, per in results.items():
            for workload, runs in per.items():
                down = [r["downtime_ms"] for r in runs if "downtime_ms" in r]
                total = [r["total_ms"] for r in runs if "total_ms" in r]
                broken = sum(r["broken"] for r in runs)
                print(
                    f"{version:6} {workload:8} {f'{broken}/{len(runs)}':>7} "
                    f"{statistics.median(down) if down else float('nan'):12.0f} "
                    f"{statistics.median(total) if total else float('nan'):9.0f}"
                )
    return 1 if any(r["broken"] for per in results.values() for v in per.values() for r in v) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--qemu", nargs="+", default=list(QEMU_VERSIONS), choices=QEMU_VERSIONS)
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--private-ram", action="store_true", help="no shared memfd RAM")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        return trio.run(main_async, args)
    except (QemuUnavailable, GuestImageUnavailable) as e:
        print(f"unavailable: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
