"""``qemu-img create`` for tests, with the one failure of qemu-img's own that is not
the test's business.

LUKS key slots (``-f luks``, qcow2 ``encrypt.format=luks``) are created with a PBKDF2
iteration count that qemu-img calibrates against the thread's CPU time; on a busy
machine the calibration can see no CPU time at all and qemu-img exits with "Unable to
get accurate CPU usage" (measured here: 3 of 40 creations under two CPU hogs).  That
message is retried; any other failure is raised with qemu-img's stderr.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CALIBRATION_FAILURE = "Unable to get accurate CPU usage"
ATTEMPTS = 5


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
