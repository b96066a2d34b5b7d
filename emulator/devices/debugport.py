"""Debug port: guest console output and result reporting to the VMM.

I/O window at ``DEBUG_BASE`` (``DEBUG_LEN`` bytes):

========  =====  ==========================================================
offset    size   meaning (writes)
========  =====  ==========================================================
``0``     1      console byte (also mapped at the Bochs port ``0xE9``)
``4``     4      ARG: 32-bit argument latched for the next command
``8``     1      CMD: ``CMD_BEGIN`` / ``CMD_END`` (measurement window),
                 ``CMD_MARK + n`` (start of phase n+1 inside the window),
                 ``CMD_RESULT`` (ARG = status, 0 = success, then the guest
                 halts), ``CMD_IOS`` (ARG = I/Os done), ``CMD_ERRORS``
                 (ARG = verify mismatches), ``CMD_KEY`` (ARG = key for the
                 next ``CMD_VALUE``), ``CMD_VALUE`` (ARG = value)
========  =====  ==========================================================

Reads return 0.  BEGIN, END and MARK are single one-byte writes (no ARG) so that
the machine can discount them exactly: ``on_mark(cmd)`` is called for each, and the
machine snapshots the exit counters and the clock.
"""

from __future__ import annotations

from collections.abc import Callable

from emulator.bus import Device

DEBUG_BASE = 0x500
DEBUG_LEN = 16
BOCHS_PORT = 0xE9

REG_CHAR = 0
REG_ARG = 4
REG_CMD = 8

CMD_BEGIN = 1
CMD_END = 2
CMD_RESULT = 3
CMD_IOS = 4
CMD_ERRORS = 5
CMD_KEY = 6
CMD_VALUE = 7
CMD_MARK = 0x10  # 0x10..0xFF: phase marks


class DebugPort(Device):
    name = "debug"
    read_registers = {REG_CHAR: "char", REG_ARG: "arg", REG_CMD: "cmd"}
    write_registers = read_registers

    def __init__(self, echo: Callable[[str], None] | None = None) -> None:
        self.output = bytearray()
        self.echo = echo
        self.arg = 0
        self.result: int | None = None
        self.ios = 0
        self.verify_errors = 0
        self.values: dict[int, int] = {}
        self._key = 0
        self.on_mark: Callable[[int], None] | None = None

    @property
    def text(self) -> str:
        return self.output.decode("latin-1")

    def save_state(self) -> dict:
        """For a machine snapshot: console output so far and every reported value."""
        return {
            "output": bytes(self.output),
            "arg": self.arg,
            "result": self.result,
            "ios": self.ios,
            "verify_errors": self.verify_errors,
            "values": [[k, v] for k, v in self.values.items()],
            "key": self._key,
        }

    def load_state(self, state: dict) -> None:
        self.output = bytearray(state["output"])
        self.arg = int(state["arg"])
        self.result = None if state["result"] is None else int(state["result"])
        self.ios = int(state["ios"])
        self.verify_errors = int(state["verify_errors"])
        self.values = {int(k): int(v) for k, v in state["values"]}
        self._key = int(state["key"])

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == REG_CHAR:
            self.output.append(value & 0xFF)
            if self.echo is not None:
                self.echo(chr(value & 0xFF))
        elif offset == REG_ARG:
            self.arg = value & 0xFFFF_FFFF
        elif offset == REG_CMD:
            self._command(value & 0xFF)

    def _command(self, cmd: int) -> None:
        if cmd in (CMD_BEGIN, CMD_END) or cmd >= CMD_MARK:
            if self.on_mark is not None:
                self.on_mark(cmd)
        elif cmd == CMD_RESULT:
            self.result = self.arg
        elif cmd == CMD_IOS:
            self.ios = self.arg
        elif cmd == CMD_ERRORS:
            self.verify_errors = self.arg
        elif cmd == CMD_KEY:
            self._key = self.arg
        elif cmd == CMD_VALUE:
            self.values[self._key] = self.arg
