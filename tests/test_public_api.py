"""The public surface of ``virtio`` (trio's test_exports idea): every exported name
resolves, is the object its defining module has, and nothing private leaks."""

from __future__ import annotations

import importlib
import subprocess
import sys

import virtio

EXPECTED = {
    "ActiveDevice", "BackendIOError", "BufferQueue", "BytearrayGuestMemory", "ChainReader",
    "ChainWriter", "ConfigAccessError", "ConfigLayout", "DeviceNeedsReset", "QueueRole",
    "DescriptorChain", "DescriptorChainError", "DeviceUsageError", "Disconnected",
    "DriverError", "FdRegion", "GuestMemory", "GuestMemoryError", "InvalidAvailIdx",
    "MemoryRegion", "MmapGuestMemory", "QueueBrokenError", "QueueConfig", "QueueConfigError",
    "QueueNotifier", "QueueState", "VirtioDevice", "VirtioError", "Virtqueue",
}  # fmt: skip


def test_exports_are_exactly_the_public_api():
    public = {n for n in vars(virtio) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(virtio, n)).__name__ == "module"}
    assert public - modules == EXPECTED


def test_exports_are_the_defining_objects():
    for name in EXPECTED:
        obj = getattr(virtio, name)
        home = importlib.import_module(obj.__module__)
        assert getattr(home, name) is obj


def test_driver_errors_are_virtio_errors():
    for name in ("DescriptorChainError", "InvalidAvailIdx", "QueueConfigError"):
        assert issubclass(getattr(virtio, name), virtio.DriverError)
    assert issubclass(virtio.DriverError, virtio.VirtioError)


def test_cli_version_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "virtio", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"virtio {virtio.__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "virtio", "--help"], capture_output=True, text=True, check=True
    )
    assert "spec" in out.stdout
