"""Software CPU backend on unicorn: same guest binary, same bus, same exit counts.

Guest RAM is the machine's memfd mapping (``mem_map_ptr``), so DMA by devices and
guest stores see the same bytes.  Port I/O is hooked per instruction (``IN``/``OUT``)
and every MMIO window on the bus is an ``mmio_map`` region.  Unicorn's 64-bit mode is
flat (no paging), which equals the identity map the KVM backend builds.

Exit accounting mirrors KVM exactly:

* every ``in``/``out``/MMIO access is one exit;
* ``rep outs`` is one exit per element (KVM emulates string OUT one element at a time);
* ``rep ins`` is batched like KVM's read-ahead cache (``pio_in_emulated`` in
  arch/x86/kvm/emulate.c): one exit fetches ``n = min(bytes left in the destination
  page, 1024 / size, RCX)`` elements (at least 1);
* ``hlt`` stops ``emu_start`` with RIP after the instruction -- one ``HLT`` exit;
  an interrupt due at that HLT (IF=1) is delivered by :meth:`SoftCpu._deliver`;
* an MMIO access is one exit of its own size at its own address, whatever its width
  or alignment, as KVM reports it (``KVM_EXIT_MMIO`` carries up to 8 bytes; an access
  that crosses a page is one exit per page).  Unicorn hands MMIO callbacks aligned
  pieces of at most 4 bytes (a 64-bit ``mov`` becomes two 32-bit accesses, an unaligned
  one touches both neighbours), so a memory hook sees the whole access first and does
  it on the bus (:class:`_WideAccess`); the pieces then only carry its bytes.
"""

from __future__ import annotations

import contextlib
import struct
import time
from typing import TYPE_CHECKING

from emulator import memory
from emulator.cpu import GPR_NAMES, ExitLimit, GuestFault, check_cpu_state
from emulator.exits import CPU_DEVICE, REASON_HLT, REASON_MMIO, REASON_PIO

try:
    import unicorn
    from unicorn import x86_const as ux
except ImportError:  # pragma: no cover - optional dependency
    unicorn = None
    ux = None

if TYPE_CHECKING:
    from emulator.machine import Machine

PAGE_SIZE = 4096
IDENTITY_LIMIT = memory.IDENTITY_MAP_GIB << 30
PIO_READ_CACHE = 1024  # sizeof(struct read_cache.data) in KVM's emulator
_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})
_REP_PREFIXES = (0xF2, 0xF3)
_OP_INS = (0x6C, 0x6D)
_EFLAGS_DF = 1 << 10
_EFLAGS_IF = 1 << 9
_GATE = struct.Struct("<HHBBHII")  # 64-bit IDT gate descriptor
_GATE_PRESENT = 0x80
_GATE_TYPE_MASK = 0x0F
_GATE_INTERRUPT = 0xE
_GATE_TRAP = 0xF
_GATE_TYPES = (_GATE_INTERRUPT, _GATE_TRAP)
_FRAME = struct.Struct("<5Q")  # RIP, CS, RFLAGS, RSP, SS
_PIECE = 4  # widest access unicorn hands an MMIO callback


class _WideAccess:
    """One guest MMIO access done on the bus as a whole.  Unicorn then delivers it as
    aligned pieces (also covering neighbouring bytes): reads are served from ``data``
    (0 outside the access), writes are dropped."""

    __slots__ = ("addr", "data", "pieces", "size")

    def __init__(self, addr: int, size: int, data: bytes) -> None:
        self.addr = addr
        self.size = size
        self.data = data  # read result (size bytes); empty for a write
        self.pieces = 0

    def piece(self, addr: int, size: int) -> int:
        """The value of piece ``[addr, addr + size)`` of a read."""
        self.pieces += 1
        lo, hi = max(addr, self.addr), min(addr + size, self.addr + self.size)
        if not self.data or hi <= lo:
            return 0
        part = self.data[lo - self.addr : hi - self.addr]
        return int.from_bytes(part, "little") << (8 * (lo - addr))


class SoftCpuUnavailable(RuntimeError):
    """unicorn is not installed (pip install 'pyvirtio[emulator]')."""


class SoftCpu:
    name = "soft"

    def __init__(self, machine: Machine) -> None:
        if unicorn is None:
            raise SoftCpuUnavailable("the soft CPU needs unicorn>=2.1 (extra 'emulator')")
        self.machine = machine
        ram = machine.memory
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.mem_map_ptr(0, ram.size, unicorn.UC_PROT_ALL, ram.host_addr)
        self.uc = uc
        self._ins_left = 0  # elements left in the current emulated KVM read-ahead batch
        self._error: BaseException | None = None
        uc.hook_add(unicorn.UC_HOOK_INSN, self._on_in, None, 1, 0, ux.UC_X86_INS_IN)
        uc.hook_add(unicorn.UC_HOOK_INSN, self._on_out, None, 1, 0, ux.UC_X86_INS_OUT)
        self._mapped: set[int] = set()  # MMIO pages routed to the bus
        self._wide: _WideAccess | None = None
        # Every guest-physical address past RAM is MMIO: see each access whole.
        uc.hook_add(
            unicorn.UC_HOOK_MEM_READ | unicorn.UC_HOOK_MEM_WRITE,
            self._on_mmio_access,
            None,
            ram.size,
            IDENTITY_LIMIT - 1,
        )
        for m in machine.bus.mmio:
            start = m.base & ~(PAGE_SIZE - 1)
            end = (m.end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
            self._map_mmio(start, end - start)
        # Like KVM, any guest-physical address below 4 GiB that is not RAM is MMIO (and
        # reads as all ones unless a device is there): map such pages on first touch.
        uc.hook_add(
            unicorn.UC_HOOK_MEM_READ_UNMAPPED | unicorn.UC_HOOK_MEM_WRITE_UNMAPPED,
            self._on_unmapped,
        )
        self._pc = 0
        self._stopped: tuple[int, tuple[str, int, int] | None] | None = None
        self._swallow: tuple[str, int, int] | None = None
        self._limit: int | None = None
        self._deadline: float | None = None

    def _map_mmio(self, start: int, length: int) -> None:
        pages = [p for p in range(start, start + length, PAGE_SIZE) if p not in self._mapped]
        for page in pages:  # page by page: windows may share pages
            self.uc.mmio_map(page, PAGE_SIZE, self._on_mmio_read, page, self._on_mmio_write, page)
            self._mapped.add(page)

    def _on_unmapped(self, uc, access, address, size, value, _user) -> bool:
        page = address & ~(PAGE_SIZE - 1)
        last = (address + max(size, 1) - 1) & ~(PAGE_SIZE - 1)
        if page < self.machine.memory.size or last >= IDENTITY_LIMIT:
            return False  # a fault, as on KVM (past the identity map: #PF)
        try:
            self._map_mmio(page, last + PAGE_SIZE - page)
        except unicorn.UcError:
            return False
        return True

    def reset(self, entry: int, stack: int) -> None:
        self._pc = entry
        uc = self.uc
        # Same descriptor tables as the KVM backend, so IRETQ can reload CS/SS.
        uc.reg_write(ux.UC_X86_REG_GDTR, (0, memory.GDT_ADDR, memory.gdt_limit(), 0))
        uc.reg_write(ux.UC_X86_REG_IDTR, (0, memory.IDT_ADDR, 0, 0))
        uc.reg_write(ux.UC_X86_REG_CS, memory.CODE_SELECTOR)
        for reg in (ux.UC_X86_REG_SS, ux.UC_X86_REG_DS, ux.UC_X86_REG_ES):
            uc.reg_write(reg, memory.DATA_SELECTOR)
        self.uc.reg_write(ux.UC_X86_REG_RSP, stack)
        self.uc.reg_write(ux.UC_X86_REG_RFLAGS, 0x2)

    # -- hooks (exceptions must not propagate through unicorn's C frames) -------------------
    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except BaseException as exc:
            self._error = exc
            self.uc.emu_stop()
            return 0

    def _is_string_in(self, uc) -> tuple[bool, bool]:
        rip = uc.reg_read(ux.UC_X86_REG_RIP)
        code = bytes(uc.mem_read(rip, max(0, min(15, self.machine.memory.size - rip))))
        rep = False
        i = 0
        while i < len(code) and (code[i] in _PREFIXES or 0x40 <= code[i] <= 0x4F):
            rep = rep or code[i] in _REP_PREFIXES  # KVM treats REPNE like REP for INS
            i += 1
        return (i < len(code) and code[i] in _OP_INS), rep

    def _check_limits(self) -> None:
        total = self.machine.bus.stats.total
        if self._limit is not None and total >= self._limit:
            raise ExitLimit(f"guest still running after {total} exits")
        if self._deadline is not None and not total & 0x3FF and time.monotonic() > self._deadline:
            raise ExitLimit("guest still running at the deadline")

    def _in(self, uc, port: int, size: int) -> int:
        self._check_limits()
        bus = self.machine.bus
        is_string, rep = self._is_string_in(uc)
        if not is_string:
            self._ins_left = 0
            bus.account(REASON_PIO, bus.pio, port, size, False)
            value = bus.access(bus.pio, port, size, None)
            bus.exit_done()
            return value
        if self._ins_left == 0:
            count = uc.reg_read(ux.UC_X86_REG_RCX) if rep else 1
            rdi = uc.reg_read(ux.UC_X86_REG_RDI)
            flags = uc.reg_read(ux.UC_X86_REG_RFLAGS)
            off = rdi & (PAGE_SIZE - 1)
            in_page = off if flags & _EFLAGS_DF else PAGE_SIZE - off
            self._ins_left = max(1, min(in_page, PIO_READ_CACHE // size, count))
            bus.account(REASON_PIO, bus.pio, port, size, False)
        self._ins_left -= 1
        value = bus.access(bus.pio, port, size, None)
        if self._ins_left == 0:
            bus.exit_done()
        return value

    def _on_in(self, uc, port, size, _user):
        return self._guard(self._in, uc, port, size)

    def _out(self, port: int, size: int, value: int) -> None:
        self._check_limits()
        bus = self.machine.bus
        self._ins_left = 0
        if bus.ioeventfds and bus.try_ioeventfd(bus.pio, port, size, value):
            return
        if self._swallow == ("pio", port, size):
            self._swallow = None
            return  # the paused instruction completing: its write was done already
        bus.account(REASON_PIO, bus.pio, port, size, True)
        bus.access(bus.pio, port, size, value)
        bus.exit_done()
        if self.machine.stop_requested:
            self._stop_after(("pio", port, size))

    def _on_out(self, uc, port, size, value, _user):
        self._guard(self._out, port, size, value)

    def _mmio(self, addr: int, size: int, value: int | None) -> int:
        self._check_limits()
        bus = self.machine.bus
        if value is not None and bus.ioeventfds and bus.try_ioeventfd(bus.mmio, addr, size, value):
            return 0
        if value is not None and self._swallow == ("mmio", addr, size):
            self._swallow = None
            return 0  # the paused instruction completing: its write was done already
        bus.account(REASON_MMIO, bus.mmio, addr, size, value is not None)
        out = bus.access(bus.mmio, addr, size, value)
        bus.exit_done()
        if self.machine.stop_requested:
            self._stop_after(("mmio", addr, size) if value is not None else None)
        return out

    def _stop_after(self, write: tuple[str, int, int] | None) -> None:
        """Stop at the machine's request (a pause).  Unicorn may stop *before* the
        instruction doing this access retires; ``run`` then completes it with its
        write swallowed, so that the instruction runs exactly once (as on KVM)."""
        self._stopped = (self.uc.reg_read(ux.UC_X86_REG_RIP), write)
        self.uc.emu_stop()

    def _whole(self, write: bool, addr: int, size: int, value: int) -> None:
        """A guest access (memory hook, before unicorn splits it): wider than a piece or
        unaligned, it is done here as one exit per page it touches (like KVM)."""
        w = self._wide
        if w is not None and w.addr == addr and w.size == size and not w.pieces:
            return  # the same access retried after a page was mapped on first touch
        self._wide = None
        if size <= _PIECE and addr % size == 0:
            return  # delivered whole to the MMIO callback
        value &= (1 << (8 * size)) - 1
        data = b""
        first = min(size, PAGE_SIZE - addr % PAGE_SIZE)
        for start, n in ((0, first), (first, size - first)):
            if n == 0:
                continue
            part = (value >> (8 * start)) & ((1 << (8 * n)) - 1)
            out = self._mmio(addr + start, n, part if write else None)
            data += b"" if write else out.to_bytes(n, "little")
        self._wide = _WideAccess(addr, size, data)

    def _on_mmio_access(self, uc, access, address, size, value, _user):
        self._guard(self._whole, access == unicorn.UC_MEM_WRITE, address, size, value)

    def _piece(self, addr: int, size: int, value: int | None) -> int:
        if self._error is not None:
            return 0  # the access already failed; unicorn finishes the instruction
        if self._wide is not None:  # a piece of the access the memory hook did
            return self._wide.piece(addr, size)
        return self._mmio(addr, size, value)

    def _on_mmio_read(self, uc, offset, size, base):
        return self._guard(self._piece, base + offset, size, None)

    def _on_mmio_write(self, uc, offset, size, value, base):
        self._guard(self._piece, base + offset, size, value)

    # -- run -----------------------------------------------------------------------------------
    def run(self, max_exits: int | None = None, deadline: float | None = None) -> None:
        stats = self.machine.bus.stats
        self._limit = None if max_exits is None else stats.total + max_exits
        self._deadline = deadline
        while True:
            timeout_us = 0
            if deadline is not None:
                timeout_us = max(1, int((deadline - time.monotonic()) * 1e6))
            if self.machine.async_error is not None:
                raise self.machine.async_error
            try:
                self.uc.emu_start(self._pc, -1 & 0xFFFF_FFFF_FFFF_FFFF, timeout=timeout_us)
            except unicorn.UcError as exc:
                if self._error is None:
                    rip = self.uc.reg_read(ux.UC_X86_REG_RIP)
                    raise GuestFault(f"soft: {exc} at rip={rip:#x}") from exc
            self._pc = self.uc.reg_read(ux.UC_X86_REG_RIP)
            if self.machine.async_error is not None:
                raise self.machine.async_error
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if self.machine.stop_requested:
                self._finish_stopped_instruction()
                return
            # emu_start returned by itself: HLT (RIP is past it) or the timeout.
            if bytes(self.uc.mem_read(self._pc - 1, 1)) != b"\xf4" or (
                deadline is not None and time.monotonic() > deadline
            ):
                raise ExitLimit(f"guest still running at the deadline (rip={self._pc:#x})")
            stats.count(REASON_HLT, CPU_DEVICE, REASON_HLT.lower())
            rflags = self.uc.reg_read(ux.UC_X86_REG_RFLAGS)
            resume, vector = self.machine.on_hlt(bool(rflags & _EFLAGS_IF))
            if not resume:
                return
            if vector is not None:
                self._deliver(vector, rflags)
            self._check_limits()

    def _finish_stopped_instruction(self) -> None:
        stopped, self._stopped = self._stopped, None
        if stopped is None or stopped[0] != self._pc:
            return  # stopped after the instruction: nothing to finish
        if stopped[1] is None:
            raise GuestFault("soft: stopped inside an instruction that read a device")
        self._swallow = stopped[1]
        try:
            self.uc.emu_start(self._pc, -1 & 0xFFFF_FFFF_FFFF_FFFF, count=1)
        finally:
            self._swallow = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        self._pc = self.uc.reg_read(ux.UC_X86_REG_RIP)

    def _deliver(self, vector: int, rflags: int) -> None:
        """Deliver an external interrupt through the guest IDT, as the CPU does in
        64-bit mode: align RSP to 16, push SS, RSP, RFLAGS, CS, RIP, clear IF (interrupt
        gate), jump to the gate's offset.  A bad gate is a fault (a triple fault on KVM)."""
        uc = self.uc
        _sel, base, limit, _flags = uc.reg_read(ux.UC_X86_REG_IDTR)
        if 16 * vector + 15 > limit:
            raise GuestFault(f"soft: vector {vector:#x} beyond the IDT limit {limit:#x}")
        gate = bytes(uc.mem_read(base + 16 * vector, 16))
        off0, selector, _ist, attr, off1, off2, _res = _GATE.unpack(gate)
        if not attr & _GATE_PRESENT or attr & _GATE_TYPE_MASK not in _GATE_TYPES:
            raise GuestFault(f"soft: IDT gate {vector:#x} not present or not a 64-bit gate")
        target = off0 | off1 << 16 | off2 << 32
        rsp = uc.reg_read(ux.UC_X86_REG_RSP)
        ss = uc.reg_read(ux.UC_X86_REG_SS)
        cs = uc.reg_read(ux.UC_X86_REG_CS)
        new_rsp = (rsp & ~0xF) - _FRAME.size
        uc.mem_write(new_rsp, _FRAME.pack(self._pc, cs, rflags, rsp, ss))
        uc.reg_write(ux.UC_X86_REG_RSP, new_rsp)
        if attr & _GATE_TYPE_MASK == _GATE_INTERRUPT:
            uc.reg_write(ux.UC_X86_REG_RFLAGS, rflags & ~_EFLAGS_IF)
        if selector != cs:
            uc.reg_write(ux.UC_X86_REG_CS, selector)
        self._pc = target

    def regs(self) -> dict[str, int]:
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip", "rflags"]
        return {n: self.uc.reg_read(getattr(ux, f"UC_X86_REG_{n.upper()}")) for n in names}

    def save_cpu(self) -> dict:
        """The CPU state between exits (see ``KvmCpu.save_cpu``: the same portable form).
        Only taken when ``emu_start`` has returned, so no instruction is half done."""
        uc = self.uc
        gprs = {n: uc.reg_read(getattr(ux, f"UC_X86_REG_{n.upper()}")) for n in GPR_NAMES}
        gprs["rip"] = self._pc
        _sel, idt_base, idt_limit, _f = uc.reg_read(ux.UC_X86_REG_IDTR)
        _sel, gdt_base, gdt_limit, _f = uc.reg_read(ux.UC_X86_REG_GDTR)
        return {
            "gprs": gprs,
            "idt": [idt_base, idt_limit],
            "gdt": [gdt_base, gdt_limit],
            "cr3": uc.reg_read(ux.UC_X86_REG_CR3) or memory.PML4_ADDR,
            "selectors": {
                "cs": uc.reg_read(ux.UC_X86_REG_CS),
                "ss": uc.reg_read(ux.UC_X86_REG_SS),
            },
        }

    def load_cpu(self, state: dict) -> None:
        check_cpu_state(state)
        gprs = state["gprs"]
        self.reset(gprs["rip"], gprs["rsp"])
        uc = self.uc
        for name, value in gprs.items():
            if name != "rip":
                uc.reg_write(getattr(ux, f"UC_X86_REG_{name.upper()}"), value)
        uc.reg_write(ux.UC_X86_REG_IDTR, (0, state["idt"][0], state["idt"][1], 0))
        uc.reg_write(ux.UC_X86_REG_GDTR, (0, state["gdt"][0], state["gdt"][1], 0))

    def kick(self) -> None:
        """From another thread: unicorn's ``emu_stop`` (thread-safe: it is how unicorn's
        own timeout thread stops a run) returns ``emu_start``; ``run`` then raises
        ``machine.async_error``, which it also checks before each ``emu_start``."""
        uc = self.uc
        if uc is not None:
            with contextlib.suppress(unicorn.UcError):
                uc.emu_stop()

    def close(self) -> None:
        self.uc = None  # type: ignore[assignment]
