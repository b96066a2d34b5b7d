"""Sans-IO vhost-user front-end connection (h11 style): requests out, checked replies in.

::

    conn = FrontendConnection()
    out = conn.send_request(FrontendRequest.GET_FEATURES)   # Outgoing(data, fds)
    sock.sendmsg(...)                                        # the caller's I/O
    conn.receive_data(data, fds)                             # what recvmsg() returned
    while (event := conn.next_event()) is NEED_DATA: ...     # read more
    event                                                    # Response / Ack / ConnectionClosed

The mirror image of ``BackendConnection`` (``protocol.py``), driven by the same
``REQUESTS`` table (``messages.py``): which requests have an explicit reply, how many
fds that reply may carry.  The same ``MessageFramer`` splits the stream.  I/O wrappers:
the emulator's blocking client (``emulator/vhost_user.py``) and the testing kit's trio
front-end (``virtio/testing/vhost_user_frontend.py``).

What the connection does: encodes requests (NEED_REPLY when REPLY_ACK was negotiated
and the request has no explicit reply, unless told otherwise), remembers in order
which replies it waits for, and checks every reply against that: version 1, the REPLY
flag, the request number, the payload size (a u64 for acks; per request for explicit
replies, e.g. ``CONFIG_HEADER_SIZE + size`` or 0 for GET_CONFIG), and the fd count
(``RequestSpec.reply_fds``).  It tracks the negotiated protocol features.

Errors.  A reply that breaks the format raises ``InvalidReply`` and the connection is
dead (state ``ERROR``: the stream may be out of sync, every later call raises
``InvalidReply`` again).  End of file while a reply is awaited raises
``BackendDisconnected``.  A failed REPLY_ACK is not a protocol error: it is an ``Ack``
event with a non-zero ``status`` (the wrappers raise ``RequestFailed``); so is an
empty GET_CONFIG reply (a ``Response`` with an empty payload).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from virtio.errors import DeviceUsageError, VirtioError

from .errors import spec_section
from .messages import (
    CONFIG_HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    REQUESTS,
    U64,
    VHOST_USER_VERSION,
    ConfigSpace,
    FrontendRequest,
    HeaderFlags,
    ReplyRule,
    VringState,
    encode_request,
    payload_bytes,
)
from .protocol import (
    NEED_DATA,
    ConnectionClosed,
    ConnectionEnd,
    ConnectionState,
    MessageFramer,
    Outgoing,
    Sentinel,
    _close_fds,
)

_R = FrontendRequest
_HEADER_SECTION = spec_section("Message Specification", "Header")
_ACK_SECTION = spec_section("Protocol features", "VHOST_USER_PROTOCOL_F_REPLY_ACK")


# -- typed errors ----------------------------------------------------------------------------
class FrontendError(VirtioError):
    """Something went wrong between a vhost-user front-end and its back-end."""


class BackendDisconnected(FrontendError):
    """The back-end closed the connection (it exited, crashed or was killed)."""


class BackendTimeout(FrontendError):
    """The back-end did not answer (or accept the connection) in time (I/O wrappers)."""


class InvalidReply(FrontendError):
    """A reply broke the vhost-user message format (version, REPLY flag, request number,
    size, file descriptors), or came when none was awaited.  ``section`` names the rule;
    the stream may be out of sync, so the connection is dead."""

    def __init__(self, message: str, *, section: str = _HEADER_SECTION) -> None:
        self.section = section
        super().__init__(f"{message} ({section})")


class RequestFailed(FrontendError):
    """The back-end answered a request with a failure (a non-zero REPLY_ACK status, an
    empty GET_CONFIG reply)."""


# -- what a reply may look like ------------------------------------------------------------------
_U64_REPLIES = (
    _R.GET_FEATURES,
    _R.GET_PROTOCOL_FEATURES,
    _R.GET_QUEUE_NUM,
    _R.SET_LOG_BASE,
    _R.IOTLB_MSG,
    _R.POSTCOPY_END,
    _R.GET_MAX_MEM_SLOTS,
    _R.GET_STATUS,
    _R.GET_SHARED_OBJECT,
    _R.SET_DEVICE_STATE_FD,
    _R.CHECK_DEVICE_STATE,
)
REPLY_SIZES: dict[FrontendRequest, tuple[int, int]] = {
    r: (U64.SIZE, U64.SIZE) for r in _U64_REPLIES
}
"""Payload size bounds of each explicit reply ("Front-end message types": the reply
column).  GET_CONFIG's depends on the request (see ``FrontendConnection``)."""
REPLY_SIZES[_R.GET_VRING_BASE] = (VringState.SIZE, VringState.SIZE)
REPLY_SIZES[_R.POSTCOPY_ADVISE] = (0, 0)
for _same in (_R.GET_INFLIGHT_FD, _R.SET_MEM_TABLE, _R.ADD_MEM_REG):
    # the reply has the request's layout (inflight description, postcopy memory table)
    REPLY_SIZES[_same] = (REQUESTS[_same].min_size, REQUESTS[_same].max_size)
for _opaque in (_R.CREATE_CRYPTO_SESSION, _R.GET_SHMEM_CONFIG):
    REPLY_SIZES[_opaque] = (0, MAX_PAYLOAD_SIZE)
assert {
    r for r, spec in REQUESTS.items() if spec.reply is not ReplyRule.NONE and r is not _R.GET_CONFIG
} <= set(REPLY_SIZES)


class Expect(enum.Enum):
    """What the front-end waits for after a request."""

    NONE = "none"
    EXPLICIT = "explicit"
    """The request's own reply body (checked against its size bounds)."""
    ACK = "ack"
    """NEED_REPLY was set: a u64 status."""
    ANY = "any"
    """A reply to this request number, any size, any fds (hostile tests)."""


@dataclass(frozen=True, slots=True)
class PendingReply:
    request: FrontendRequest | int
    expect: Expect
    sizes: tuple[int, ...] | tuple[int, int] = ()
    """EXPLICIT: ``(min, max)``; for GET_CONFIG the allowed sizes (failure: 0)."""
    max_fds: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class Response:
    """An explicit reply.  ``fds`` now belong to the caller."""

    request: FrontendRequest | int
    flags: int
    payload: bytes
    fds: tuple[int, ...]

    @property
    def u64(self) -> int:
        return U64.unpack(self.payload).value


@dataclass(frozen=True, slots=True)
class Ack:
    """A REPLY_ACK reply: ``status`` 0 is success."""

    request: FrontendRequest | int
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0


Event = Response | Ack | ConnectionClosed


def _name(request: int) -> str:
    try:
        return FrontendRequest(request).name
    except ValueError:
        return f"request {request}"


class FrontendConnection(ConnectionEnd):
    """The front-end side of one vhost-user connection, without I/O.

    ``name`` prefixes error messages (e.g. the back-end's socket path).
    """

    def __init__(
        self, *, name: str = "vhost-user back-end", max_payload_size: int = MAX_PAYLOAD_SIZE
    ):
        self.name = name
        self.max_payload_size = max_payload_size
        self.offered_features: int | None = None
        """The back-end's GET_FEATURES reply."""
        self.protocol_features = 0
        """Negotiated protocol features: our last SET_PROTOCOL_FEATURES."""
        self.requests = 0
        self._state = ConnectionState.OPEN
        self._error: FrontendError | None = None
        self._framer = MessageFramer()
        self._pending: deque[PendingReply] = deque()

    # ---------------------------------------------------------------- state
    @property
    def pending_replies(self) -> tuple[PendingReply, ...]:
        return tuple(self._pending)

    def close(self) -> None:
        """Drop buffered data and close buffered fds (the socket is going away)."""
        self._framer.release()
        if self._state is not ConnectionState.ERROR:
            self._state = ConnectionState.CLOSED

    def _check_usable(self) -> None:
        if self._error is not None:
            raise type(self._error)(
                f"{self.name}: connection unusable after an earlier error: {self._error}"
            )
        if self._state is ConnectionState.CLOSED:
            raise DeviceUsageError("the vhost-user connection is closed")

    def _fail(self, error: FrontendError) -> FrontendError:
        self._state = ConnectionState.ERROR
        self._error = error
        self._framer.release()
        self._pending.clear()
        return error

    # ---------------------------------------------------------------- output
    def send_request(
        self,
        request: FrontendRequest | int,
        payload: object = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
        reply_size: int | None = None,
    ) -> Outgoing:
        """Encode ``request`` and remember which reply it waits for.

        ``need_reply``: set NEED_REPLY (default: when REPLY_ACK is negotiated and the
        request has no explicit reply).  ``reply_size``: the exact explicit reply size,
        when the caller knows better than the table.  Unknown request numbers and
        malformed payloads are sent as they are (hostile tests need them); ``fds`` stay
        the caller's.
        """
        self._check_usable()
        spec = REQUESTS.get(request)  # type: ignore[call-overload]
        explicit = spec is not None and spec.reply is ReplyRule.ALWAYS
        if need_reply is None:
            need_reply = self.reply_ack and not explicit
        data = payload_bytes(payload)  # type: ignore[arg-type]
        out = Outgoing(encode_request(request, data, need_reply=need_reply), list(fds))
        if explicit:
            assert spec is not None
            self._pending.append(self._explicit(spec.request, payload, reply_size, spec.reply_fds))
        elif need_reply:
            self._pending.append(PendingReply(request, Expect.ACK))
        self.requests += 1
        if request == _R.SET_PROTOCOL_FEATURES and len(data) == U64.SIZE:
            self.protocol_features = U64.unpack(data).value
        return out

    def _explicit(
        self, request: FrontendRequest, payload: object, reply_size: int | None, max_fds: int
    ) -> PendingReply:
        if reply_size is not None:
            sizes: tuple[int, ...] = (reply_size, reply_size)
        elif request is _R.GET_CONFIG:
            size = payload.size if isinstance(payload, ConfigSpace) else 0
            sizes = (0, CONFIG_HEADER_SIZE + size)  # 0: "an error" (GET_CONFIG)
            return PendingReply(request, Expect.EXPLICIT, sizes, max_fds)
        else:
            sizes = REPLY_SIZES[request]
        return PendingReply(request, Expect.EXPLICIT, (sizes[0], sizes[-1]), max_fds)

    def expect_reply(self, request: FrontendRequest | int) -> None:
        """Wait for a reply to ``request`` sent by other means (raw bytes): only the
        header is checked (version, REPLY, request number)."""
        self._check_usable()
        self._pending.append(PendingReply(request, Expect.ANY, (0, self.max_payload_size), 1 << 16))

    # ---------------------------------------------------------------- input
    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Feed what one ``recvmsg`` returned (``b""``: end of file).  The connection owns
        ``fds`` from now on."""
        if self._state is not ConnectionState.OPEN or self._framer.eof:
            _close_fds(fds)
            self._check_usable()
            raise DeviceUsageError("receive_data() after end of file")
        self._framer.feed(data, fds)

    def next_event(self) -> Event | Literal[Sentinel.NEED_DATA]:
        """The next reply, ``ConnectionClosed``, or ``NEED_DATA``; raises
        ``InvalidReply`` / ``BackendDisconnected`` (see the module doc)."""
        self._check_usable()
        framer = self._framer
        waiting = self._pending[0] if self._pending else None
        header = framer.header()
        if header is None:
            if not framer.eof:
                return NEED_DATA
            if waiting is not None or framer.buf:
                what = _name(waiting.request) if waiting else "a message"
                raise self._fail(
                    BackendDisconnected(
                        f"{self.name}: the back-end closed the connection while {what}"
                        " waited for its reply"
                    )
                )
            self._state = ConnectionState.CLOSED
            return ConnectionClosed()
        request, flags, size = header
        where = f"{self.name}: reply to {_name(waiting.request) if waiting else 'nothing'}"
        if size > self.max_payload_size:
            raise self._fail(InvalidReply(f"{where}: payload of {size} bytes announced"))
        if flags & HeaderFlags.VERSION_MASK != VHOST_USER_VERSION:
            raise self._fail(
                InvalidReply(f"{where}: version {flags & 3} (flags {flags:#x}), expected 1")
            )
        if not flags & HeaderFlags.REPLY:
            raise self._fail(InvalidReply(f"{where}: flags {flags:#x} lack REPLY (bit 2)"))
        if waiting is None:
            raise self._fail(InvalidReply(f"{where}: {_name(request)} reply unsolicited"))
        if request != waiting.request:
            raise self._fail(InvalidReply(f"{where}: the back-end answered {_name(request)}"))
        message = framer.take(size)
        if message is None:
            if framer.eof:
                raise self._fail(
                    BackendDisconnected(
                        f"{where}: the back-end closed the connection after"
                        f" {len(framer.buf)} of {size + 12} bytes"
                    )
                )
            return NEED_DATA
        payload, fds = message
        self._pending.popleft()
        try:
            return self._check_reply(waiting, flags, payload, fds, where)
        except FrontendError:
            _close_fds(fds)
            raise

    def _check_reply(
        self, waiting: PendingReply, flags: int, payload: bytes, fds: list[int], where: str
    ) -> Event:
        max_fds = waiting.max_fds if waiting.expect is not Expect.ACK else 0
        if len(fds) > max_fds:
            raise self._fail(
                InvalidReply(
                    f"{where}: carried {len(fds)} file descriptor(s), at most {max_fds} allowed",
                    section=spec_section("Communication"),
                )
            )
        if waiting.expect is Expect.ACK:
            if len(payload) != U64.SIZE:
                raise self._fail(
                    InvalidReply(
                        f"{where}: REPLY_ACK of {len(payload)} bytes, expected a u64",
                        section=_ACK_SECTION,
                    )
                )
            return Ack(waiting.request, U64.unpack(payload).value)
        sizes = waiting.sizes
        if waiting.request == _R.GET_CONFIG and waiting.expect is Expect.EXPLICIT:
            ok = len(payload) in sizes
        else:
            ok = sizes[0] <= len(payload) <= sizes[-1]
        if not ok:
            if waiting.request == _R.GET_CONFIG:
                expected = " or ".join(str(s) for s in sizes)
            elif sizes[0] == sizes[-1]:
                expected = str(sizes[0])
            else:
                expected = f"{sizes[0]}..{sizes[-1]}"
            spec = REQUESTS.get(waiting.request)  # type: ignore[call-overload]
            section = spec.section if spec is not None else _HEADER_SECTION
            raise self._fail(
                InvalidReply(f"{where}: {len(payload)} bytes, expected {expected}", section=section)
            )
        if waiting.request == _R.GET_FEATURES and len(payload) == U64.SIZE:
            self.offered_features = U64.unpack(payload).value
        return Response(waiting.request, flags, payload, tuple(fds))
