"""Image format probing: never serve an image under the wrong format.

A qcow2 (or VMDK, LUKS, ...) file served as a raw disk shows the guest its
metadata, and the guest's first ``mkfs`` destroys it.  QEMU probes the format and
warns; ``virtio serve blk`` refuses instead: without ``--format``, an image whose
first bytes carry a known format's magic is not served (one clear line names the
format found and the flag to use).  ``--format raw`` is the user saying "I know".

The probed-raw hazard (QEMU's ``raw_check_write``): when the format was *probed*
as raw, a guest could write another format's header into sector 0, and the next
start would read the disk as that format -- with the host file names and backing
files the guest chose.  So on a probed raw image a write to sector 0 whose data
would probe as another format is refused (VIRTIO_BLK_S_IOERR, logged); with an
explicit ``--format raw`` it is allowed, as in QEMU.

The magic numbers come from each format's own specification (qcow2: QEMU's
``docs/interop/qcow2.rst``; QED, VMDK, VDI, VHDX, VHD, LUKS, Parallels, Bochs,
cloop, DMG from their published layouts); ``tests/devices/blk/test_blk_probe.py``
checks them against images made by ``qemu-img create``.
"""

from __future__ import annotations

import os
import struct

from virtio.errors import BackendIOError

SECTOR = 512
PROBE_BYTES = SECTOR
"""Every format recognised here says so in its first sector (DMG: in its last)."""

FORMATS = ("raw", "qcow2")
"""What ``--format`` accepts."""
SERVED = frozenset({"raw", "qcow2"})
"""Formats with a backend (qcow2: ``virtio/devices/blk/qcow2/``)."""


class ImageFormatError(BackendIOError):
    """The image cannot be served as asked: it is another format, or its size is
    not a whole number of sectors."""


def probe(head: bytes, *, tail: bytes = b"", name: str = "") -> str | None:
    """The format whose magic ``head`` (the image's first bytes) carries, or None.

    ``tail`` (the last 512 bytes) and ``name`` are only used for DMG, which QEMU
    also recognises only by a ``.dmg`` name plus its trailer."""
    if head[:4] == b"QFI\xfb" and len(head) >= 8:
        (version,) = struct.unpack_from(">I", head, 4)
        return "qcow" if version == 1 else "qcow2"
    if head[:4] == b"QED\x00":
        return "qed"
    if head[:4] in (b"KDMV", b"COWD") or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == 0xBEDA107F:
        return "vdi"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix":
        return "vpc"
    if head[:6] == b"LUKS\xba\xbe":
        return "luks"
    if head[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"):
        return "parallels"
    if head.startswith(b"Bochs Virtual HD Image"):
        return "bochs"
    if head.startswith(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0"):
        return "cloop"
    if name.endswith(".dmg") and tail[:4] == b"koly":
        return "dmg"
    return None


def check_image(path: str | os.PathLike[str], fmt: str | None, *, force: bool = False) -> str:
    """Decide how ``path`` is served; return the format ("raw" or "qcow2").

    ``fmt`` is ``--format`` (None: probe).  Raises ``ImageFormatError`` for an
    image that carries another format's magic when none was given, a ``--format``
    we cannot serve or that the image does not carry (qcow2), or a raw image whose
    size is not a multiple of 512 bytes (unless ``force``: its trailing partial
    sector is then not exposed)."""
    path = os.fspath(path)
    if fmt is not None and fmt not in FORMATS:
        raise ImageFormatError(f"unknown --format {fmt!r} (use one of: {', '.join(FORMATS)})")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        head = os.pread(fd, PROBE_BYTES, 0)
        tail = os.pread(fd, SECTOR, size - SECTOR) if size >= SECTOR else b""
    finally:
        os.close(fd)
    convert = f"'qemu-img convert -O raw {path} DISK.raw' and serve that"
    if fmt is not None and fmt not in SERVED:
        raise ImageFormatError(f"{path}: {fmt} images are not served yet; use {convert}")
    found = probe(head, tail=tail, name=path)
    if fmt == "qcow2":
        if found != "qcow2":
            raise ImageFormatError(f"{path} is not a qcow2 image ({found or 'no known magic'})")
        return "qcow2"
    if fmt is None and found is not None:
        hint = f"--format {found}" if found in SERVED else convert
        raise ImageFormatError(
            f"{path} is a {found} image, not a raw disk: refusing to serve it as raw "
            f"(the guest would overwrite its metadata); use {hint}, or --format raw if "
            f"the guest really owns these bytes"
        )
    if size % SECTOR and not force:
        raise ImageFormatError(
            f"{path}: size {size} is not a multiple of {SECTOR} bytes (is it really a "
            f"raw disk?); --force serves it without its last {size % SECTOR} bytes"
        )
    return "raw"


def write_would_change_format(sector: int, first_sector: bytes) -> str | None:
    """For a probed raw image: the format a write of ``first_sector`` (the data
    written at ``sector``) would make the image look like, or None."""
    if sector != 0:
        return None
    return probe(first_sector[:PROBE_BYTES])
