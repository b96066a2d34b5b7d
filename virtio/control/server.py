"""The control socket server: JSON lines over a unix socket, one reply per request.

Requests on one connection are answered in order; connections are independent (a slow
command on one does not hold up another).  A client that sends garbage gets an error
reply and stays connected; a line over :data:`~virtio.control.protocol.MAX_LINE` bytes
gets an error reply and the connection is closed (the rest of the line cannot be told
from the next request).  The socket path is claimed like the vhost-user socket's
(:class:`~virtio.transport.vhost_user.socket_path.SocketPath`: a stale socket is
replaced, anything else at the path is left alone with an error).
"""

from __future__ import annotations

import logging
import os

import trio

from virtio.control.commands import CommandRegistry
from virtio.control.protocol import (
    MAX_LINE,
    ControlError,
    InvalidRequest,
    parse_request,
    reply_error,
    reply_return,
)
from virtio.transport.vhost_user.socket_path import SocketPath

log = logging.getLogger(__name__)

_CHUNK = 16 * 1024


async def handle_connection(stream: trio.abc.Stream, registry: CommandRegistry) -> None:
    """Serve one control connection until the client closes it (or sends an over-long line)."""
    buf = bytearray()
    try:
        while True:
            newline = buf.find(b"\n")
            if newline < 0:
                if len(buf) > MAX_LINE:
                    error = InvalidRequest(f"request line longer than {MAX_LINE} bytes")
                    log.warning("control: %s; closing the connection", error.desc)
                    await stream.send_all(reply_error(error))
                    return
                data = await stream.receive_some(_CHUNK)
                if not data:
                    return
                buf += data
                continue
            line = bytes(buf[:newline]).strip()
            del buf[: newline + 1]
            if not line:
                continue
            await stream.send_all(await answer(line, registry))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def answer(line: bytes, registry: CommandRegistry) -> bytes:
    """The reply line for one request line."""
    request_id = None
    try:
        request = parse_request(line)
        request_id = request.id
        return reply_return(await registry.dispatch(request), request_id)
    except ControlError as e:
        log.info("control: %s: %s", type(e).__name__, e.desc)
        return reply_error(e, request_id)


async def serve_control(
    path: str | os.PathLike[str],
    registry: CommandRegistry,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``path`` until cancelled, serving every connection with ``registry``."""
    with SocketPath(path) as claimed:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(claimed.bind(16)))
        async with listener:
            log.info("control socket listening on %s", claimed.path)
            task_status.started(claimed.path)
            await trio.serve_listeners(
                lambda stream: handle_connection(stream, registry), [listener]
            )
