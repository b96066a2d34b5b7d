"""A control-socket client: ``await client.execute("query-stats")`` → the ``return`` value."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Self

import trio

from virtio.control.protocol import MAX_LINE, ControlError


class ControlReplyError(ControlError):
    """The server answered with an error; ``error_class`` is the server's class name."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class


class ControlClient:
    """One connection to a control socket; requests are sent and answered one at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self._lock = trio.Lock()

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> Self:
        return cls(await trio.open_unix_socket(os.fspath(path)))

    async def send_line(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Send one raw request object; the reply object (``return`` or ``error``)."""
        async with self._lock:
            await self._stream.send_all(json.dumps(obj).encode() + b"\n")
            return json.loads(await self._read_line())

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; its ``return`` value, or ControlReplyError."""
        request_id = next(self._ids)
        reply = await self.send_line({"execute": command, "arguments": arguments, "id": request_id})
        if "error" in reply:
            err = reply["error"]
            raise ControlReplyError(err.get("class", "GenericError"), err.get("desc", ""))
        if reply.get("id") != request_id:
            raise ControlError(f"reply id {reply.get('id')!r} does not match {request_id}")
        return reply["return"]

    async def _read_line(self) -> bytes:
        while (newline := self._buf.find(b"\n")) < 0:
            if len(self._buf) > 64 * MAX_LINE:
                raise ControlError("control reply too long")
            data = await self._stream.receive_some(65536)
            if not data:
                raise ControlError("control socket closed by the server")
            self._buf += data
        line = bytes(self._buf[:newline])
        del self._buf[: newline + 1]
        return line

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
