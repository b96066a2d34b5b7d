"""Control-socket wire format (sans-IO): request lines in, reply lines out.

A request is one line holding a JSON object::

    {"execute": "query-stats", "arguments": {"queue": 0}, "id": 7}

``arguments`` (an object) and ``id`` (any JSON value, echoed) are optional.  A reply is
one line: ``{"return": VALUE, "id": 7}`` or ``{"error": {"class": "CommandNotFound",
"desc": "..."}, "id": 7}``.  The error classes follow QMP's names where QMP has one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

MAX_LINE = 64 * 1024
"""Longest request line accepted (bytes, newline excluded); a longer one closes the
connection after an error reply: nothing legitimate comes near it."""


class ControlError(Exception):
    """A request that cannot be carried out; its reply is ``{"error": ...}``."""

    error_class = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc

    def to_json(self) -> dict[str, str]:
        return {"class": self.error_class, "desc": self.desc}


class InvalidRequest(ControlError):
    """The line is not a request: not JSON, not an object, or malformed members."""


class CommandNotFound(ControlError):
    """``execute`` names no registered command."""

    error_class = "CommandNotFound"


class ArgumentError(ControlError):
    """The command exists but its ``arguments`` are missing, of the wrong type or out of range."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One parsed request.  ``execute`` is None for a line without it (a raw line for the
    registry's default handler, e.g. an input event); ``raw`` is the whole object."""

    execute: str | None
    arguments: dict[str, Any]
    id: Any = None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_request(line: bytes | str) -> Request:
    """Parse one request line; InvalidRequest says what is wrong with it."""
    if isinstance(line, bytes):
        if len(line) > MAX_LINE:
            raise InvalidRequest(f"request line longer than {MAX_LINE} bytes")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"request is not UTF-8: {e}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"request is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidRequest(f"request must be a JSON object, not {type(obj).__name__}")
    execute = obj.get("execute")
    if execute is not None and not isinstance(execute, str):
        raise InvalidRequest("'execute' must be a string")
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        raise InvalidRequest("'arguments' must be a JSON object")
    return Request(execute, arguments, obj.get("id"), obj)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def reply_return(value: Any, request_id: Any = None) -> bytes:
    """The success reply line for ``value`` (``{}`` when a command returns None)."""
    obj: dict[str, Any] = {"return": {} if value is None else value}
    if request_id is not None:
        obj["id"] = request_id
    return _line(obj)


def reply_error(error: ControlError, request_id: Any = None) -> bytes:
    """The error reply line for ``error``."""
    obj: dict[str, Any] = {"error": error.to_json()}
    if request_id is not None:
        obj["id"] = request_id
    return _line(obj)
