"""``bench/vhost_user_blk.py --quick``: our back-end and qemu-storage-daemon side by side
in one guest produce positive IOPS, CPU figures and a ratio (a smoke run, not a judgement
of the figures: those are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from virtio.testing.guest_image import GuestImage

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "vhost_user_blk.py"


def test_bench_quick_mode(guest_image: GuestImage) -> None:
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon not found (Debian package qemu-system-common)")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout)
    assert result["summary"], result
    for row in result["summary"]:
        for backend in ("ours", "qsd"):
            assert row[backend]["iops"] > 0, row
            assert row[backend]["cpu_us_per_io"] > 0, row
        assert row["iops_ratio"] is not None and row["iops_ratio"] > 0, row
        assert row["cpu_ratio"] is not None and row["cpu_ratio"] > 0, row
    assert {r["backend"] for r in result["runs"]} == {"ours", "qsd"}
    assert all(r["ios"] > 0 for r in result["runs"])
    assert result["disks"]["ours"]["guest_disk"] != result["disks"]["qsd"]["guest_disk"]
