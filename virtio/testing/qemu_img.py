"""``qemu-img create`` for tests, with the one failure of qemu-img's own that is not
the test's business.

LUKS key slots (``-f luks``, qcow2 ``encrypt.format=luks``) are created with a PBKDF2
iteration count that qemu-img calibrates against the thread's CPU time from
``getrusage(RUSAGE_THREAD)``.  That figure is the scheduler's ``sum_exec_runtime`` as of
the last tick or context switch, and qemu-img's first round (2^15 iterations) takes
about a millisecond, under one 4 ms tick at HZ=250: when no tick lands inside it the
delta is 0 and qemu-img exits with "Unable to get accurate CPU usage".  Measured here
on an idle machine: 15 of 40 and 32 of 60 creations failed, each within 5 ms, the
longest run of failures 6 (CI once met 5 in a row, the old limit).  That message alone
is retried, up to ATTEMPTS times (0.55^40 < 1e-10); any other failure is raised with
qemu-img's stderr.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CALIBRATION_FAILURE = "Unable to get accurate CPU usage"
ATTEMPTS = 40


class QemuImgError(RuntimeError):
    """qemu-img create failed (its stderr is the message)."""


def qemu_img_create(*args: str, cwd: Path | None = None) -> None:
    """``qemu-img create -q ARGS...``; QemuImgError on failure."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise QemuImgError("qemu-img is not installed (Debian package qemu-utils)")
    for _ in range(ATTEMPTS):
        made = subprocess.run(
            [qemu_img, "create", "-q", *args], capture_output=True, text=True, cwd=cwd
        )
        if made.returncode == 0:
            return
        if CALIBRATION_FAILURE not in made.stderr:
            break
    raise QemuImgError(f"qemu-img create {' '.join(args)}: {made.stderr.strip()}")
