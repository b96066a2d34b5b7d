"""Fault injection for back-end processes: libc calls on image files that fail.

``faultshim.c`` is an ``LD_PRELOAD`` library: a back-end started with
``FaultInjector.env()`` fails the named calls on regular files while a test has
them armed::

    faults = FaultInjector(tmp_path / "faults")
    proc = subprocess.Popen([... "virtio", "serve", "blk", ...], env=faults.env())
    faults.arm("fdatasync", errno.EIO)          # the next fdatasync fails once
    faults.arm("pwritev", errno.ENOSPC, count=-1)  # every write fails until disarmed
    faults.disarm("pwritev")

The library is built once per source version with the system C compiler into the
cache directory (``PYVIRTIO_CACHE``, default ``~/.cache/pyvirtio``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

CALLS = frozenset({"fdatasync", "fsync", "pwritev", "preadv", "pwrite", "pread"})
"""Calls the shim can fail (``pwritev`` covers ``pwritev64`` and so on)."""

_SOURCE = Path(__file__).with_name("faultshim.c")
_NATIVE = Path(__file__).resolve().parents[1] / "native"  # faultfile.h, shared with aio.c


def shim_path() -> Path:
    """Build (if needed) and return the shim's shared library."""
    src = _SOURCE.read_bytes() + (_NATIVE / "faultfile.h").read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:12]
    cache = Path(os.environ.get("PYVIRTIO_CACHE", Path.home() / ".cache" / "pyvirtio"))
    out = cache / f"faultshim-{digest}.so"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            [
                "cc",
                "-O2",
                "-shared",
                "-fPIC",
                f"-I{_NATIVE}",
                "-o",
                str(tmp),
                str(_SOURCE),
                "-ldl",
                "-lpthread",
            ],
            check=True,
            capture_output=True,
        )
        os.replace(tmp, out)
    return out


class FaultInjector:
    """Arm and disarm failures of a shimmed process's libc calls (see module doc)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment that loads the shim and points it at this injector."""
        env = dict(os.environ if base is None else base)
        preload = env.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{shim_path()} {preload}".strip()
        env["PYVIRTIO_FAULTS_DIR"] = str(self.dir)
        return env

    def arm(self, call: str, err: int, count: int = 1) -> None:
        """Fail the next ``count`` calls of ``call`` with ``err`` (-1: all of them)."""
        if call not in CALLS:
            raise ValueError(f"the shim cannot fail {call!r}; it knows {sorted(CALLS)}")
        tmp = self.dir / f".{call}.tmp"
        tmp.write_text(f"{err} {count}\n")
        os.replace(tmp, self.dir / call)

    def disarm(self, call: str) -> None:
        (self.dir / call).unlink(missing_ok=True)

    def armed(self, call: str) -> bool:
        """Whether failures of ``call`` are still pending (a one-shot fault that fired
        is no longer armed)."""
        return (self.dir / call).exists()
