"""``NbdBackend``: a disk on an NBD server (NetworkBlockDevice ``doc/proto.md``).

URIs as QEMU and libnbd write them: ``nbd://HOST[:PORT]/EXPORT`` (TCP, port 10809)
and ``nbd+unix:///EXPORT?socket=PATH``; with TLS required, ``nbds://`` and
``nbds+unix://`` (X.509 certificates as libnbd's ``tls-certificates=DIR`` names them,
``nbd_tls.py``): NBD_OPT_STARTTLS first, the rest of the handshake and transmission
over TLS.

Handshake: fixed newstyle; ``NBD_OPT_STRUCTURED_REPLY`` if the server has it, then
``NBD_OPT_SET_META_CONTEXT`` ``base:allocation``; then ``NBD_OPT_GO`` (export size,
transmission flags, block size constraints).  ``block_status`` sends
``NBD_CMD_BLOCK_STATUS`` (``NbdLayer`` uses it to skip zero ranges of a backing export).
Transmission: READ (simple or structured replies: data, hole and error chunks),
WRITE (FUA when the write must be durable and the server offers FUA, else a
FLUSH after it), FLUSH, TRIM, WRITE_ZEROES (``NO_HOLE`` unless unmapping is
allowed), several requests in flight on one connection, told apart by their
cookie.  Requests larger than the server's maximum payload are split.

Why our own client rather than libnbd: libnbd's Python binding is not on PyPI
for this venv and its C API would mean a cffi binding plus bridging its
callbacks and fds into trio; the protocol subset a block device needs is small
and fits trio's streams directly, so it is written here from the spec.

Server gone: every request in flight fails with ``BackendIOError`` (the guest
sees VIRTIO_BLK_S_IOERR, nothing is retried: a write may or may not have
happened); the next request reconnects (a new handshake) and goes on if the
server is back.

Under vhost-user, well-formed IN / OUT / FLUSH do not come here: each queue's
native data plane sends them on a connection of its own
(``nbd_dataplane.py``, ``transmission_socket``), over TLS too (GnuTLS in
native code, ``nbd_tls.c``; this client keeps Python's ``ssl``).
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import struct
import urllib.parse
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from virtio.devices.blk.backend import Range
from virtio.devices.blk.nbd_errors import NbdClosedError
from virtio.devices.blk.nbd_errors import NbdError as NbdError
from virtio.devices.blk.nbd_errors import NbdReplyError as NbdReplyError
from virtio.devices.blk.nbd_errors import NbdTlsError as NbdTlsError
from virtio.devices.blk.nbd_tls import NativeTls, SslSocketStream, TlsConfig, native_tls_available

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_STARTTLS = 5
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_TLS_REQD = REP_ERR | 5
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15

BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
"""base:allocation: the extent is not allocated on the server."""
STATE_ZERO = 1 << 1
"""base:allocation: the extent reads as zeros."""
MAX_STATUS_CHUNK = 1 << 20
"""The largest block status chunk accepted (131071 extents), refused before buffering."""
STATUS_STEP = 1 << 30
"""The largest range one NBD_CMD_BLOCK_STATUS asks about (lengths are 32-bit)."""

DEFAULT_MAX_PAYLOAD = 32 << 20
MAX_OPTION_REPLY = 1 << 20
NBD_ERRNO = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL,
             28: errno.ENOSPC, 75: errno.EOVERFLOW, 95: errno.EOPNOTSUPP,
             108: errno.ESHUTDOWN}  # fmt: skip

MAX_ERROR_MESSAGE = 4096
"""proto.md: an error chunk's message is at most 4096 bytes; a longer chunk is refused
before anything of it is buffered (a server must not make us hold gigabytes)."""
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">HHQI")
"""Structured reply chunk after its magic: flags, type, cookie, length."""


@dataclass(frozen=True)
class Extent:
    """One extent of an ``NBD_CMD_BLOCK_STATUS`` reply (``base:allocation``)."""

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def hole(self) -> bool:
        return bool(self.flags & STATE_HOLE)

    @property
    def zero(self) -> bool:
        return bool(self.flags & STATE_ZERO)


def is_nbd_uri(path: object) -> bool:
    return isinstance(path, str) and path.startswith(("nbd://", "nbd+unix://", "nbds"))


@dataclass(frozen=True)
class NbdAddress:
    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None
    tls: TlsConfig | None = None
    """``nbds://`` / ``nbds+unix://``: TLS required, with these certificates."""

    @classmethod
    def parse(cls, uri: str) -> NbdAddress:
        u = urllib.parse.urlsplit(uri)
        export = urllib.parse.unquote(u.path[1:]) if u.path.startswith("/") else ""
        query = urllib.parse.parse_qs(u.query)
        scheme = u.scheme
        tls = None
        if scheme in ("nbds", "nbds+unix"):
            host = u.hostname if scheme == "nbds" else None
            tls = TlsConfig.from_query(uri, query, host)
            scheme = scheme.replace("nbds", "nbd")
        if scheme == "nbd":
            if not u.hostname:
                raise NbdError(f"{uri}: no host")
            return cls(export, host=u.hostname, port=u.port or DEFAULT_PORT, tls=tls)
        if scheme == "nbd+unix":
            paths = query.get("socket")
            if not paths or u.hostname or u.port:  # only a user name ('alice@') may be there
                raise NbdError(f"{uri}: nbd+unix:///EXPORT?socket=PATH expected")
            return cls(export, socket_path=paths[0], tls=tls)
        raise NbdError(f"{uri}: not an nbd://, nbds://, nbd+unix:// or nbds+unix:// URI")

    def connect(self, timeout: float) -> socket.socket:
        if self.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.socket_path)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


@dataclass
class ExportInfo:
    size: int
    flags: int
    structured: bool
    min_block: int = 1
    max_payload: int = DEFAULT_MAX_PAYLOAD
    base_allocation: int | None = None
    """The context id the server gave ``base:allocation`` (None: no block status)."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise NbdClosedError("the NBD server closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def handshake(sock: socket.socket, export: str) -> ExportInfo:
    """Fixed newstyle negotiation up to transmission (blocking socket, no TLS)."""
    return negotiate(sock, export)[1]


def negotiate(
    sock: socket.socket,
    export: str,
    tls: TlsConfig | None = None,
    server: str = "NBD server",
    native_timeout: float | None = None,
) -> tuple[socket.socket | NativeTls, ExportInfo]:
    """Fixed newstyle negotiation up to transmission (blocking socket): with ``tls``,
    NBD_OPT_STARTTLS first and the rest over TLS.  The socket to go on with (TLS:
    an ``ssl.SSLSocket`` over ``sock``; with ``native_timeout``, a GnuTLS session
    for the native data plane, ``NativeTls``) and the export."""
    native = tls is not None and native_timeout is not None
    ctx = tls.context() if tls is not None and not native else None  # unusable files: fail
    if native:
        assert tls is not None
        tls.files()  # before any I/O
    magic, opt_magic, hflags = struct.unpack(">QQH", _recv_exact(sock, 18))
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise NbdError("not an NBD newstyle server")
    if not hflags & FLAG_FIXED_NEWSTYLE:
        raise NbdError("the NBD server does not speak fixed newstyle")
    cflags = FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)
    sock.sendall(struct.pack(">I", cflags))

    if tls is not None:
        _option(sock, OPT_STARTTLS, b"")
        rtype, data = _reply(sock, OPT_STARTTLS, server)
        if rtype != REP_ACK:
            why = data.decode(errors="replace") or hex(rtype)
            raise NbdTlsError(f"{server} does not offer TLS (NBD_OPT_STARTTLS refused: {why})")
        if native_timeout is not None:
            tls_sock: Any = tls.native(sock, server, native_timeout)
        else:
            assert ctx is not None
            tls_sock = tls.wrap(sock, server, ctx)
        try:
            return _options(tls_sock, export, server)
        except (ssl.SSLError, NbdClosedError) as exc:
            tls_sock.close()  # TLS 1.3: a server refuses our certificate after the handshake
            raise NbdTlsError(
                f"{server}: TLS failed after the handshake ({exc}): did the server refuse "
                "our certificate (client-cert.pem in tls-certificates=DIR)?"
            ) from exc
        except BaseException:
            tls_sock.close()
            raise
    return _options(sock, export, server)


def _option(sock: socket.socket, opt: int, data: bytes) -> None:
    sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def _reply(sock: socket.socket, opt: int, server: str) -> tuple[int, bytes]:
    magic, ropt, rtype, length = struct.unpack(">QIII", _recv_exact(sock, 20))
    if magic != OPT_REPLY_MAGIC or ropt != opt or length > MAX_OPTION_REPLY:
        raise NbdError(f"bad option reply (magic {magic:#x}, option {ropt})")
    data = _recv_exact(sock, length)
    if rtype == REP_ERR_TLS_REQD:
        raise NbdTlsError(f"{server} requires TLS: use an nbds:// or nbds+unix:// URI")
    return rtype, data


def _options(sock: socket.socket, export: str, server: str) -> tuple[socket.socket, ExportInfo]:
    """The options after the greeting (and STARTTLS): structured replies, meta
    context, GO."""

    def option(opt: int, data: bytes) -> None:
        _option(sock, opt, data)

    def reply(opt: int) -> tuple[int, bytes]:
        return _reply(sock, opt, server)

    option(OPT_STRUCTURED_REPLY, b"")
    rtype, _ = reply(OPT_STRUCTURED_REPLY)
    structured = rtype == REP_ACK
    name = export.encode()
    context = None
    if structured:  # block status needs structured replies
        query = BASE_ALLOCATION.encode()
        option(
            OPT_SET_META_CONTEXT,
            struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query)) + query,
        )
        while True:
            rtype, data = reply(OPT_SET_META_CONTEXT)
            if rtype != REP_META_CONTEXT:
                break  # ACK, or an error: the server has no block status for us
            if len(data) < 4 or data[4:] != query or context is not None:
                raise NbdError(f"bad meta context reply {data[:64]!r}")
            (context,) = struct.unpack_from(">I", data)
        if rtype != REP_ACK:
            context = None
    option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
    info: ExportInfo | None = None
    min_block, max_payload = 1, DEFAULT_MAX_PAYLOAD
    while True:
        rtype, data = reply(OPT_GO)
        if rtype & REP_ERR:
            msg = data.decode(errors="replace")
            raise NbdError(f"the NBD server refused export {export!r}: {msg or hex(rtype)}")
        if rtype == REP_ACK:
            break
        if rtype == REP_INFO and len(data) >= 2:
            (kind,) = struct.unpack_from(">H", data)
            if kind == INFO_EXPORT and len(data) == 12:
                size, flags = struct.unpack_from(">QH", data, 2)
                info = ExportInfo(size, flags, structured)
            elif kind == INFO_BLOCK_SIZE and len(data) == 14:
                min_block, _pref, max_payload = struct.unpack_from(">III", data, 2)
    if info is None:
        raise NbdError("the NBD server did not describe the export")
    info.min_block = max(min_block, 1)
    info.base_allocation = context
    info.max_payload = max(min(max_payload, DEFAULT_MAX_PAYLOAD), 512)
    return sock, info


@dataclass
class _Pending:
    cmd: int
    offset: int
    length: int
    views: Sequence[memoryview] = ()
    done: bool = False
    error: BaseException | None = None
    extents: list[Extent] | None = None
    """A block status request's extents (from its one status chunk)."""


class _Connection:
    """One transmission-phase connection.  No reader task: the waiting requests
    take turns (``_recv_lock``) reading one reply each, for whichever request it
    is (by cookie), until their own has arrived."""

    def __init__(self, sock: socket.socket, info: ExportInfo) -> None:
        sock.settimeout(None)
        sock.setblocking(False)
        self.raw = sock
        self.stream: trio.SocketStream | SslSocketStream
        if isinstance(sock, ssl.SSLSocket):
            self.stream = SslSocketStream(sock)
        else:
            self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.info = info
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        self._cookie = 0
        self._buf = bytearray()
        self.broken: BaseException | None = None

    async def request(
        self, p: _Pending, flags: int = 0, payload: Sequence[memoryview] = ()
    ) -> None:
        if self.broken is not None:
            raise NbdError(f"NBD connection lost: {self.broken}")
        self._cookie += 1
        cookie = self._cookie
        self._pending[cookie] = p
        try:
            async with self._send_lock:
                await self.stream.send_all(
                    _REQUEST.pack(REQUEST_MAGIC, flags, p.cmd, cookie, p.offset, p.length)
                )
                for v in payload:
                    await self.stream.send_all(v)
            while not p.done:  # the lock is FIFO: waiting requests take turns reading
                async with self._recv_lock:
                    if not p.done:
                        await self._receive_one()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, NbdError) as exc:
            self._break(exc)
        finally:
            self._pending.pop(cookie, None)
        if p.error is not None:
            raise p.error
        if p.cmd == CMD_BLOCK_STATUS and p.extents is None:
            raise NbdReplyError("block status reply without a base:allocation chunk")

    def _break(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        for p in self._pending.values():
            if not p.done:
                p.error = NbdError(f"NBD connection lost: {self.broken}")
                p.done = True

    async def _exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self._buf)))
            if not chunk:
                raise NbdError("the NBD server closed the connection")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _into(self, views: Sequence[memoryview], skip: int, n: int) -> None:
        """Receive ``n`` bytes into ``views`` starting ``skip`` bytes in."""
        parts = _slice(views, skip, n)
        if sum(len(p) for p in parts) < n:
            raise NbdError("read reply beyond the request")
        for part in parts:
            part[:] = await self._exact(len(part))

    async def _receive_one(self) -> None:
        (magic,) = struct.unpack(">I", await self._exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", await self._exact(12))
            p = self._pending.get(cookie)
            if p is None:
                raise NbdError(f"reply for unknown cookie {cookie}")
            if p.cmd == CMD_READ and not err:
                await self._into(p.views, 0, p.length)
            self._finish(p, err, "")
            return
        if magic != STRUCTURED_REPLY_MAGIC:
            raise NbdError(f"bad reply magic {magic:#x}")
        flags, rtype, cookie, length = _CHUNK.unpack(await self._exact(_CHUNK.size))
        p = self._pending.get(cookie)
        if p is None:
            raise NbdError(f"reply chunk for unknown cookie {cookie}")
        if rtype == REPLY_TYPE_OFFSET_DATA and p.cmd == CMD_READ and length >= 8:
            (off,) = struct.unpack(">Q", await self._exact(8))
            n = length - 8
            if not p.offset <= off <= off + n <= p.offset + p.length:
                raise NbdError("data chunk outside the read")
            await self._into(p.views, off - p.offset, n)
        elif rtype == REPLY_TYPE_OFFSET_HOLE and p.cmd == CMD_READ and length == 12:
            off, n = struct.unpack(">QI", await self._exact(12))
            if not p.offset <= off <= off + n <= p.offset + p.length:
                raise NbdError("hole chunk outside the read")
            skip = off - p.offset
            for v in p.views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                part = v[skip : skip + n]
                part[:] = bytes(len(part))
                skip = 0
                n -= len(part)
                if not n:
                    break
        elif rtype == REPLY_TYPE_BLOCK_STATUS and p.cmd == CMD_BLOCK_STATUS:
            if not 12 <= length <= MAX_STATUS_CHUNK or (length - 4) % 8:
                raise NbdError(f"block status chunk of {length} bytes")
            data = await self._exact(length)
            try:
                extents = _extents(p, data, self.info.base_allocation)
            except NbdReplyError as exc:
                p.error = p.error or exc
            else:
                p.extents = extents
        elif rtype & REPLY_TYPE_ERROR_BIT and 6 <= length <= 6 + MAX_ERROR_MESSAGE:
            err, mlen = struct.unpack(">IH", await self._exact(6))
            rest = await self._exact(length - 6)
            p.error = p.error or _error(err, rest[:mlen].decode(errors="replace"))
        elif rtype == REPLY_TYPE_NONE and length == 0:
            pass
        else:
            raise NbdError(f"unexpected reply chunk type {rtype} ({length} bytes)")
        if flags & REPLY_FLAG_DONE:
            self._finish(p, 0, "")

    def _finish(self, p: _Pending, err: int, msg: str) -> None:
        if err and p.error is None:
            p.error = _error(err, msg)
        p.done = True

    async def close(self) -> None:
        if self.broken is None:
            with trio.move_on_after(1):
                async with self._send_lock:
                    await self.stream.send_all(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        await self.stream.aclose()


def _extents(p: _Pending, data: bytes, context: int | None) -> list[Extent]:
    """Validate one NBD_REPLY_TYPE_BLOCK_STATUS payload against its request
    (proto.md): our context id, one chunk per context, nonzero lengths, every
    extent starting inside the request (only the last may reach past its end:
    it is clipped there)."""
    (ctx,) = struct.unpack_from(">I", data)
    if ctx != context:
        raise NbdReplyError(f"block status for metadata context {ctx}, not {context}")
    if p.extents is not None:
        raise NbdReplyError("two block status chunks for one metadata context")
    out: list[Extent] = []
    pos, end = p.offset, p.offset + p.length
    for length, flags in struct.iter_unpack(">II", data[4:]):
        if not length:
            raise NbdReplyError("zero-length extent in a block status reply")
        if pos >= end:
            raise NbdReplyError(f"block status extent at {pos} beyond the request ending at {end}")
        out.append(Extent(pos, min(length, end - pos), flags))
        pos += length
    return out


def _peer_gone(sock: socket.socket) -> bool:
    """Whether an idle transmission-phase socket is readable: a server sends nothing
    unasked, so that is its end of file (or garbage: either way not usable).  Over
    TLS, records the server may send after the handshake (TLS 1.3 session tickets)
    are not data: a non-blocking read tells."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    if not p.poll(0):
        return False
    if not isinstance(sock, ssl.SSLSocket):
        return True
    sock.setblocking(False)
    try:
        sock.recv(1)  # b"" (end of file) or data: gone either way
    except ssl.SSLWantReadError:
        return False
    except (OSError, ssl.SSLError):
        pass
    finally:
        sock.setblocking(True)
    return True


def _close_notify(sock: ssl.SSLSocket) -> None:
    """Send TLS close_notify, not waiting for the server's (best effort)."""
    try:
        sock.setblocking(False)
        sock.unwrap()
    except (OSError, ValueError, ssl.SSLError):
        pass


def _error(code: int, msg: str) -> NbdError:
    e = NBD_ERRNO.get(code, errno.EIO)
    exc = NbdError(f"NBD server error {errno.errorcode.get(e, code)}{': ' + msg if msg else ''}")
    exc.errno = e  # type: ignore[attr-defined]
    return exc


class NbdBackend:
    """A ``BlockBackend`` on an NBD export (see the module docstring)."""

    def __init__(self, uri: str, *, read_only: bool = False, timeout: float = 10.0) -> None:
        self.uri = uri
        self.address = NbdAddress.parse(uri)
        if self.address.tls is not None:
            self.address.tls.context()  # unusable certificate files: fail before connecting
        self._timeout = timeout
        sock, info = self._connect_blocking()
        self.info = info
        self._read_only = read_only or bool(info.flags & TF_READ_ONLY)
        self._sock: socket.socket | None = sock
        self._conn: _Connection | None = None
        self._reconnect_lock: trio.Lock | None = None
        self.reconnects = 0
        self.native_connections = 0
        """Connections handed to native data planes (``nbd_dataplane.py``) and open."""
        self.native_refused: str | None = None
        """Why the server gave a native data plane no connection (not asked again)."""

    def _connect_blocking(self) -> tuple[socket.socket, ExportInfo]:
        sock = self.address.connect(self._timeout)
        try:
            return negotiate(sock, self.address.export, self.address.tls, self._server)
        except BaseException:
            sock.close()
            raise

    @property
    def _server(self) -> str:
        a = self.address
        return f"NBD server {a.socket_path or f'{a.host}:{a.port}'}"

    @property
    def tls(self) -> bool:
        """Whether the connections are TLS (this client's: Python's ``ssl``; a native
        data plane's: GnuTLS, ``nbd_tls.c``)."""
        return self.address.tls is not None

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def multi_conn(self) -> bool:
        """NBD_FLAG_CAN_MULTI_CONN: a FLUSH on one connection covers writes completed
        on every connection of this export (proto.md)."""
        return bool(self.info.flags & TF_CAN_MULTI_CONN)

    def _durable_here(self, sync: bool) -> bool:
        """Whether a write from Python must be flushed on Python's connection before it
        completes: when native connections exist and the server does not promise that
        their FLUSH covers this connection too."""
        return sync or (self.native_connections > 0 and not self.multi_conn)

    def transmission_socket(
        self, timeout: float = 1.0
    ) -> tuple[socket.socket | NativeTls, ExportInfo]:
        """A new connection in transmission phase for a native data plane (blocking:
        call it in a worker thread).  Python keeps its own: it must be able to serve
        what the data plane hands it.  A server that takes no second client
        (``qemu-nbd``'s default ``-e 1`` leaves it unanswered) times out.  Over TLS
        a GnuTLS session (``NativeTls``; its handshake may take this backend's
        timeout: the server answered already)."""
        tls = self.address.tls
        if tls is not None and not native_tls_available():
            raise NbdError(f"{self.uri}: built without GnuTLS: TLS stays in Python")
        sock = self.address.connect(timeout)
        try:
            conn, info = negotiate(
                sock,
                self.address.export,
                tls,
                self._server,
                native_timeout=self._timeout if tls is not None else None,
            )
        except BaseException:
            sock.close()
            raise
        if info.size != self.info.size:
            conn.close()
            raise NbdError(f"{self.uri}: export size changed")
        return conn, info

    @property
    def can_unmap(self) -> bool:
        return not self._read_only and bool(self.info.flags & TF_SEND_TRIM)

    async def _connection(self) -> _Connection:
        if self._conn is not None and self._conn.broken is None:
            return self._conn
        if self._reconnect_lock is None:
            self._reconnect_lock = trio.Lock()
        async with self._reconnect_lock:
            if self._conn is not None and self._conn.broken is None:
                return self._conn
            if self._sock is not None and _peer_gone(self._sock):
                self._sock.close()  # idle since the handshake, and the server went away
                self._sock = None
            if self._sock is None:  # the old connection broke: a new handshake
                if self._conn is not None:
                    await self._conn.stream.aclose()
                try:
                    sock, info = await trio.to_thread.run_sync(self._connect_blocking)
                except OSError as exc:
                    raise NbdError(f"cannot reconnect to {self.uri}: {exc}") from exc
                if info.size != self.info.size:
                    sock.close()
                    raise NbdError(f"{self.uri}: export size changed across a reconnect")
                self.info = info
                self._sock = sock
                self.reconnects += 1
            self._conn = _Connection(self._sock, self.info)
            self._sock = None
            return self._conn

    async def _do(
        self,
        cmd: int,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        views: Sequence[memoryview] = (),
        payload: Sequence[memoryview] = (),
    ) -> None:
        await self._request(_Pending(cmd, offset, length, views), flags, payload)

    async def _request(
        self, p: _Pending, flags: int = 0, payload: Sequence[memoryview] = ()
    ) -> None:
        with trio.CancelScope(shield=True):  # a reply must never be left half-read
            conn = await self._connection()
            await conn.request(p, flags, payload)

    @property
    def has_block_status(self) -> bool:
        """Whether the server gave us the ``base:allocation`` metadata context."""
        return self.info.base_allocation is not None

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """The extents of ``offset..+length`` (NBD_CMD_BLOCK_STATUS, ``base:allocation``),
        covering it exactly, adjacent extents with equal flags merged.  A server
        without block status: one extent, allocated data (flags 0), as proto.md
        tells a client to assume.  Raises ``NbdReplyError`` for a reply that breaks
        the protocol."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NbdError(f"block status of {offset}+{length} outside the export")
        if not self.has_block_status:
            return [Extent(offset, length, 0)] if length else []
        out: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            p = _Pending(CMD_BLOCK_STATUS, pos, min(end - pos, STATUS_STEP))
            await self._request(p)
            assert p.extents  # _extents: at least one, the first at pos
            for e in p.extents:
                if out and out[-1].flags == e.flags:
                    out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.flags)
                else:
                    out.append(e)
            pos = p.extents[-1].end
        return out

    def _check_writable(self) -> None:
        if self._read_only:
            raise NbdError(f"{self.uri} is read-only")

    def _chunks(self, offset: int, views: Sequence[memoryview]):
        """(offset, length, views) pieces of at most the server's maximum payload."""
        limit = self.info.max_payload
        piece: list[memoryview] = []
        start = offset
        size = 0
        for v in views:
            while len(v):
                take = v[: limit - size]
                piece.append(take)
                size += len(take)
                v = v[len(take) :]
                if size == limit:
                    yield start, size, piece
                    start += size
                    piece, size = [], 0
        if size:
            yield start, size, piece

    async def read(self, offset: int, views: Sequence[memoryview]) -> None:
        for off, n, piece in self._chunks(offset, views):
            await self._do(CMD_READ, off, n, views=piece)

    async def write(self, offset: int, views: Sequence[memoryview], *, sync: bool = False) -> None:
        self._check_writable()
        sync = self._durable_here(sync)
        fua = sync and bool(self.info.flags & TF_SEND_FUA)
        for off, n, piece in self._chunks(offset, views):
            await self._do(CMD_WRITE, off, n, flags=CMD_FLAG_FUA if fua else 0, payload=piece)
        if sync and not fua:
            await self.flush()

    async def flush(self) -> None:
        if self._read_only or not self.info.flags & TF_SEND_FLUSH:
            return
        await self._do(CMD_FLUSH, 0, 0)

    async def _ranges(self, cmd: int, ranges: Sequence[Range], flags: int) -> None:
        step = 1 << 31  # lengths are 32-bit
        for offset, length in ranges:
            while length:
                n = min(length, step)
                await self._do(cmd, offset, n, flags=flags)
                offset += n
                length -= n

    async def discard(self, ranges: Sequence[Range], *, sync: bool = False) -> None:
        self._check_writable()
        if self.info.flags & TF_SEND_TRIM:
            await self._ranges(CMD_TRIM, ranges, 0)
            if self._durable_here(sync):
                await self.flush()

    async def write_zeroes(
        self, ranges: Sequence[Range], *, unmap: bool, sync: bool = False
    ) -> None:
        self._check_writable()
        if self.info.flags & TF_SEND_WRITE_ZEROES:
            await self._ranges(CMD_WRITE_ZEROES, ranges, 0 if unmap else CMD_FLAG_NO_HOLE)
        else:
            for offset, length in ranges:
                zeros = memoryview(bytes(min(length, self.info.max_payload)))
                while length:
                    n = min(length, len(zeros))
                    await self.write(offset, [zeros[:n]])
                    offset += n
                    length -= n
        if self._durable_here(sync):
            await self.flush()

    def close(self) -> None:
        """Close the connection (outside trio: the socket is simply closed, after a
        TLS close_notify)."""
        if self._sock is not None:
            if isinstance(self._sock, ssl.SSLSocket):
                _close_notify(self._sock)
            self._sock.close()
            self._sock = None
        if self._conn is not None:
            if isinstance(self._conn.raw, ssl.SSLSocket):
                _close_notify(self._conn.raw)
            try:
                self._conn.stream.socket.close()
            except RuntimeError:  # outside trio.run: close the socket itself
                self._conn.raw.close()
            self._conn = None


class NbdLayer:
    """An NBD export as the read-only backing file of a qcow2 image: blocking
    reads for ``qcow2/image.py``, which runs in a trio worker thread (the read goes
    back to the trio loop; outside trio it runs in a loop of its own).  Reads past
    the export's end are zeros, as for any shorter backing file.

    Ranges the server reports as reading zeros (``base:allocation``'s
    ``NBD_STATE_ZERO``) are filled here, not transferred: a read falling through
    to an unwritten part of the base, or the copy-on-write of a partial cluster
    over one, costs no data on the wire.  The extents are asked for once per
    ``STATUS_GRANULE`` and kept (a backing file does not change under its
    overlays, as QEMU assumes too); ``status_cached`` granules at most."""

    STATUS_GRANULE = 64 << 20
    STATUS_CACHED = 256

    def __init__(self, uri: str) -> None:
        self.backend = NbdBackend(uri, read_only=True)
        self.path = uri
        self.size = self.backend.size
        self.chain_depth = 1
        self._zeros: OrderedDict[int, list[tuple[int, int]]] = OrderedDict()
        self._status_failed: str | None = None

    def read(self, offset: int, views: Sequence[memoryview]) -> None:
        inside: list[memoryview] = []
        room = max(0, self.size - offset)
        for v in views:
            take = v[:room]
            if len(take):
                inside.append(take)
            room -= len(take)
            if len(take) < len(v):
                v[len(take) :] = bytes(len(v) - len(take))
        if not inside:
            return
        try:
            trio.from_thread.run(self._read, offset, inside)
        except RuntimeError:  # not in a trio worker thread
            trio.run(self._read, offset, inside)

    async def _read(self, offset: int, views: list[memoryview]) -> None:
        end = offset + sum(len(v) for v in views)
        pos = offset
        for zstart, zend in await self._zero_ranges(offset, end):
            if pos < zstart:
                await self.backend.read(pos, _slice(views, pos - offset, zstart - pos))
            for v in _slice(views, zstart - offset, zend - zstart):
                v[:] = bytes(len(v))
            pos = zend
        if pos < end:
            await self.backend.read(pos, _slice(views, pos - offset, end - pos))

    async def _zero_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``start..end`` known to read as zeros, in order."""
        if self._status_failed is not None or not self.backend.has_block_status:
            return []
        g = self.STATUS_GRANULE
        out: list[tuple[int, int]] = []
        for gi in range(start // g, (end - 1) // g + 1):
            zeros = self._zeros.get(gi)
            if zeros is None:
                lo = gi * g
                try:
                    extents = await self.backend.block_status(lo, min(g, self.size - lo))
                except NbdError as exc:  # reads still work: they just transfer zeros
                    self._status_failed = str(exc)
                    log.warning("%s: block status failed, reading every range: %s", self.path, exc)
                    return []
                zeros = [(e.offset, e.end) for e in extents if e.zero]
                self._zeros[gi] = zeros
                if len(self._zeros) > self.STATUS_CACHED:
                    self._zeros.popitem(last=False)
            else:
                self._zeros.move_to_end(gi)
            out += [(max(a, start), min(b, end)) for a, b in zeros if a < end and b > start]
        return out

    def close(self) -> None:
        self.backend.close()


def _slice(views: Sequence[memoryview], skip: int, n: int) -> list[memoryview]:
    """The views covering bytes ``skip..skip+n`` of ``views`` taken end to end."""
    out: list[memoryview] = []
    for v in views:
        if skip >= len(v):
            skip -= len(v)
            continue
        part = v[skip : skip + n]
        skip = 0
        out.append(part)
        n -= len(part)
        if not n:
            break
    return out
