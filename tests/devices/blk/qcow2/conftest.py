"""Fixtures for the qcow2 tests: the real ``qemu-img`` / ``qemu-io`` as oracles."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


class QemuImg:
    """Thin wrappers around qemu-img/qemu-io (each call checks its exit status)."""

    def create(
        self,
        path: Path,
        size: int,
        *,
        cluster_size: int = 65536,
        compat: str = "1.1",
        extended_l2: bool = False,
        refcount_bits: int = 16,
        lazy_refcounts: bool = False,
        backing: Path | None = None,
        backing_fmt: str = "qcow2",
        extra: tuple[str, ...] = (),
    ) -> Path:
        opts = [
            f"cluster_size={cluster_size}",
            f"compat={compat}",
            f"refcount_bits={refcount_bits}",
        ]
        if extended_l2:
            opts.append("extended_l2=on")
        if lazy_refcounts:
            opts.append("lazy_refcounts=on")
        args = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", ",".join(opts), *extra]
        if backing is not None:
            # relative to the overlay's directory, as users write it
            args += ["-b", backing.name, "-F", backing_fmt]
        subprocess.run([*args, str(path), str(size)], check=True, cwd=path.parent)
        return path

    def check(self, path: Path) -> dict:
        """``qemu-img check --output=json``; fails the test on corruption."""
        r = subprocess.run(
            [QEMU_IMG, "check", "--output=json", str(path)], capture_output=True, text=True
        )
        assert r.returncode in (0, 3), f"qemu-img check: rc={r.returncode}\n{r.stdout}{r.stderr}"
        report = json.loads(r.stdout)
        assert report.get("corruptions", 0) == 0, report
        assert report.get("check-errors", 0) == 0, report
        return report

    def compare(self, a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "raw") -> None:
        r = subprocess.run(
            [QEMU_IMG, "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, f"qemu-img compare {a} {b}: {r.stdout}{r.stderr}"

    def io(self, path: Path, *commands: str, fmt: str = "qcow2") -> None:
        args = [QEMU_IO, "-f", fmt]
        for c in commands:
            args += ["-c", c]
        r = subprocess.run([*args, str(path)], capture_output=True, text=True)
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr

    def info(self, path: Path) -> dict:
        out = subprocess.run(
            [QEMU_IMG, "info", "--output=json", "-U", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return json.loads(out)

    def convert(self, src: Path, dst: Path, *opts: str, out_fmt: str = "qcow2") -> Path:
        subprocess.run(
            [QEMU_IMG, "convert", "-q", "-O", out_fmt, *opts, str(src), str(dst)], check=True
        )
        return dst


@pytest.fixture(scope="session")
def qimg() -> QemuImg:
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img / qemu-io are not installed (Debian package qemu-utils)")
    return QemuImg()
