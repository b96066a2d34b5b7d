"""The command registry: what a control socket can be asked.

Devices and the CLI register handlers by name; a handler takes the request's
``arguments`` (a dict) and returns a JSON-able value, synchronously or as a coroutine.
It raises :class:`~virtio.control.protocol.ArgumentError` (or any ControlError) for a
request it refuses; ``KeyError``/``TypeError``/``ValueError`` escaping a handler are
reported as argument errors, anything else as an internal error (logged with its
traceback), and the connection and the server carry on in every case.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from virtio.control.protocol import (
    ArgumentError,
    CommandNotFound,
    ControlError,
    InvalidRequest,
    Request,
)

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]
DefaultHandler = Callable[[dict[str, Any]], Any | Awaitable[Any]]


class CommandRegistry:
    """Named commands; ``query-commands`` (each name with its help) is always there."""

    def __init__(self) -> None:
        self._commands: dict[str, tuple[Handler, str]] = {}
        self._default: DefaultHandler | None = None
        self.register("query-commands", self._query_commands, help="list the commands")

    def register(self, name: str, handler: Handler, *, help: str = "") -> None:
        """Add command ``name``; ValueError if it is taken (one owner per name)."""
        if name in self._commands:
            raise ValueError(f"control command {name!r} is already registered")
        self._commands[name] = (handler, help)

    def unregister(self, name: str) -> None:
        """Remove command ``name`` (e.g. when its export is removed); absent is fine."""
        self._commands.pop(name, None)

    def set_default(self, handler: DefaultHandler | None) -> None:
        """Handler for request lines without ``execute`` (the whole object is passed)."""
        self._default = handler

    def names(self) -> list[str]:
        return sorted(self._commands)

    def entries(self) -> dict[str, tuple[Handler, str]]:
        """The registered commands but ``query-commands``: name -> (handler, help)."""
        return {n: c for n, c in self._commands.items() if n != "query-commands"}

    def _query_commands(self, arguments: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": n, "help": self._commands[n][1]} for n in self.names()]

    async def dispatch(self, request: Request) -> Any:
        """Run ``request``; its return value, or a ControlError."""
        if request.execute is None:
            if self._default is None:
                raise InvalidRequest("request has no 'execute' member")
            handler: Handler = self._default
            arguments = request.raw
            what = "default handler"
        else:
            entry = self._commands.get(request.execute)
            if entry is None:
                raise CommandNotFound(f"the command {request.execute!r} has not been found")
            handler, _ = entry
            arguments = request.arguments
            what = request.execute
        try:
            result = handler(arguments)
            if inspect.isawaitable(result):
                result = await result
        except ControlError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            detail = f"missing argument {e}" if isinstance(e, KeyError) else str(e)
            raise ArgumentError(f"{what}: {detail}") from None
        except Exception as e:
            log.exception("control command %s failed", what)
            raise ControlError(f"{what}: internal error: {type(e).__name__}: {e}") from None
        return result
