"""Fixtures for tests that boot a QEMU guest (see virtio.testing.qemu)."""

from __future__ import annotations

import shutil

import pytest

from virtio.testing.blk_checks import BackendStarter, start_qemu_storage_daemon
from virtio.testing.guest_image import GuestImage, GuestImageUnavailable, ensure_image
from virtio.testing.qemu import (
    QEMU_VERSIONS,
    QemuBinary,
    QemuUnavailable,
    check_prerequisites,
    qemu_binary,
)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The cached guest kernel + initramfs, built on first use (~15 s, needs apt lists).

    Skips only when QEMU or the image tooling (apt/dpkg/kmod/busybox-static) is
    absent; any other build failure is an error.  ``./setup.sh`` installs all of it.
    """
    try:
        check_prerequisites()
    except QemuUnavailable as e:
        pytest.skip(f"QEMU unavailable: {e}")
    try:
        image = ensure_image()
    except GuestImageUnavailable as e:
        pytest.skip(f"guest image cannot be built here: {e}")
    try:
        check_prerequisites(image)
    except QemuUnavailable as e:
        pytest.skip(f"QEMU unavailable: {e}")
    return image


@pytest.fixture(scope="session")
def reference_blk_backend() -> BackendStarter:
    """Starter for the reference vhost-user-blk backend, qemu-storage-daemon."""
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon not found (Debian package qemu-system-common)")
    return start_qemu_storage_daemon


@pytest.fixture(params=QEMU_VERSIONS, ids=[f"qemu{v}" for v in QEMU_VERSIONS])
def qemu(request) -> QemuBinary:
    """Each QEMU version the project tests (7.2 from Debian 12, 10.0 from bookworm-backports,
    unpacked by ``./setup.sh``); a test taking this fixture runs once per version."""
    try:
        return qemu_binary(request.param)
    except QemuUnavailable as e:
        pytest.skip(f"QEMU {request.param} unavailable: {e}")
