"""trio vhost-user server: the socket side of a back-end.

::

    server = VhostUserServer(device)
    await server.serve_path("/run/blk.sock")       # listen, one front-end at a time
    await server.serve_fd(3)                        # an inherited listening or connected fd

``VhostUserServer`` serves one front-end connection at a time (QEMU connects once
and reconnects after a back-end restart); when a connection ends, the device is
reset and the next connection is served.  For each connection it reads with
``recvmsg`` (SCM_RIGHTS fds, close-on-exec), feeds the sans-IO
``BackendConnection``, hands requests to a ``VhostUserHandler`` and writes replies
with ``sendmsg``.  Kick and call eventfds are driven by the handler's
``EventfdNotifier`` (``trio.lowlevel.wait_readable`` + ``os.eventfd_read`` /
``os.eventfd_write``).

A second front-end while one is connected.  The listener keeps accepting: a connection
that arrives while another front-end is connected is closed at once, with a WARNING
naming the device and the connected front-end ("device busy").  The vhost-user protocol
has no "busy" message, so the close is the answer: QEMU reports the disconnect and, with
``reconnect=N`` on its chardev, tries again.  (Otherwise a connection that sends nothing
would hold the device and leave every later front-end waiting unanswered.)  One that
arrives while the previous connection is only being torn down (its front-end has gone:
in-flight requests drain, the device resets) waits for that and is then served, so a
reconnecting QEMU is not refused; so does one arriving when the connected front-end
has closed its end but the server has not read the end of file yet (``POLLRDHUP``:
a connect-and-close probe right before the real front-end).

``idle_timeout`` (default off) closes a connection that has sent *nothing at all* for
that long; once a front-end has sent a byte it is never timed out (a QEMU that
completed bring-up may be silent for days).

Socket path.  ``serve_path`` claims the path with ``SocketPath``: a lock on
``PATH.lock`` held while serving, a stale socket removed only when proven dead, anything
else left alone with a clear error, and at exit our own socket removed only if the path
still names it (see ``socket_path``).

Malformed input never ends the server: a rejected message is logged (naming the
error type) and answered with a failure if the protocol can say so; a framing
error, or a failure the protocol cannot express, closes that connection and the
server goes on accepting.  Every fd received is closed unless the handler keeps it.
Errors are kept as a bounded history of summaries (``errors``, no exception objects:
a traceback would keep the dead connection's frames alive) and counted by type
(``error_counts``).
"""

from __future__ import annotations

import array
import contextlib
import itertools
import logging
import os
import select
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

import trio

from virtio.device import VirtioDevice
from virtio.ratelimit import LogRateLimiter

from .errors import IncorrectFds, VhostUserProtocolError
from .handler import VhostUserHandler
from .protocol import NEED_DATA, BackendConnection, ConnectionClosed, Outgoing, RejectedRequest
from .socket_path import SocketPath

log = logging.getLogger(__name__)

SCM_MAX_FD = 253
"""Most fds Linux passes in one SCM_RIGHTS message: room for all, so none is lost."""
RECV_SIZE = 65536


async def recv_with_fds(sock: trio.socket.SocketType) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: data and the fds that came with it (close-on-exec)."""
    data, ancdata, msg_flags, _ = await sock.recvmsg(
        RECV_SIZE, socket.CMSG_SPACE(SCM_MAX_FD * 4), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if msg_flags & socket.MSG_CTRUNC:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise IncorrectFds("ancillary data truncated: fds were lost", received=len(fds))
    return data, fds


async def send_with_fds(sock: trio.socket.SocketType, out: Outgoing) -> None:
    """Send ``out.data`` with ``out.fds`` attached to its first byte."""
    data = memoryview(out.data)
    if not data:
        return
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", out.fds))] if out.fds else []
    sent = await sock.sendmsg([data], anc)
    while sent < len(data):
        data = data[sent:]
        sent = await sock.send(data)


ERROR_HISTORY = 64
"""How many error summaries ``VhostUserServer.errors`` keeps."""
LISTEN_BACKLOG = 16


class IdleTimeout(Exception):
    """A connection sent nothing at all within ``VhostUserServer.idle_timeout``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"sent nothing in {seconds:g} s (idle timeout)")
        self.seconds = seconds


class ErrorRecord(NamedTuple):
    """A summary of one error that rejected a message or closed a connection."""

    connection: str
    """The connection's log name (``"virtio-blk#3"``)."""
    kind: str
    """The exception type's name (``"PartialMessage"``)."""
    message: str


class VhostUserServer:
    """Serve one ``VirtioDevice`` to vhost-user front-ends, one connection at a time."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        name: str | None = None,
        drain_timeout: float = 5.0,
        idle_timeout: float | None = None,
        on_handler: Callable[[VhostUserHandler | None], None] | None = None,
    ) -> None:
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout}")
        self.device = device
        self.name = name or type(device).__name__
        self.drain_timeout = drain_timeout
        self.idle_timeout = idle_timeout
        """Close a connection that has sent nothing at all for this long (``None``: never)."""
        self.connections = 0
        """Connections served (refused ones not counted)."""
        self.refused = 0
        """Connections closed at once because another front-end was connected."""
        self.errors: deque[ErrorRecord] = deque(maxlen=ERROR_HISTORY)
        """The last ``ERROR_HISTORY`` errors (most recent last)."""
        self.error_counts: Counter[str] = Counter()
        """Errors so far by exception type name."""
        self.busy_log = LogRateLimiter(log)
        """A local process connecting in a loop must not flood the log."""
        self.handler: VhostUserHandler | None = None
        """The handler of the current connection, if any."""
        self._on_handler = on_handler
        self._ids = itertools.count(1)
        self._resubmitted = 0
        self._turn = trio.Lock()  # one connection served at a time
        self._frontend: str | None = None  # log name of the connected front-end, if any
        self._frontend_sock: trio.socket.SocketType | None = None
        self.requests: dict[int, int] = {}
        """Chains popped per vring index over all connections (statistics)."""
        self._stopping = False
        self._reading: trio.CancelScope | None = None  # the connection's message loop
        self._idle = trio.Event()  # set while no connection is being served
        self._idle.set()

    def stop_serving(self) -> None:
        """An orderly stop (SIGTERM): read no more messages and serve no new front-end;
        the connected one's rings drain as on any disconnect (the requests in flight
        complete and are published, up to ``drain_timeout``) and it is closed, so a
        restarted back-end finds nothing to resubmit.  :meth:`wait_stopped` waits for
        that."""
        self._stopping = True
        if self._reading is not None:
            self._reading.cancel()

    async def wait_stopped(self) -> None:
        """Until no connection is being served (after :meth:`stop_serving`: the
        connected front-end's rings have drained and the device is reset)."""
        await self._idle.wait()

    def requests_per_vring(self) -> dict[int, int]:
        """Chains popped per vring index, this connection included."""
        out = dict(self.requests)
        if self.handler is not None:
            for index, n in self.handler.requests_per_vring().items():
                out[index] = out.get(index, 0) + n
        return out

    def in_flight(self) -> int:
        """Chains popped and not yet returned, on the current connection."""
        if self.handler is None:
            return 0
        return sum(r.tracker.outstanding for r in self.handler.vrings if r.tracker is not None)

    @property
    def resubmitted(self) -> int:
        """In-flight requests resubmitted after reconnects (all connections so far)."""
        current = self.handler.resubmitted if self.handler is not None else 0
        return self._resubmitted + current

    @property
    def frontend(self) -> str | None:
        """Log name of the connected front-end (``"virtio-blk#2"``), if one is connected."""
        return self._frontend

    def _record(self, connection: str, exc: BaseException) -> None:
        """Keep a summary of ``exc`` (not ``exc``: its traceback holds the frames)."""
        kind = type(exc).__name__
        self.errors.append(ErrorRecord(connection, kind, str(exc)))
        self.error_counts[kind] += 1

    # ------------------------------------------------------------------ listening

    async def serve_path(
        self, path: str | os.PathLike[str], *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on a unix socket at ``path`` until cancelled (see ``SocketPath``: a
        stale socket is replaced, anything else at ``path`` raises ``SocketPathError``);
        our socket is removed on exit if ``path`` still names it."""
        with SocketPath(path) as claimed:
            listener = trio.socket.from_stdlib_socket(claimed.bind(LISTEN_BACKLOG))
            try:
                log.info("%s: listening on %s (%s)", self.name, claimed.path, self.describe())
                task_status.started(claimed.path)
                await self.serve_listener(listener)
            finally:
                listener.close()

    async def serve_fd(self, fd: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve on an inherited unix socket ``fd``: listening (accept connections until
        cancelled) or connected (serve that one connection, then return)."""
        sock = trio.socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
        os.close(fd)
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            what = "listening on" if listening else "serving the connection on"
            log.info("%s: %s fd %d (%s)", self.name, what, fd, self.describe())
            task_status.started(fd)
            if listening:
                await self.serve_listener(sock)
            else:
                await self.serve_connection(sock)
        finally:
            sock.close()

    def describe(self) -> str:
        """The device as the listening log line shows it: type, queues, features."""
        device = self.device
        extra = getattr(device, "summary", "")
        return (
            f"{device.device_id.name.removeprefix('VIRTIO_ID_').lower()} device, "
            f"{device.num_queues} queue(s), features {device.offered_features():#x}"
            + (f", {extra}" if extra else "")
        )

    async def serve_listener(self, listener: trio.socket.SocketType) -> None:
        """Accept connections until cancelled: serve one front-end at a time, close
        the connections of others at once (see the module docstring)."""
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError as exc:  # EMFILE and the like: wait and try again
                    log.error("%s: accept failed: %s", self.name, exc)
                    await trio.sleep(0.1)
                    continue
                if self._stopping:
                    conn.close()
                    continue
                if self._frontend is not None and not self._frontend_hung_up():
                    self._refuse(conn)
                    continue
                name = self._next_name()
                self._claim(name, conn)
                nursery.start_soon(self._serve_named, conn, name)

    def _next_name(self) -> str:
        return f"{self.name}#{next(self._ids)}"

    def _claim(self, name: str, sock: trio.socket.SocketType) -> None:
        self._frontend, self._frontend_sock = name, sock

    def _unclaim(self, name: str) -> None:
        if self._frontend == name:
            self._frontend, self._frontend_sock = None, None

    def _frontend_hung_up(self) -> bool:
        """The connected front-end has closed its end, though we may not have read the
        end of file yet (a connect-and-close probe just before the real front-end)."""
        sock = self._frontend_sock
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in poller.poll(0))

    def _refuse(self, sock: trio.socket.SocketType) -> None:
        name = self._next_name()
        self.refused += 1
        self.busy_log.warning(
            "busy",
            "%s: device busy: front-end %s is connected; closing the new connection",
            name,
            self._frontend,
        )
        sock.close()

    # ------------------------------------------------------------------ one connection

    async def serve_connection(self, sock: trio.socket.SocketType) -> None:
        """Serve one front-end until it disconnects or breaks the protocol; then reset
        the device.  Never raises for the front-end's misbehaviour.  Waits for the
        connection served before, if any, to be torn down first."""
        name = self._next_name()
        self._claim(name, sock)
        await self._serve_named(sock, name)

    async def _serve_named(self, sock: trio.socket.SocketType, name: str) -> None:
        try:
            async with self._turn:
                await self._serve_turn(sock, name)
        finally:
            sock.close()
            self._unclaim(name)

    async def _serve_turn(self, sock: trio.socket.SocketType, name: str) -> None:
        if self._stopping:
            return
        self._idle = trio.Event()
        try:
            await self._serve_counted(sock, name)
        finally:
            self._idle.set()

    async def _serve_counted(self, sock: trio.socket.SocketType, name: str) -> None:
        self.connections += 1
        log.info("%s: front-end connected", name)
        conn = BackendConnection(max_queues=self.device.num_queues)
        try:
            await self._serve_with_handler(sock, conn, name)
        except Exception as exc:  # e.g. a ring task's error surfacing at teardown
            log.exception("%s: internal error at connection teardown", name)
            self._record(name, exc)
        finally:
            conn.close()
            sock.close()
            if self.handler is not None:
                self._resubmitted += self.handler.resubmitted
                for index, n in self.handler.requests_per_vring().items():
                    self.requests[index] = self.requests.get(index, 0) + n
            self.handler = None
            if self._on_handler is not None:
                self._on_handler(None)

    async def _serve_with_handler(
        self, sock: trio.socket.SocketType, conn: BackendConnection, name: str
    ) -> None:
        async with trio.open_nursery() as nursery:
            handler = VhostUserHandler(
                self.device, conn, nursery, drain_timeout=self.drain_timeout, name=name
            )
            self.handler = handler
            if self._on_handler is not None:
                self._on_handler(handler)
            try:
                reason = "the back-end is stopping"
                with trio.CancelScope() as self._reading:
                    if self._stopping:
                        self._reading.cancel()
                    try:
                        reason = await self._serve(sock, conn, handler, name)
                    except Exception as exc:  # a bug of ours: drop this connection only
                        log.exception("%s: internal error", name)
                        self._record(name, exc)
                        reason = f"internal error {type(exc).__name__}"
                log.info("%s: connection closed: %s", name, reason)
                hint = handler.hint_on_close()
                if hint is not None:
                    log.warning("%s: %s", name, hint)
            finally:
                self._reading = None
                self._unclaim(name)  # gone: the next front-end may queue up
                await handler.aclose()
                nursery.cancel_scope.cancel()

    async def _receive(self, sock: trio.socket.SocketType, first: bool) -> tuple[bytes, list[int]]:
        """The next ``recvmsg``; the first one of a connection under ``idle_timeout``."""
        if not first or self.idle_timeout is None:
            return await recv_with_fds(sock)
        with trio.move_on_after(self.idle_timeout):
            return await recv_with_fds(sock)
        raise IdleTimeout(self.idle_timeout)

    async def _serve(
        self,
        sock: trio.socket.SocketType,
        conn: BackendConnection,
        handler: VhostUserHandler,
        name: str,
    ) -> str:
        first = True
        while True:
            try:
                data, fds = await self._receive(sock, first)
            except IdleTimeout as exc:
                log.warning("%s: %s; closing", name, exc)
                self._record(name, exc)
                return str(exc)
            except VhostUserProtocolError as exc:
                return self._protocol_error(name, exc)
            except OSError as exc:
                return f"receive failed: {exc}"
            first = False
            conn.receive_data(data, fds)
            while True:
                try:
                    event = conn.next_event()
                except VhostUserProtocolError as exc:
                    return self._protocol_error(name, exc)
                if event is NEED_DATA:
                    break
                if isinstance(event, ConnectionClosed):
                    return "front-end disconnected"
                if isinstance(event, RejectedRequest):
                    exc = event.error
                    log.error(
                        "%s: rejected request %s: %s: %s",
                        name,
                        getattr(event.request, "name", event.request),
                        type(exc).__name__,
                        exc,
                    )
                    self._record(name, exc)
                    out = conn.reject(event)
                else:
                    log.debug("%s: %s %s", name, event.request.name, event.payload)
                    out = await handler.handle(event)
                    if out is None:
                        failed = f"{event.request.name} failed and its reply cannot say so"
                        self._record(name, VhostUserProtocolError(failed))
                        return failed
                if out is None:
                    return "the failure reply cannot be expressed"
                try:
                    await send_with_fds(sock, out)
                except OSError as exc:
                    return f"send failed: {exc}"

    def _protocol_error(self, name: str, exc: VhostUserProtocolError) -> str:
        log.error("%s: protocol error %s: %s; closing", name, type(exc).__name__, exc)
        self._record(name, exc)
        return f"protocol error {type(exc).__name__}"


STOP_GRACE = 5.0
"""Seconds an orderly stop waits for the connections' in-flight requests (each ring
drains for at most 1 s, as on a disconnect) before the caller cancels what is left."""


async def stop_servers(servers: Iterable[VhostUserServer], grace: float = STOP_GRACE) -> None:
    """An orderly stop (SIGTERM, SIGINT, an export removed): every server reads no more
    messages, its rings drain (the requests in flight complete and reach the guest),
    then it closes; a restarted back-end has nothing to resubmit.  Cancelling straight
    away abandoned those requests and waited out the drain of each ring in turn."""
    servers = list(servers)
    for server in servers:
        server.stop_serving()
    with trio.move_on_after(grace):
        for server in servers:
            await server.wait_stopped()
