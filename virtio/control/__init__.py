"""The control socket: one JSON-lines command interface for every back-end process.

::

    virtio serve blk ... --control /run/blk.ctl
    $ echo '{"execute": "query-commands"}' | socat - UNIX-CONNECT:/run/blk.ctl
    {"return": ["query-commands", ...]}

Shaped like QMP (QEMU's machine protocol) so operators recognise it, but line-framed:
each request is one JSON object on one line, ``{"execute": NAME, "arguments": {...},
"id": ANY}``; each gets exactly one reply line, ``{"return": VALUE}`` or ``{"error":
{"class": CLASS, "desc": TEXT}}``, with the request's ``id`` echoed.  Lines that are a
JSON object without ``execute`` go to the registry's default handler when one is set
(virtio-input's raw event lines), else are answered with an error.

* :mod:`virtio.control.protocol` — sans-IO: parse a request line, format replies, the
  typed errors;
* :mod:`virtio.control.commands` — the command registry devices and the CLI fill;
* :mod:`virtio.control.server` — the trio server on a unix socket;
* :mod:`virtio.control.client` — a small client (``virtio stat``, tests).
"""

from virtio.control.commands import CommandRegistry
from virtio.control.protocol import (
    ArgumentError,
    CommandNotFound,
    ControlError,
    InvalidRequest,
    Request,
)

__all__ = [
    "ArgumentError",
    "CommandNotFound",
    "CommandRegistry",
    "ControlError",
    "InvalidRequest",
    "Request",
]
