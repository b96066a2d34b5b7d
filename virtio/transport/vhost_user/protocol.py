"""Sans-IO vhost-user back-end connection (h11 style): bytes and fds in, events out.

::

    conn = BackendConnection(max_queues=2)
    conn.receive_data(data, fds)          # what recvmsg() returned; b"" = end of file
    while (event := conn.next_event()) is not NEED_DATA:
        if isinstance(event, ConnectionClosed): ...
        elif isinstance(event, RejectedRequest):
            out = conn.reject(event)      # failure reply, or None: close the socket
        else:                             # Request
            out = conn.send_reply(event, payload) / conn.ack(event, success)
        sock.sendmsg(out.data, out.fds)

What the connection does: framing (split the byte stream into messages, attach fds),
the size limit, header checks, per-request payload size, payload *shape* (field ranges
that need no device knowledge, vring indices below ``max_queues``), fd counts,
protocol-feature gating, and reply bookkeeping (which requests owe a reply, in order).

What it does not do (the handler's job): anything that needs the device or guest memory,
e.g. whether a vring size is a power of 2 (packed queues allow any size), whether
memory regions overlap or addresses are mapped, config offsets against the device's
config size, which virtio features may be acked.

Errors.  Framing errors (``OversizedMessage``, a header of another version, fds that
belong to no message, ``PartialMessage`` at end of file) raise from ``next_event()`` and
put the connection in state ``ERROR``: every later call raises ``DeviceUsageError``.
A correctly framed message that is wrong in itself (``UnknownRequest``,
``ProtocolFeatureNotNegotiated``, ``IncorrectFds``, ``InvalidMessage``) comes out as a
``RejectedRequest`` event; its fds are already closed, and the connection goes on.

File descriptors.  fds passed to ``receive_data`` belong to the message that contains the
*last byte* of that chunk (Linux returns the bytes of an SCM_RIGHTS message's first
``sendmsg`` no later than its fds, and ends the ``recvmsg`` there).  A delivered
``Request`` hands its fds to the caller, who must close them.  The connection closes the
fds of rejected messages, the one tolerated fd of REM_MEM_REG, fds that arrive with end of
file, and everything still buffered on ``close()`` or on a fatal error.

Spec decisions (see also ``messages.py``):

* Unknown request numbers: the spec says nothing; the message is skipped and reported
  (``RejectedRequest`` with ``UnknownRequest``).  ``reject()`` acks failure if NEED_REPLY
  is set ("the back-end MUST respond ... indicating success or failure"); otherwise
  nothing is sent (we cannot know what reply an unknown request wants).
* NEED_REPLY is honoured whenever it is set, even if REPLY_ACK was not negotiated: QEMU
  sets it unconditionally on POSTCOPY_LISTEN and waits, and libvhost-user acks any
  NEED_REPLY.  A request that already has an explicit reply gets only that reply
  ("the presence of REPLY_ACK or need_reply bit being set brings no behavioural change").
* Gating: GET/SET_PROTOCOL_FEATURES and SET_VRING_ENABLE need bit 30 in *our*
  GET_FEATURES reply (QEMU sends them before SET_FEATURES); everything else needs its
  protocol feature in the last SET_PROTOCOL_FEATURES.  SET_PROTOCOL_FEATURES must be a
  subset of our GET_PROTOCOL_FEATURES reply.  INBAND_NOTIFICATIONS without BACKEND_REQ and
  REPLY_ACK is fatal (the spec: "the back-end should close the connection").
* Postcopy: between POSTCOPY_LISTEN and POSTCOPY_END, SET_MEM_TABLE and ADD_MEM_REG have
  an explicit reply (the mapped bases), and QEMU's u64 acknowledgement of that reply comes
  back as a ``Request`` with a ``U64`` payload and nothing to answer (``POSTCOPY_ACKS``).
* Reserved fields (``num`` of GET_VRING_BASE / VRING_KICK, unknown header flag bits
  4-31) are ignored, not rejected.
* RESET_OWNER / RESET_DEVICE do not reset the negotiated features here (libvhost-user
  keeps them too); the handler resets the device.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from virtio.errors import DeviceUsageError

from .errors import (
    IncorrectFds,
    InvalidMessage,
    OversizedMessage,
    PartialMessage,
    PayloadSizeMismatch,
    ProtocolFeatureNotNegotiated,
    UnknownRequest,
    VhostUserProtocolError,
    spec_section,
)
from .messages import (
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    REQUESTS,
    STATUS_REPLIES,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_NOFD_MASK,
    DecodeContext,
    FdRule,
    FrontendRequest,
    HeaderFlags,
    MemoryTable,
    Payload,
    ProtocolFeature,
    ReplyRule,
    RequestSpec,
    VringFd,
    encode_ack,
    encode_reply,
    payload_bytes,
)


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Literal[Sentinel.NEED_DATA] = Sentinel.NEED_DATA
"""``next_event()``: no complete message is buffered; call ``receive_data`` first."""


class Reply(enum.Enum):
    """What the front-end waits for after a request."""

    NONE = "none"
    """Nothing: do not send anything."""
    EXPLICIT = "explicit"
    """The request's own reply body: ``send_reply()`` (or ``reject()`` on failure)."""
    ACK = "ack"
    """NEED_REPLY was set: ``ack(event, success)``."""


class ConnectionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"
    """End of file was received and every message was consumed, or ``close()`` was called."""
    ERROR = "error"
    """A framing error: the connection is dead."""


@dataclass(frozen=True, slots=True, eq=False)
class Request:
    """A valid front-end request.

    ``payload`` is the decoded payload dataclass (``None`` for requests without one).
    ``fds`` now belong to the caller.  ``reply`` says what the front-end waits for.
    Events compare by identity: each is one message.
    """

    request: FrontendRequest
    flags: int
    payload: Payload | None
    fds: tuple[int, ...]
    reply: Reply

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)


@dataclass(frozen=True, slots=True, eq=False)
class RejectedRequest:
    """A correctly framed message that was rejected; its fds are already closed.

    ``request`` is the ``FrontendRequest``, or the raw number for unknown requests.
    ``reply`` says what the front-end waits for; ``BackendConnection.reject()`` builds the
    failure reply, if the protocol has one.
    """

    request: FrontendRequest | int
    flags: int
    error: VhostUserProtocolError
    reply: Reply

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The front-end closed the connection cleanly, between messages."""


Event = Request | RejectedRequest | ConnectionClosed


class Outgoing(NamedTuple):
    """Bytes to send, and fds to send with them (SCM_RIGHTS, in one ``sendmsg``).

    The fds stay the caller's: the connection neither dups nor closes them.
    """

    data: bytes
    fds: list[int]


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of ``BackendConnection.statistics()``."""

    state: ConnectionState
    requests: int
    rejected: int
    buffered_bytes: int
    buffered_fds: int
    pending_replies: int


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class MessageFramer:
    """Splits a vhost-user byte stream into messages and attaches their fds.

    Shared by both ends (``BackendConnection``, ``FrontendConnection``): the header
    checks and errors differ, the framing does not.  fds passed to ``feed`` belong to
    the message that contains the *last byte* of that chunk (see the module doc).
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self._buf_start = 0  # stream offset of self.buf[0]
        self._fd_batches: deque[tuple[int, list[int]]] = deque()  # (offset of owner byte, fds)
        self.eof = False

    @property
    def buffered_fds(self) -> int:
        return sum(len(fds) for _, fds in self._fd_batches)

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Add what one ``recvmsg`` returned (``b""``: end of file; fds are then closed)."""
        if not data:
            self.eof = True
            _close_fds(fds)  # on a stream socket fds cannot come without a byte
            return
        self.buf += data
        if fds:
            self._fd_batches.append((self._buf_start + len(self.buf) - 1, list(fds)))

    def header(self) -> tuple[int, int, int] | None:
        """``(request, flags, size)`` of the next message, or ``None`` if incomplete."""
        if len(self.buf) < HEADER_SIZE:
            return None
        return HEADER.unpack_from(self.buf)

    def take(self, size: int) -> tuple[bytes, list[int]] | None:
        """Remove the next message (payload ``size`` bytes): ``(payload, fds)``, or
        ``None`` while it is incomplete."""
        end = HEADER_SIZE + size
        if len(self.buf) < end:
            return None
        payload = bytes(self.buf[HEADER_SIZE:end])
        fds: list[int] = []
        stream_end = self._buf_start + end
        while self._fd_batches and self._fd_batches[0][0] < stream_end:
            fds.extend(self._fd_batches.popleft()[1])
        del self.buf[:end]
        self._buf_start = stream_end
        return payload, fds

    def release(self) -> None:
        """Drop buffered bytes and close buffered fds."""
        while self._fd_batches:
            _close_fds(self._fd_batches.popleft()[1])
        self.buf.clear()


POSTCOPY_ACKS = frozenset(
    {FrontendRequest.SET_MEM_TABLE, FrontendRequest.ADD_MEM_REG, FrontendRequest.REM_MEM_REG}
)
"""In postcopy mode QEMU acknowledges our memory-table reply with one of these requests
carrying a u64 0 and no fds (SET_MEM_TABLE "Note"; with CONFIGURE_MEM_SLOTS it reuses the
request number of its last ADD/REM_MEM_REG).  Delivered as ``Request`` with a ``U64``
payload and nothing to reply."""

_FATAL = spec_section("Message Specification", "Header")


class ConnectionEnd:
    """What both ends of a connection track: its state and the negotiated protocol
    features (the front-end's last SET_PROTOCOL_FEATURES)."""

    _state: ConnectionState
    protocol_features: int

    @property
    def state(self) -> ConnectionState:
        return self._state

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features >> feature & 1)

    @property
    def reply_ack(self) -> bool:
        """REPLY_ACK negotiated."""
        return self.has_protocol_feature(ProtocolFeature.REPLY_ACK)


class BackendConnection(ConnectionEnd):
    """The back-end side of one vhost-user connection, without I/O.

    ``max_queues``: vring indices in requests must be below it (``None``: unchecked).
    ``max_payload_size``: larger payloads kill the connection (default 0x1000).
    ``features`` / ``protocol_features``: the virtio and protocol feature bits the back-end
    offers, if known up front; otherwise they are learnt from the GET_FEATURES and
    GET_PROTOCOL_FEATURES replies sent through ``send_reply``.
    """

    def __init__(
        self,
        *,
        max_queues: int | None = None,
        max_payload_size: int = MAX_PAYLOAD_SIZE,
        features: int | None = None,
        protocol_features: int | None = None,
    ) -> None:
        self.max_queues = max_queues
        self.max_payload_size = max_payload_size
        self.offered_features: int | None = features
        """Virtio feature bits of our GET_FEATURES reply."""
        self.offered_protocol_features: int | None = protocol_features
        """Protocol feature bits of our GET_PROTOCOL_FEATURES reply."""
        self.acked_features: int | None = None
        """The front-end's last SET_FEATURES."""
        self.protocol_features = 0
        """Negotiated protocol features: the front-end's last SET_PROTOCOL_FEATURES."""
        self.postcopy_listening = False
        """Between POSTCOPY_LISTEN and POSTCOPY_END (SET_MEM_TABLE/ADD_MEM_REG reply)."""
        self._state = ConnectionState.OPEN
        self._framer = MessageFramer()
        self._pending: deque[Request | RejectedRequest] = deque()
        self._requests = 0
        self._rejected = 0

    # ---------------------------------------------------------------- state

    @property
    def pending_replies(self) -> tuple[Request | RejectedRequest, ...]:
        """Requests still owed a reply, oldest first (replies go out in this order)."""
        return tuple(self._pending)

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            state=self._state,
            requests=self._requests,
            rejected=self._rejected,
            buffered_bytes=len(self._framer.buf),
            buffered_fds=self._framer.buffered_fds,
            pending_replies=len(self._pending),
        )

    def close(self) -> None:
        """Drop buffered data and close buffered fds (the socket is going away)."""
        self._release()
        if self._state is not ConnectionState.ERROR:
            self._state = ConnectionState.CLOSED

    def _release(self) -> None:
        self._framer.release()

    def _check_usable(self) -> None:
        if self._state is ConnectionState.ERROR:
            raise DeviceUsageError("the vhost-user connection hit a protocol error earlier")

    def _fail(self, error: VhostUserProtocolError) -> VhostUserProtocolError:
        self._state = ConnectionState.ERROR
        self._release()
        self._pending.clear()
        return error

    # ---------------------------------------------------------------- input

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Feed what one ``recvmsg`` returned.  ``b""`` means end of file.

        The connection owns ``fds`` from now on (see the module docstring).
        """
        if self._state is not ConnectionState.OPEN or self._framer.eof:
            _close_fds(fds)
            self._check_usable()
            raise DeviceUsageError("receive_data() after end of file or close()")
        self._framer.feed(data, fds)

    def next_event(self) -> Event | Literal[Sentinel.NEED_DATA]:
        """The next event, or ``NEED_DATA``.  Raises on framing errors (see module doc)."""
        self._check_usable()
        if self._state is ConnectionState.CLOSED:
            return ConnectionClosed()
        framer = self._framer
        header = framer.header()
        if header is None:
            if not framer.eof:
                return NEED_DATA
            if framer.buf:
                raise self._fail(PartialMessage(len(framer.buf), None))
            self._release()
            self._state = ConnectionState.CLOSED
            return ConnectionClosed()
        request, flags, size = header
        if flags & HeaderFlags.VERSION_MASK != VHOST_USER_VERSION:
            raise self._fail(
                InvalidMessage(
                    f"header version {flags & HeaderFlags.VERSION_MASK}, expected 1",
                    request=request,
                    section=_FATAL,
                )
            )
        if size > self.max_payload_size:
            raise self._fail(OversizedMessage(request, size, self.max_payload_size))
        message = framer.take(size)
        if message is None:
            if framer.eof:
                raise self._fail(PartialMessage(len(framer.buf), HEADER_SIZE + size))
            return NEED_DATA
        payload, fds = message
        return self._process(request, flags, payload, fds)

    # ---------------------------------------------------------------- validation

    def _process(self, number: int, flags: int, data: bytes, fds: list[int]) -> Event:
        try:
            request = FrontendRequest(number)
        except ValueError:
            return self._reject(number, flags, UnknownRequest(number), fds)
        spec = REQUESTS[request]
        postcopy_ack = (
            self.postcopy_listening and request in POSTCOPY_ACKS and len(data) == U64.SIZE
        )
        try:
            payload = self._validate(request, spec, flags, data, fds, postcopy_ack)
        except VhostUserProtocolError as error:
            return self._reject(request, flags, error, fds)
        except BaseException:
            _close_fds(fds)
            raise
        if request is FrontendRequest.SET_PROTOCOL_FEATURES:
            self._check_inband(payload)  # fatal; nothing else can fail after this
        if spec.fds is FdRule.TOLERATED_ONE and fds:
            _close_fds(fds)
            fds = []
        self._apply(request, payload)
        reply = self._reply_kind(None if postcopy_ack else request, flags)
        event = Request(request, flags, payload, tuple(fds), reply)
        self._requests += 1
        if reply is not Reply.NONE:
            self._pending.append(event)
        return event

    def _validate(
        self,
        request: FrontendRequest,
        spec: RequestSpec,
        flags: int,
        data: bytes,
        fds: list[int],
        postcopy_ack: bool,
    ) -> Payload | None:
        if flags & HeaderFlags.REPLY:
            raise InvalidMessage(
                f"{request.name}: REPLY flag set on a request",
                request=request,
                section=spec_section("Message Specification", "Header"),
            )
        self._check_gate(request, spec)
        if postcopy_ack:
            if fds:
                raise IncorrectFds(
                    f"{request.name}: postcopy acknowledgement with {len(fds)} fds",
                    request=request,
                    expected="0",
                    received=len(fds),
                    section=request.section,
                )
            return U64.unpack(data)
        if not spec.min_size <= len(data) <= spec.max_size:
            raise PayloadSizeMismatch(request, len(data), spec.expected_size, section=spec.section)
        payload = None
        if spec.decode is not None:
            ctx = DecodeContext(
                xen_mmap=self.has_protocol_feature(ProtocolFeature.XEN_MMAP),
                max_queues=self.max_queues,
            )
            payload = spec.decode(request, data, ctx)
        self._check_fds(request, spec, payload, len(fds))
        if request is FrontendRequest.SET_PROTOCOL_FEATURES:
            assert isinstance(payload, U64)
            offered = self.offered_protocol_features
            if offered is not None and payload.value & ~offered:
                raise InvalidMessage(
                    f"SET_PROTOCOL_FEATURES {payload.value:#x} has bits we did not offer "
                    f"({offered:#x})",
                    request=request,
                    section=request.section,
                )
        return payload

    def _check_gate(self, request: FrontendRequest, spec: RequestSpec) -> None:
        if spec.needs_protocol_features:
            offered = self.offered_features
            if offered is None or not offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
                raise ProtocolFeatureNotNegotiated(request, None, section=request.section)
        if spec.feature is not None and not self.has_protocol_feature(spec.feature):
            raise ProtocolFeatureNotNegotiated(request, spec.feature, section=request.section)

    def _check_fds(
        self, request: FrontendRequest, spec: RequestSpec, payload: object, count: int
    ) -> None:
        rule = spec.fds
        if rule is FdRule.NONE:
            ok, expected = count == 0, "0"
        elif rule is FdRule.ONE:
            ok, expected = count == 1, "1"
        elif rule is FdRule.TOLERATED_ONE:
            ok, expected = count <= 1, "0 (or 1, ignored)"
        elif rule is FdRule.VRING:
            assert isinstance(payload, VringFd)
            want = 0 if payload.no_fd else 1
            ok, expected = count == want, f"{want} (NOFD bit {'set' if payload.no_fd else 'clear'})"
        else:
            assert isinstance(payload, MemoryTable)
            want = payload.num_regions
            ok, expected = count == want, f"{want} (one per region)"
        if not ok:
            raise IncorrectFds(
                f"{request.name}: {count} fds, expected {expected}",
                request=request,
                expected=expected,
                received=count,
                section=request.section,
            )

    def _check_inband(self, payload: Payload | None) -> None:
        assert isinstance(payload, U64)
        inband = payload.value >> ProtocolFeature.INBAND_NOTIFICATIONS & 1
        needed = ProtocolFeature.BACKEND_REQ.mask | ProtocolFeature.REPLY_ACK.mask
        if inband and payload.value & needed != needed:
            raise self._fail(
                InvalidMessage(
                    "INBAND_NOTIFICATIONS negotiated without BACKEND_REQ and REPLY_ACK",
                    request=FrontendRequest.SET_PROTOCOL_FEATURES,
                    section=spec_section("In-band notifications"),
                )
            )

    def _apply(self, request: FrontendRequest, payload: Payload | None) -> None:
        if request is FrontendRequest.SET_FEATURES:
            assert isinstance(payload, U64)
            self.acked_features = payload.value
        elif request is FrontendRequest.SET_PROTOCOL_FEATURES:
            assert isinstance(payload, U64)
            self.protocol_features = payload.value
        elif request is FrontendRequest.POSTCOPY_LISTEN:
            self.postcopy_listening = True
        elif request is FrontendRequest.POSTCOPY_END:
            self.postcopy_listening = False

    def _reply_kind(self, request: FrontendRequest | None, flags: int) -> Reply:
        if request is not None:
            rule = REQUESTS[request].reply
            if rule is ReplyRule.ALWAYS or (rule is ReplyRule.POSTCOPY and self.postcopy_listening):
                return Reply.EXPLICIT
        return Reply.ACK if flags & HeaderFlags.NEED_REPLY else Reply.NONE

    def _reject(
        self,
        request: FrontendRequest | int,
        flags: int,
        error: VhostUserProtocolError,
        fds: list[int],
    ) -> RejectedRequest:
        _close_fds(fds)
        known = request if isinstance(request, FrontendRequest) else None
        event = RejectedRequest(request, flags, error, self._reply_kind(known, flags))
        self._rejected += 1
        if event.reply is not Reply.NONE:
            self._pending.append(event)
        return event

    # ---------------------------------------------------------------- output

    def _take_pending(self, event: Request | RejectedRequest) -> None:
        if not self._pending or self._pending[0] is not event:
            if any(p is event for p in self._pending):
                raise DeviceUsageError(
                    f"reply to {event.request!r} out of order: answer "
                    f"{self._pending[0].request!r} first"
                )
            raise DeviceUsageError(f"{event.request!r} is not waiting for a reply")
        self._pending.popleft()

    def send_reply(
        self,
        request: Request,
        payload: object = None,
        fds: Sequence[int] = (),
    ) -> Outgoing:
        """The explicit reply to ``request`` (``request.reply is Reply.EXPLICIT``).

        ``payload``: a payload dataclass, ``bytes``, or an ``int`` (sent as u64).  Replies
        must be sent in request order.  ``fds`` (e.g. GET_INFLIGHT_FD's memfd) are sent
        as they are and stay the caller's.
        """
        self._check_usable()
        if not isinstance(request, Request) or request.reply is not Reply.EXPLICIT:
            raise DeviceUsageError(
                f"{getattr(request, 'request', request)!r} has no explicit reply; use ack()"
            )
        spec = REQUESTS[request.request]
        if len(fds) > spec.reply_fds:
            raise DeviceUsageError(
                f"the reply to {request.request.name} carries at most {spec.reply_fds} fds"
            )
        data = payload_bytes(payload)  # type: ignore[arg-type]
        if len(data) > self.max_payload_size:
            raise DeviceUsageError(f"reply payload of {len(data)} bytes is too large")
        self._take_pending(request)
        if request.request is FrontendRequest.GET_FEATURES and len(data) == 8:
            self.offered_features = U64.unpack(data).value
        elif request.request is FrontendRequest.GET_PROTOCOL_FEATURES and len(data) == 8:
            self.offered_protocol_features = U64.unpack(data).value
        return Outgoing(encode_reply(request.request, data), list(fds))

    def ack(self, request: Request | RejectedRequest, success: bool = True) -> Outgoing:
        """The REPLY_ACK reply (u64 0 = success, 1 = failure) if NEED_REPLY was set.

        Returns empty ``Outgoing`` when the front-end expects nothing, so handlers may
        call it after every request.  Raises ``DeviceUsageError`` for requests with an
        explicit reply (use ``send_reply``; NEED_REPLY adds nothing to those).
        """
        self._check_usable()
        if request.reply is Reply.EXPLICIT:
            raise DeviceUsageError(f"{request.request!r} has an explicit reply; use send_reply()")
        if request.reply is Reply.NONE:
            return Outgoing(b"", [])
        self._take_pending(request)
        return Outgoing(encode_ack(request.request, success), [])

    def reject(self, event: RejectedRequest) -> Outgoing | None:
        """The failure reply to a rejected request, if the protocol can express one.

        * NEED_REPLY set (no explicit reply): a failed ack.
        * GET_CONFIG: an empty config payload ("zero length of payload to indicate an error").
        * Requests whose reply is a u64 status: a non-zero status.
        * Nothing owed: empty ``Outgoing``.
        * ``None``: the front-end waits for a reply that cannot say "failed" (e.g.
          GET_FEATURES with a bad size).  The server should close the connection, which
          the spec allows ("If back-end detects some error ... it may also close").
        """
        self._check_usable()
        if event.reply is Reply.NONE:
            return Outgoing(b"", [])
        if event.reply is Reply.ACK:
            self._take_pending(event)
            return Outgoing(encode_ack(event.request, False), [])
        if event.request is FrontendRequest.GET_CONFIG:
            self._take_pending(event)
            return Outgoing(encode_reply(event.request, b""), [])
        if event.request in STATUS_REPLIES:
            self._take_pending(event)
            status = 1
            if event.request is FrontendRequest.SET_DEVICE_STATE_FD:
                status |= VHOST_USER_VRING_NOFD_MASK
            return Outgoing(encode_reply(event.request, status), [])
        self._take_pending(event)
        return None
