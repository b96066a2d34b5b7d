"""Exception hierarchy.

``DriverError`` and its subclasses mean the *other side* (a guest driver or a
vhost-user frontend) broke the spec: untrusted input.  Each carries the spec
section (``section``) it violated.  ``DeviceUsageError`` means our own code
misused an API.  After a ``DriverError`` the queue or device that raised it is
broken (device status NEEDS_RESET, spec §2.1) until it is reset.
"""

from __future__ import annotations

from virtio.spec._base import Section
from virtio.spec.sections import S_2_7_6, S_2_7_6_1


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

    Cite the clause with a ``Section`` of the index (``virtio.spec.sections``):
    ``spec_section`` keeps it and ``section`` is its citation text,
    ``"2.7.5.2 [drivernormative:...]"``.  Where no normative clause covers the
    fault, cite the informative section that describes the structure: the message
    then says that no normative clause applies.  (A plain string is still
    accepted as ``section`` and kept as it is, for callers not yet converted.)
    """

    section: str = ""
    spec_section: Section | None = None

    def __init__(self, message: str, *, section: Section | str | None = None) -> None:
        if isinstance(section, Section):
            self.spec_section = section
            self.section = section.citation
        elif section is not None:
            self.section = section
        elif self.spec_section is not None:
            self.section = self.spec_section.citation
        self.message = message
        super().__init__(message + self._suffix())

    def _suffix(self) -> str:
        s = self.spec_section
        if s is None:
            return f" (virtio 1.4 §{self.section})" if self.section else ""
        if s.normative:
            return f" (virtio {s.version} §{s.citation})"
        return (
            f" (no normative clause names this fault; see virtio {s.version} §{s.number} {s.title})"
        )


class QueueConfigError(DriverError):
    """Queue size, ring alignment or ring placement is invalid (§2.7, §2.8, §4.x)."""


class InvalidAvailIdx(DriverError):
    """The driver moved avail idx by more than the queue size.

    No normative clause forbids that jump as such (§2.7.6.1 forbids decrementing
    idx, which a jump may be in disguise); §2.7.6 describes idx as the place of the
    next entry of a ring of queue-size entries.
    """

    spec_section = S_2_7_6

    def __init__(
        self,
        queue_size: int,
        reported_len: int,
        avail_idx: int | None = None,
        last_avail_idx: int | None = None,
    ) -> None:
        self.queue_size = queue_size
        self.reported_len = reported_len
        self.avail_idx = avail_idx
        self.last_avail_idx = last_avail_idx
        seen = (
            f" (avail idx {avail_idx:#06x}, the device's next {last_avail_idx:#06x})"
            if avail_idx is not None and last_avail_idx is not None
            else ""
        )
        super().__init__(
            f"avail idx moved by {reported_len} entries, more than the queue size {queue_size}"
            f"{seen} (a jump; a decrement would break §{S_2_7_6_1.number})"
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


class FeaturesRefused(VirtioError):
    """The device does not accept the feature set the driver chose: FEATURES_OK stays
    clear (§3.1.1 step 6, §2.2.2 "the device MAY ... fail FEATURES_OK").  Not a driver
    error: the driver reads Status back and copes."""


class DeviceUsageError(VirtioError):
    """Our own code misused an API (a local bug, not the driver's fault)."""


class BackendIOError(VirtioError):
    """The storage or network backend of a device failed."""


class Disconnected(VirtioError):
    """The peer (vhost-user frontend, NBD server, ...) went away."""
