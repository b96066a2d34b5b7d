"""Build the freestanding guest programs in ``guest-drivers/`` with the system gcc.

Outputs go to ``guest-drivers/build/`` (gitignored) when that is writable, else to
``$XDG_CACHE_HOME/pyvirtio/guest``.  A build is reused while a hash of the sources,
flags and compiler version is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest-drivers"
CC = os.environ.get("PYVIRTIO_GUEST_CC", "gcc")

CFLAGS = [
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mcmodel=small",
    "-nostdlib",
    "-nostartfiles",
    "-static",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,--no-warn-rwx-segments",
]

# program name -> C sources (the runtime is always added)
PROGRAMS = {
    "ide": ["ide.c"],
    "virtio_blk": ["virtio_blk.c"],
    "virtio_rng": ["virtio_rng.c"],
    "ne2000": ["ne2000.c"],
    "virtio_net": ["virtio_net.c"],
    "virtio_input": ["virtio_input.c"],
}
RUNTIME = ["runtime.c"]
HEADERS = [
    "runtime.h",
    "ata.h",
    "dp8390.h",
    "virtio_mmio.h",
    "virtio_pci.h",
    "virtio_dev.h",
    "virtqueue.h",
    "include/pyvirtio.h",
    "../spec/virtio_spec.h",
    "link.ld",
]
INCLUDE_DIR = GUEST_DIR / "include"
TEMPLATES_DIR = GUEST_DIR / "templates"


class GuestBuildError(RuntimeError):
    """gcc is missing or failed; the message carries its output."""


def _build_dir() -> Path:
    d = GUEST_DIR / "build"
    try:
        d.mkdir(exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    d = base / "pyvirtio" / "guest"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _digest(sources: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(" ".join([CC, *CFLAGS]).encode())
    try:
        h.update(subprocess.run([CC, "--version"], capture_output=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise GuestBuildError(f"guest compiler {CC!r} not usable: {exc}") from exc
    for p in sources:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(program: str) -> Path:
    """Compile ``program`` (a key of :data:`PROGRAMS`) if needed; return the ELF path."""
    if program not in PROGRAMS:
        raise KeyError(f"unknown guest program {program!r}; known: {sorted(PROGRAMS)}")
    if shutil.which(CC) is None:
        raise GuestBuildError(f"guest compiler {CC!r} not found")
    srcs = [GUEST_DIR / s for s in [*RUNTIME, *PROGRAMS[program]]]
    deps = srcs + [GUEST_DIR / h for h in HEADERS]
    out_dir = _build_dir()
    out = out_dir / f"{program}-{_digest(deps)}.elf"
    if out.exists():
        return out
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    cmd = [CC, *CFLAGS, "-T", str(GUEST_DIR / "link.ld"), "-o", str(tmp), *map(str, srcs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, out)
    return out


# The Multiboot stub that runs a guest program in QEMU (bench/qemu_ne2000_exits.py):
# 32-bit code, linked by its own script and flattened with objcopy.
STUB_SOURCES = ["qemu_boot.c", "qemu_boot.ld"]
STUB_CFLAGS = [
    "-m32",
    *(f for f in CFLAGS if f not in ("-mcmodel=small", "-mno-red-zone")),
]
OBJCOPY = os.environ.get("PYVIRTIO_GUEST_OBJCOPY", "objcopy")


def build_qemu_stub() -> Path:
    """Compile ``guest-drivers/qemu_boot.c`` into a flat Multiboot image; return its path."""
    if shutil.which(CC) is None or shutil.which(OBJCOPY) is None:
        raise GuestBuildError(f"{CC!r} and {OBJCOPY!r} are needed for the QEMU boot stub")
    srcs = [GUEST_DIR / s for s in STUB_SOURCES]
    out = _build_dir() / f"qemu_boot-{_digest(srcs)}.bin"
    if out.exists():
        return out
    elf = out.with_suffix(f".elf.tmp{os.getpid()}")
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    for cmd in (
        [CC, *STUB_CFLAGS, "-T", str(srcs[1]), "-o", str(elf), str(srcs[0])],
        [OBJCOPY, "-O", "binary", str(elf), str(tmp)],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise GuestBuildError(f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    elf.unlink()
    os.replace(tmp, out)
    return out


def build_source(source: str | os.PathLike) -> Path:
    """Compile a user's guest program (one C file) against the runtime and the guest
    ABI header (``-I guest-drivers/include``: ``#include <pyvirtio.h>``); cached like
    :func:`build`.  Raises ``GuestBuildError`` with gcc's output on failure."""
    src = Path(source).resolve()
    if shutil.which(CC) is None:
        raise GuestBuildError(f"guest compiler {CC!r} not found")
    srcs = [GUEST_DIR / s for s in RUNTIME] + [src]
    deps = srcs + [GUEST_DIR / h for h in HEADERS]
    out = _build_dir() / f"{src.stem}-{_digest(deps)}.elf"
    if out.exists():
        return out
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    # -Wno-unused-function: pyvirtio.h hands every program all of its static helpers.
    cmd = [CC, *CFLAGS, "-Wno-unused-function", "-I", str(INCLUDE_DIR)]
    cmd += ["-T", str(GUEST_DIR / "link.ld")]
    cmd += ["-o", str(tmp), *map(str, srcs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, out)
    return out


def main() -> None:  # pragma: no cover - convenience
    for name in PROGRAMS:
        print(build(name))


if __name__ == "__main__":  # pragma: no cover
    main()
