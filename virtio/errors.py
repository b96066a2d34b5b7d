"""Exception hierarchy.

``DriverError`` and its subclasses mean the *other side* (a guest driver or a
vhost-user frontend) broke the spec: untrusted input.  Each carries the spec
section (``section``) it violated.  ``DeviceUsageError`` means our own code
misused an API.  After a ``DriverError`` the queue or device that raised it is
broken (device status NEEDS_RESET, spec §2.1) until it is reset.
"""

from __future__ import annotations


class VirtioError(Exception):
    """Base class of every error this package raises on purpose."""


class GuestMemoryError(VirtioError):
    """A guest-physical range is not (entirely) backed by guest memory.

    Raised for ranges that fall in a gap, cross from a region into a gap, or wrap
    around the 64-bit address space.
    """

    def __init__(self, addr: int, length: int, reason: str = "not inside guest memory") -> None:
        self.addr = addr
        self.length = length
        self.reason = reason
        super().__init__(f"guest range [{addr:#x}, +{length:#x}) {reason}")


class DriverError(VirtioError):
    """The driver (guest or frontend) broke the spec.

    ``section`` names the spec clause, e.g. ``"2.7.5.3.1"`` or a normative label.
    """

    section: str = ""

    def __init__(self, message: str, *, section: str | None = None) -> None:
        if section is not None:
            self.section = section
        self.message = message
        suffix = f" (virtio 1.4 §{self.section})" if self.section else ""
        super().__init__(message + suffix)


class QueueConfigError(DriverError):
    """Queue size, ring alignment or ring placement is invalid (§2.7, §2.8, §4.x)."""


class InvalidAvailIdx(DriverError):
    """The driver moved avail idx by more than the queue size (§2.7.6)."""

    section = "2.7.13.3"

    def __init__(self, queue_size: int, reported_len: int) -> None:
        self.queue_size = queue_size
        self.reported_len = reported_len
        super().__init__(
            f"avail idx moved by {reported_len} entries, more than the queue size {queue_size}"
        )


class DescriptorChainError(DriverError):
    """A descriptor chain is malformed: bad index, loop, too long, bad indirect table."""


class QueueBrokenError(VirtioError):
    """An operation was attempted on a queue that hit a ``DriverError`` earlier.

    The device must be reset (status NEEDS_RESET, §2.1.2) before the queue works again.
    """

    def __init__(self, cause: DriverError | None) -> None:
        self.cause = cause
        super().__init__(f"virtqueue is broken and needs a device reset: {cause}")


class DeviceUsageError(VirtioError):
    """Our own code misused an API (a local bug, not the driver's fault)."""


class BackendIOError(VirtioError):
    """The storage or network backend of a device failed."""


class Disconnected(VirtioError):
    """The peer (vhost-user frontend, NBD server, ...) went away."""
