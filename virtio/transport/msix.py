"""MSI-X: the table, the pending bit array and the capability's Message Control (PCI
Local Bus 3.0 §6.8.2, which virtio-pci uses for its interrupts, virtio 1.4 §4.1.5.1.2).

Pure: ``MsixTable`` holds ``size`` entries (message address, message data, vector
control), the pending bits (PBA) and the function-level Enable / Function Mask bits.
``signal(entry)`` is what a device does to interrupt through an entry: with the
entry and the function unmasked the message is sent (``deliver(address, data)``, a
memory write the platform turns into an interrupt), otherwise the entry's pending
bit is set and the message goes out when software unmasks it.  All entries come out
of reset masked.

Software must access the table and the PBA with aligned DWORD or QWORD accesses
(PCI 3.0 §6.8.2); anything else is an ``MsixAccessError`` (dropped, reads 0).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from virtio.errors import DriverError
from virtio.spec import sections as sec

ENTRY_SIZE = 16
MSG_ADDR_LO, MSG_ADDR_HI, MSG_DATA, VECTOR_CONTROL = 0, 4, 8, 12
VECTOR_MASKED = 1
CAP_ID_MSIX = 0x11
CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14
CONTROL_TABLE_SIZE = 0x7FF
MAX_VECTORS = 0x800


class MsixAccessError(DriverError):
    """A table or PBA access that is not an aligned DWORD or QWORD, outside the table,
    or a write to the read-only PBA (PCI 3.0 §6.8.2; virtio §4.1.5.1.2 uses MSI-X)."""

    spec_section = sec.S_4_1_5_1_2


class MsixTable:
    """``size`` MSI-X entries (1..2048) and their pending bits.  ``deliver(address,
    data)`` sends a message; it is called with the table's lock held, from whichever
    thread signals."""

    def __init__(self, size: int, deliver: Callable[[int, int], None]) -> None:
        if not 1 <= size <= MAX_VECTORS:
            raise ValueError(f"MSI-X table size {size} outside 1..{MAX_VECTORS}")
        self.size = size
        self.deliver = deliver
        self._lock = threading.RLock()
        self.messages = 0
        self.reset()

    def reset(self) -> None:
        """Function reset: disabled, every entry masked with zero address and data."""
        with self._lock:
            self.enabled = False
            self.function_mask = False
            self.entries = [[0, 0, 0, VECTOR_MASKED] for _ in range(self.size)]
            self.pending = 0

    # -- snapshots -------------------------------------------------------------------------
    def save_state(self) -> dict:
        with self._lock:
            return {
                "enabled": self.enabled,
                "function_mask": self.function_mask,
                "entries": [list(e) for e in self.entries],
                "pending": self.pending,
                "messages": self.messages,
            }

    def load_state(self, state: dict) -> None:
        """Apply ``save_state()`` output (validated: a snapshot is untrusted input)."""
        entries = state["entries"]
        if len(entries) != self.size or any(
            len(e) != 4 or not all(isinstance(v, int) and 0 <= v <= 0xFFFF_FFFF for v in e)
            for e in entries
        ):
            raise ValueError(f"MSI-X: the snapshot's table is not {self.size} entries")
        pending = int(state["pending"])
        if not 0 <= pending < 1 << self.size:
            raise ValueError("MSI-X: pending bits beyond the table")
        with self._lock:
            self.enabled = bool(state["enabled"])
            self.function_mask = bool(state["function_mask"])
            self.entries = [list(e) for e in entries]
            self.pending = pending
            self.messages = int(state["messages"])

    # -- the capability's Message Control --------------------------------------------------
    @property
    def control(self) -> int:
        """Message Control: table size N-1, Function Mask, MSI-X Enable."""
        value = self.size - 1
        if self.function_mask:
            value |= CONTROL_FUNCTION_MASK
        if self.enabled:
            value |= CONTROL_ENABLE
        return value

    def write_control(self, value: int) -> None:
        """Software writes Message Control: only Enable and Function Mask are writable."""
        with self._lock:
            self.enabled = bool(value & CONTROL_ENABLE)
            self.function_mask = bool(value & CONTROL_FUNCTION_MASK)
            self._flush_pending()

    # -- delivery -----------------------------------------------------------------------------
    def masked(self, entry: int) -> bool:
        return self.function_mask or bool(self.entries[entry][3] & VECTOR_MASKED)

    def signal(self, entry: int) -> None:
        """Interrupt through ``entry``: send its message, or set its pending bit."""
        with self._lock:
            if not 0 <= entry < self.size or not self.enabled:
                return
            if self.masked(entry):
                self.pending |= 1 << entry
                return
            self._send(entry)

    def _send(self, entry: int) -> None:
        lo, hi, data, _ctrl = self.entries[entry]
        self.messages += 1
        self.deliver(lo | hi << 32, data)

    def _flush_pending(self) -> None:
        if not self.enabled or self.function_mask or not self.pending:
            return
        for entry in range(self.size):
            if self.pending >> entry & 1 and not self.masked(entry):
                self.pending &= ~(1 << entry)
                self._send(entry)

    # -- table and PBA (memory space) ------------------------------------------------------
    @property
    def table_bytes(self) -> int:
        return self.size * ENTRY_SIZE

    @property
    def pba_bytes(self) -> int:
        return 8 * ((self.size + 63) // 64)

    def _check(self, offset: int, size: int, length: int, what: str) -> None:
        if size not in (4, 8) or offset % size:
            raise MsixAccessError(
                f"{size}-byte access at {what}+{offset:#x}: the MSI-X {what} takes only"
                " aligned DWORD or QWORD accesses (PCI 3.0 §6.8.2)"
            )
        if offset + size > length:
            raise MsixAccessError(
                f"access at {what}+{offset:#x} beyond the {length}-byte MSI-X {what}"
            )

    def read_table(self, offset: int, size: int) -> int:
        self._check(offset, size, self.table_bytes, "table")
        with self._lock:
            value = 0
            for i in range(size // 4):
                dword = offset // 4 + i
                value |= self.entries[dword // 4][dword % 4] << (32 * i)
            return value

    def write_table(self, offset: int, size: int, value: int) -> None:
        self._check(offset, size, self.table_bytes, "table")
        with self._lock:
            for i in range(size // 4):
                dword = offset // 4 + i
                entry, field = divmod(dword, 4)
                part = (value >> (32 * i)) & 0xFFFF_FFFF
                if field == VECTOR_CONTROL // 4:
                    part &= VECTOR_MASKED  # the other bits are reserved
                self.entries[entry][field] = part
            self._flush_pending()

    def read_pba(self, offset: int, size: int) -> int:
        self._check(offset, size, self.pba_bytes, "PBA")
        with self._lock:
            return (self.pending >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write_pba(self, offset: int, size: int, value: int) -> None:
        self._check(offset, size, self.pba_bytes, "PBA")
        raise MsixAccessError(f"write to the read-only MSI-X PBA at +{offset:#x}")
