"""Build the native virtqueue core with cffi (API mode).

``python -m virtio.native.build`` compiles ``_vm_native`` next to this file; the
package also builds it on first import when it is missing.  Spec constants are
not written twice: the ``#define`` lines the C code uses are generated here from
``virtio.spec.ring``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = (
    "vm_native.c",
    "stats.c",
    "inflight.c",
    "dataplane.c",
    "aio.c",
    "blk_dataplane.c",
    "nbd_tls.c",
    "nbd_dataplane.c",
    "net_fdb.c",
    "net_dataplane.c",
    "input_deliver.c",
    "hostcalls.c",
)
"""C sources, compiled as one translation unit (in this order)."""
HEADERS = (
    "vm_native.h",
    "inflight.h",
    "dataplane.h",
    "nbd_tls.h",
    "nbd_dataplane.h",
    "net_fdb.h",
    "net_dataplane.h",
    "input_deliver.h",
    "hostcalls.h",
)
"""Headers whose declarations cffi exposes (in this order)."""
PRIVATE_HEADERS = ("faultfile.h",)
"""Headers the C sources include that cffi does not see (static inline code)."""


def module_name() -> str:
    """``_vm_native_<hash>``: the hash covers the C sources and the spec defines, so a
    stale build is never imported after a change."""
    digest = hashlib.sha256()
    for name in (*HEADERS, *PRIVATE_HEADERS, *SOURCES, "build.py"):
        digest.update((HERE / name).read_bytes())
    digest.update(spec_defines().encode())
    digest.update(b"uring" if have_liburing() else b"")
    digest.update(b"gnutls" if have_gnutls() else b"")
    return "_vm_native_" + digest.hexdigest()[:12]


def have_liburing() -> bool:
    """Whether liburing's header and library are installed (Debian: liburing-dev);
    without them the data planes use worker threads only."""
    from ctypes.util import find_library

    return Path("/usr/include/liburing.h").exists() and find_library("uring") is not None


def have_gnutls() -> bool:
    """Whether GnuTLS's headers and library are installed (Debian: libgnutls28-dev);
    without them ``nbds://`` disks are served by Python only."""
    from ctypes.util import find_library

    return Path("/usr/include/gnutls/gnutls.h").exists() and find_library("gnutls") is not None


def spec_defines() -> str:
    """``#define`` lines for every ring constant the C core uses (from virtio.spec.ring)."""
    from virtio.spec import blk, ring

    lines = []
    for enum_name in ("VringDescFlag", "VringAvailFlag", "VringUsedFlag", "PackedDescFlag"):
        for member in getattr(ring, enum_name):
            lines.append(f"#define {member.name} {int(member)}u")
    for member in ring.PackedEventFlag:
        lines.append(f"#define {member.name} {int(member)}u")
    lines.append(f"#define VRING_PACKED_EVENT_F_WRAP_CTR {ring.VRING_PACKED_EVENT_F_WRAP_CTR}")
    from virtio.spec.features import TransportFeature

    lines.append(f"#define VIRTIO_F_RING_PACKED_BIT {int(TransportFeature.VIRTIO_F_RING_PACKED)}")
    for member in (*blk.BlkReqType, *blk.BlkStatus):
        lines.append(f"#define {member.name} {int(member)}u")
    # A name may appear in two enums (packed reuses NEXT/WRITE/INDIRECT): keep the first.
    seen: set[str] = set()
    unique = []
    for line in lines:
        name = line.split()[1]
        if name not in seen:
            seen.add(name)
            unique.append(line)
    return "\n".join(unique)


def cdef_text() -> str:
    header = "\n".join((HERE / name).read_text() for name in HEADERS)
    header = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    # Keep integer #defines (cffi exposes them as constants); drop other directives.
    header = "\n".join(
        line
        for line in header.splitlines()
        if not line.startswith("#") or re.fullmatch(r"#define \w+ \d+", line.strip())
    )
    return header


def make_ffi(tmpdir: Path | None = None) -> FFI:
    ffi = FFI()
    ffi.cdef(cdef_text())
    source = "\n".join((HERE / name).read_text() for name in SOURCES)
    source = source.replace("/* VM_SPEC_DEFINES */", spec_defines())
    ffi.set_source(
        f"virtio.native.{module_name()}",
        source,
        include_dirs=[str(HERE)],
        libraries=["uring"] * have_liburing() + ["gnutls"] * have_gnutls(),
        define_macros=[("_GNU_SOURCE", None)]
        + [("HAVE_LIBURING", None)] * have_liburing()
        + [("HAVE_GNUTLS", None)] * have_gnutls(),
        # -fno-semantic-interposition: calls between the module's own exported
        # functions (vm_store_release_u16, vq_pop_batch_u, ...) are direct and may be
        # inlined instead of going through the PLT on every descriptor.
        extra_compile_args=[
            "-O2",
            "-std=gnu11",
            "-fno-semantic-interposition",
            "-Wall",
            "-Wextra",
            "-Wno-unused-parameter",
        ],
    )
    return ffi


def build(target_dir: Path = HERE) -> Path:
    """Compile the module into ``target_dir``; returns the path of the shared object.

    Compiles in a scratch directory (so setuptools never reads the project's
    pyproject.toml) and moves the result into place atomically.
    """
    ffi = make_ffi()
    with tempfile.TemporaryDirectory(prefix="pyvirtio-build-") as tmp:
        built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / built.name
        staging = target.with_suffix(f".{os.getpid()}.tmp")
        shutil.copy2(built, staging)
        os.replace(staging, target)
    return target


if __name__ == "__main__":
    print(build(), file=sys.stderr)
