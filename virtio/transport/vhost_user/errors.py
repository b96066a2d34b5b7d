"""Errors a vhost-user front-end can cause (all of them ``DriverError``: untrusted input).

Every error names the section of the vhost-user specification
(QEMU ``docs/interop/vhost-user.rst``) it violates in ``section``, e.g.
``"vhost-user: Front-end message types / VHOST_USER_SET_MEM_TABLE"``.

Two kinds, and ``BackendConnection`` treats them differently:

* *framing* errors (``OversizedMessage``, a bad header, ``PartialMessage``, fds that belong
  to no message): the byte stream can no longer be split into messages.  ``next_event()``
  raises them and the connection is dead (state ``ERROR``).
* *message* errors (``UnknownRequest``, ``ProtocolFeatureNotNegotiated``, ``IncorrectFds``,
  a payload of the wrong size or shape): the message was framed correctly and skipped.
  ``next_event()`` returns them inside a ``RejectedRequest`` event; the connection goes on.
"""

from __future__ import annotations

from virtio.errors import DriverError

SPEC = "vhost-user"
"""Prefix of every ``section``: the spec is QEMU's ``docs/interop/vhost-user.rst``."""


def spec_section(*parts: str) -> str:
    """``spec_section("Header")`` -> ``"vhost-user: Header"``; parts are joined by ``/``."""
    return f"{SPEC}: " + " / ".join(parts)


def request_section(name: str) -> str:
    """The section describing front-end request ``name`` (``"SET_MEM_TABLE"``)."""
    return spec_section("Front-end message types", f"VHOST_USER_{name}")


class VhostUserProtocolError(DriverError):
    """The vhost-user front-end broke the protocol.

    ``request`` is the request number of the offending message when it is known
    (an ``int``, or the ``FrontendRequest`` member), else ``None``.
    """

    section = spec_section("Message Specification")

    def __init__(
        self, message: str, *, request: int | None = None, section: str | None = None
    ) -> None:
        if section is not None:
            self.section = section
        self.message = message
        self.request = request
        # DriverError.__init__ would cite "virtio 1.4 §...": cite the vhost-user spec instead.
        super(DriverError, self).__init__(f"{message} ({self.section})")


class InvalidMessage(VhostUserProtocolError):
    """A header or payload is malformed: bad version, REPLY flag on a request, a field out
    of range, or a protocol-feature combination the spec forbids."""


class PayloadSizeMismatch(InvalidMessage):
    """The header's ``size`` does not match what the request's payload must be.

    ``expected`` describes the accepted sizes (``"8"``, ``"8..264"``, ``"8 + 32 * 2"``).
    """

    def __init__(
        self, request: int, size: int, expected: str, *, section: str | None = None
    ) -> None:
        self.size = size
        self.expected = expected
        name = getattr(request, "name", str(request))
        super().__init__(
            f"{name}: payload of {size} bytes, expected {expected}",
            request=request,
            section=section,
        )


class IncorrectFds(VhostUserProtocolError):
    """A message came with the wrong number of file descriptors (``received``), or with
    descriptors that cannot belong to any message.  ``expected`` describes the rule.

    The connection closes the descriptors of a rejected message itself.
    """

    section = spec_section("Communication")

    def __init__(
        self,
        message: str,
        *,
        request: int | None = None,
        expected: str = "",
        received: int = 0,
        section: str | None = None,
    ) -> None:
        self.expected = expected
        self.received = received
        super().__init__(message, request=request, section=section)


class OversizedMessage(VhostUserProtocolError):
    """The header announces a payload larger than ``max_size``: the stream cannot be
    re-synchronised, so the connection is dead."""

    section = spec_section("Message Specification", "Header")

    def __init__(self, request: int, size: int, max_size: int) -> None:
        self.size = size
        self.max_size = max_size
        super().__init__(
            f"request {request}: payload of {size} bytes exceeds the limit of {max_size}",
            request=request,
        )


class UnknownRequest(VhostUserProtocolError):
    """The request number is not a front-end message type of the spec."""

    section = spec_section("Front-end message types")

    def __init__(self, request: int) -> None:
        super().__init__(f"unknown front-end request {request}", request=request)


class ProtocolFeatureNotNegotiated(VhostUserProtocolError):
    """A request was sent although the protocol feature gating it was not negotiated.

    ``feature`` is the ``ProtocolFeature`` member, or ``None`` when the gate is the
    ``VHOST_USER_F_PROTOCOL_FEATURES`` virtio feature bit (30) itself.
    """

    def __init__(self, request: int, feature: int | None, *, section: str | None = None) -> None:
        self.feature = feature
        name = getattr(request, "name", str(request))
        gate = (
            "VHOST_USER_F_PROTOCOL_FEATURES (bit 30) in GET_FEATURES"
            if feature is None
            else f"protocol feature {getattr(feature, 'name', feature)}"
        )
        super().__init__(f"{name} needs {gate}, not negotiated", request=request, section=section)


class PartialMessage(VhostUserProtocolError):
    """The front-end closed the connection in the middle of a message.

    ``received`` bytes of the message had arrived; ``expected`` is the full message size
    if the header was complete, else ``None``.
    """

    section = spec_section("Communication")

    def __init__(self, received: int, expected: int | None) -> None:
        self.received = received
        self.expected = expected
        of = f" of {expected}" if expected is not None else ""
        super().__init__(f"connection closed after {received}{of} bytes of a message")
