"""Thin KVM ioctl layer: ``fcntl.ioctl`` + :mod:`struct`, no compiled code."""

from __future__ import annotations

import errno
import fcntl
import os

from emulator.kvm import abi

__all__ = ["KvmError", "KvmUnavailable", "abi", "ioctl", "open_kvm"]

KVM_DEVICE = "/dev/kvm"


class KvmError(OSError):
    """An ioctl on /dev/kvm or a VM/vCPU fd failed."""


class KvmUnavailable(RuntimeError):
    """/dev/kvm is absent, not accessible, or not usable for our guests (reason in str())."""


def ioctl(
    fd: int,
    request: int,
    arg: int | bytes | bytearray = 0,
    name: str = "",
    retry_eintr: bool = True,
) -> int | bytes:
    """``fcntl.ioctl`` raising :class:`KvmError` naming the ioctl.

    EINTR is retried unless ``retry_eintr`` is false (then InterruptedError propagates:
    KVM_RUN uses that to come back to Python when a signal arrives).
    """
    while True:
        try:
            if isinstance(arg, bytearray):
                return fcntl.ioctl(fd, request, arg, True)
            return fcntl.ioctl(fd, request, arg)
        except InterruptedError:
            if retry_eintr:
                continue
            raise
        except OSError as exc:
            raise KvmError(exc.errno, f"{name or hex(request)}: {os.strerror(exc.errno)}") from exc


def open_kvm(path: str = KVM_DEVICE) -> int:
    """Open /dev/kvm and check KVM_GET_API_VERSION; return the system fd."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise KvmUnavailable(f"{path} does not exist") from exc
    except PermissionError as exc:
        raise KvmUnavailable(f"{path}: permission denied") from exc
    except OSError as exc:
        raise KvmUnavailable(f"{path}: {os.strerror(exc.errno or errno.EIO)}") from exc
    version = ioctl(fd, abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
    if version != abi.KVM_API_VERSION:
        os.close(fd)
        raise KvmUnavailable(f"KVM_GET_API_VERSION returned {version}, need {abi.KVM_API_VERSION}")
    return fd
