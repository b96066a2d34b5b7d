"""Fixtures for tests that boot a QEMU guest (see virtio.testing.qemu)."""

from __future__ import annotations

import shutil

import pytest

from virtio.testing.blk_checks import BackendStarter, start_qemu_storage_daemon
from virtio.testing.guest_image import GuestImage, GuestImageUnavailable, ensure_image
from virtio.testing.qemu import QemuUnavailable, check_prerequisites


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
