"""The disk behind the blk workload paths: one place for its setup and its check.

Every virtio-blk workload path (``virtio-mmio*``, ``virtio-pci*``, the vhost-user
ones) writes the same pattern (``run.expected_sector``) through its own transport;
this module makes the disk it writes to and checks what reached it.
"""

from __future__ import annotations

import os

from emulator import run as _run
from emulator.machine import Machine
from virtio.devices.blk import BlkOptions, MemoryBackend, RawFileBackend, VirtioBlk

SLACK = 1 << 20
"""Bytes past the workload's own, so the disk is never exactly the size of the pattern."""


def disk_size(spec: _run.WorkloadSpec) -> int:
    return spec.total_bytes + SLACK


def ensure_image(path: str, size: int) -> None:
    """Create ``path`` if missing and grow it to ``size`` bytes (never shrink)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def workload_blk(
    m: Machine, spec: _run.WorkloadSpec, *, queue_size: int, serial: str
) -> tuple[VirtioBlk, MemoryBackend | RawFileBackend]:
    """The in-VMM ``VirtioBlk`` of a workload: in memory, or on ``spec.image``."""
    size = disk_size(spec)
    backend: MemoryBackend | RawFileBackend
    if spec.image is None:
        backend = MemoryBackend(size)
    else:
        ensure_image(spec.image, size)
        backend = RawFileBackend(spec.image)
    m.closers.append(backend.close)
    return VirtioBlk(backend, BlkOptions(queue_size=queue_size, serial=serial)), backend


def written_bytes(spec: _run.WorkloadSpec) -> int:
    return spec.nreqs * _run.REQUEST_BYTES


def read_disk(backend: MemoryBackend | RawFileBackend, length: int) -> bytes:
    if isinstance(backend, MemoryBackend):
        return bytes(backend.data[:length])
    return os.pread(backend.fd, length, 0)


def read_image(path: str, length: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(length)


def disk_ok(data: bytes, spec: _run.WorkloadSpec) -> bool:
    """True when ``data`` holds the workload's pattern in every sector it wrote."""
    return all(
        data[lba * 512 : (lba + 1) * 512] == _run.expected_sector(lba, spec.seed)
        for lba in range(written_bytes(spec) // 512)
    )
