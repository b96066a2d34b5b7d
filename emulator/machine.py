"""A machine: memfd RAM + long-mode setup + a CPU backend + the device bus.

Typical use::

    m = Machine(ram_size=32 << 20, cpu="auto")
    ide = IdeController(MemoryBackend(8 << 20), memory=m.memory, irq=m.irq_line(14))
    ide.attach(m.bus)
    m.load_elf(path)                # or m.memory.write(...) + m.start(entry)
    m.write_params(blob)            # parameter block at memory.PARAMS_ADDR
    m.run(timeout=30)
    m.window                        # ExitStats between the guest's BEGIN/END marks
    m.phases                        # [(mark, ExitStats, seconds)] between consecutive marks

Interrupts: devices get ``machine.irq_line(n)``, a callable taking the line level
(``irqfd`` eventfds act as edges).  There is no PIC/APIC model and no in-kernel
irqchip; interrupts are delivered only when the guest halts, so the semantics and the
exit counts are the same on KVM and on the soft CPU:

* HLT with IF=0 and a line up: the guest resumes after the HLT ("HLT wake-up") and
  reads the device status itself;
* HLT with IF=1 (``sti; hlt``) and a line up: vector ``0x20 + irq`` is delivered
  through the guest's IDT (KVM_INTERRUPT on KVM, a pushed interrupt frame on the soft
  CPU); the handler acknowledges the device; lines are level-triggered, no EOI;
* HLT with no line up: wait on registered irqfds, else stop (or ``GuestHalted``).

``Vm.create_irqchip``/``irqfd``/``ioeventfd`` (KVM ioctls) are available for a
future backend that wants in-kernel delivery; :meth:`Machine.ioeventfd` and
:meth:`Machine.irqfd` give the same effect on both CPU backends.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from pathlib import Path

from emulator import memory
from emulator.bus import Bus, IoEventFd
from emulator.cpu import CpuBackend, KvmCpu, kvm_usable
from emulator.devices.debugport import (
    BOCHS_PORT,
    CMD_BEGIN,
    CMD_END,
    DEBUG_BASE,
    DEBUG_LEN,
    DebugPort,
)
from emulator.elf import ElfImage, load_elf, parse_elf
from emulator.exits import REASON_PIO
from emulator.stats import ExitStats

CPU_CHOICES = ("kvm", "soft", "auto")
IRQ_VECTOR_BASE = 0x20  # IRQ n -> vector 0x20 + n (the usual PIC remapping)


class GuestHalted(RuntimeError):
    """The guest halted with no interrupt pending and without reporting a result."""


class Machine:
    def __init__(self, ram_size: int = 64 << 20, cpu: str = "auto") -> None:
        if cpu not in CPU_CHOICES:
            raise ValueError(f"cpu must be one of {CPU_CHOICES}, not {cpu!r}")
        self.requested_cpu = cpu
        self.memory = memory.GuestRam(ram_size)
        memory.build_long_mode_tables(self.memory.view)
        self.bus = Bus()
        self.debug = DebugPort()
        self.bus.add_pio(DEBUG_BASE, DEBUG_LEN, self.debug)
        self.bus.add_pio(BOCHS_PORT, 1, self.debug)
        self.debug.on_mark = self._mark
        self.irq_lines: dict[int, bool] = {}
        self.ioeventfds: list[IoEventFd] = []
        self.irqfds: dict[int, int | None] = {}  # eventfd -> gsi (None: the MSI wake-up)
        self._msi: set[int] = set()  # vectors of MSI messages not delivered yet
        self._msi_lock = threading.Lock()
        # Wakes a guest halted in on_hlt when another thread raises a line or an MSI.
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.irqfds[self._wake_fd] = None
        self._edges: set[int] = set()  # gsis raised by an irqfd since the last HLT wake-up
        self._deadline: float | None = None
        self.irq_vector_base = IRQ_VECTOR_BASE
        self.interrupts_delivered = 0
        self.devices: dict[str, object] = {"debug": self.debug}
        self.closers: list = []  # called by close() (e.g. disk image files)
        # Called when the guest halts with no line up: each returns True if it made
        # progress (e.g. a device model completed held requests); see on_hlt.
        self.idle_hooks: list = []
        self.stop_requested = False
        # Set from another thread by fail(): the vCPU stops and run() raises it.
        self.async_error: BaseException | None = None
        # Devices outside the VMM whose failure the VMM detects and reports with fail()
        # (vhost-user back-ends): a guest need not poll them for liveness.
        self.watched_devices = 0
        # HLT with no line up and no result reported: stop quietly (True) or raise.
        self.idle_hlt_stops = False
        self.image: ElfImage | None = None
        self.cpu: CpuBackend | None = None
        self.cpu_name: str | None = None
        self._entry: int | None = None
        self._marks: list[tuple[int, ExitStats, float]] = []
        self.window: ExitStats | None = None
        self.window_seconds: float | None = None
        self.phases: list[tuple[int, ExitStats, float]] = []
        self.run_seconds = 0.0
        self.pause_at: int | None = None  # see pause_at_exit()
        self.paused = False
        self.bus.after_exit.append(self._check_pause)

    # -- RAM (for vhost-user hand-off) ----------------------------------------------------
    @property
    def ram_fd(self) -> int:
        return self.memory.fd

    @property
    def ram_size(self) -> int:
        return self.memory.size

    @property
    def ram(self) -> memoryview:
        return self.memory.view

    # -- interrupts ---------------------------------------------------------------------
    def irq_line(self, irq: int):
        """A callable ``set(level: bool)`` for device interrupt line ``irq``."""
        self.irq_lines.setdefault(irq, False)

        def set_level(level: bool) -> None:
            self.irq_lines[irq] = bool(level)

        return set_level

    def set_irq_line(self, irq: int, level: bool) -> None:
        """Level-triggered line ``irq`` (what ``Vm.set_irq_line`` does with an irqchip)."""
        self.irq_lines[irq] = bool(level)

    def ioeventfd(
        self, addr: int, size: int, fd: int, datamatch: int | None = None, pio: bool = False
    ) -> None:
        """Guest writes at ``addr`` signal eventfd ``fd`` instead of exiting.

        KVM: a real KVM_IOEVENTFD (the write is handled in the kernel).  Soft CPU: the
        bus signals the eventfd from the access hook.  Either way the write is not
        an exit and does not reach the device.
        """
        reg = IoEventFd(addr, size, fd, datamatch, pio)
        self.ioeventfds.append(reg)
        self.bus.add_ioeventfd(reg)
        if isinstance(self.cpu, KvmCpu):
            self.cpu.vm.ioeventfd(addr, size, fd, datamatch, pio)

    def irqfd(self, fd: int, gsi: int) -> None:
        """Writing to eventfd ``fd`` (e.g. from a vhost-user backend) interrupts the guest.

        There is no in-kernel irqchip (see the module doc), so this is a user-space
        irqfd: when the guest halts with no line up, the machine waits on the
        registered eventfds and resumes the guest once one fires.  Same behaviour and
        exit counts on both CPU backends.
        """
        self.irqfds[fd] = gsi

    def remove_ioeventfd(self, reg: IoEventFd) -> None:
        """Undo :meth:`ioeventfd` (e.g. the notify area of a PCI BAR that moved)."""
        self.ioeventfds.remove(reg)
        self.bus.remove_ioeventfd(reg)
        if isinstance(self.cpu, KvmCpu):
            self.cpu.vm.ioeventfd(reg.addr, reg.size, reg.fd, reg.datamatch, reg.pio, deassign=True)

    def deliver_msi(self, vector: int) -> None:
        """An MSI message for ``vector`` (a PCI function's memory write to the interrupt
        range), from any thread.  Edge-triggered: delivered at the guest's next HLT,
        through the IDT (IF=1) or as a wake-up (IF=0), like the lines.  There is no
        in-kernel irqchip on either backend (see the module doc), so on KVM this is
        KVM_INTERRUPT injection rather than KVM's MSI routing."""
        with self._msi_lock:
            self._msi.add(vector)
        self.wake()

    def wake(self) -> None:
        """Make a guest halted in :meth:`on_hlt` look again at its lines and MSIs (for
        devices that raise them from another thread)."""
        if self._wake_fd >= 0:
            os.eventfd_write(self._wake_fd, 1)

    def _poll_irqfds(self, wait: bool) -> None:
        if not self.irqfds:
            return
        timeout = 0.0
        if wait:
            timeout = 1.0 if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        ready, _, _ = select.select(list(self.irqfds), [], [], timeout)
        for fd in ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
            gsi = self.irqfds[fd]
            if gsi is not None:
                self._edges.add(gsi)

    @property
    def irq_pending(self) -> bool:
        return any(self.irq_lines.values()) or bool(self._edges) or bool(self._msi)

    def on_hlt(self, interrupts_enabled: bool = False) -> tuple[bool, int | None]:
        """Called on every guest HLT.  Returns ``(resume, vector)``.

        ``resume`` is False when the run should stop (result reported, or nothing can
        ever wake the guest and ``idle_hlt_stops``).  With a line up: if the guest
        halted with IF=1, ``vector`` is ``irq_vector_base + irq`` of the lowest pending
        line, to be delivered through the IDT; with IF=0 the guest just resumes after
        the HLT (``vector`` None).
        """
        if self.debug.result is not None:
            return False, None  # the guest reported its result and parked itself
        self._poll_irqfds(wait=False)
        while not self.irq_pending and any([hook() for hook in self.idle_hooks]):
            pass  # the guest waits: let time-driven device work (completions) happen
        # Wait only if something outside the vCPU thread can interrupt (a real irqfd).
        while not self.irq_pending and any(g is not None for g in self.irqfds.values()):
            self._poll_irqfds(wait=True)
            if self._deadline is not None and time.monotonic() > self._deadline:
                break
        if self.irq_pending:
            if not interrupts_enabled:
                self._edges.clear()  # edge-triggered: one wake-up per irqfd signal
                with self._msi_lock:
                    self._msi.clear()
                return True, None
            levels = [irq for irq, up in self.irq_lines.items() if up]
            lines = levels + sorted(self._edges)
            with self._msi_lock:
                msi = min(self._msi, default=None)
                if msi is not None and (not lines or msi < self.irq_vector_base + min(lines)):
                    self._msi.discard(msi)
                    self.interrupts_delivered += 1
                    return True, msi
            irq = min(lines)
            self._edges.discard(irq)
            self.interrupts_delivered += 1
            return True, self.irq_vector_base + irq
        if not self.idle_hlt_stops:
            regs = self.cpu.regs() if self.cpu is not None else {}
            rip = regs.get("rip", 0)
            raise GuestHalted(f"guest halted with no interrupt pending (rip={rip:#x})")
        return False, None

    # -- pause and snapshot state (emulator.snapshot) ----------------------------------------
    def pause_at_exit(self, n: int) -> None:
        """Stop ``run()`` after the first PIO/MMIO *write* exit whose number (counting every
        exit since the machine started, as ``bus.stats.total``) is ``n`` or more; ``paused``
        is then True and the state can be saved.  Write exits because the guest's
        instruction is then complete on both CPU backends, and because exit numbers are
        the same on both, exit ``n`` names the same point of the guest program on each."""
        if n < 1:
            raise ValueError("the exit number counts from 1")
        self.pause_at = n

    def _check_pause(self) -> None:
        if (
            self.pause_at is not None
            and self.bus.stats.total >= self.pause_at
            and self.bus.last_exit_write
        ):
            self.pause_at = None
            self.paused = True
            self.stop_requested = True

    def resume(self) -> None:
        """Clear a pause so that ``run()`` carries on."""
        self.paused = False
        self.stop_requested = False

    def save_state(self) -> dict:
        """The machine's state besides RAM (CPU, interrupt lines, exit counters,
        measurement marks, every device's state) as plain data; only while paused (or
        before the first run).  A device without ``save_state`` cannot be saved: a
        ``RuntimeError`` names it."""
        if self.cpu is not None and not self.paused:
            raise RuntimeError("save_state() needs a paused machine (pause_at_exit)")
        devices = {}
        for name, dev in self.devices.items():
            save = getattr(dev, "save_state", None)
            if save is None:
                raise RuntimeError(f"device {name!r} ({type(dev).__name__}) cannot be saved")
            devices[name] = save()
        now = time.perf_counter()
        return {
            "cpu": self.cpu.save_cpu() if self.cpu is not None else None,
            "entry": self._entry,
            "irq_lines": [[irq, up] for irq, up in self.irq_lines.items()],
            "edges": sorted(self._edges),
            "msi": sorted(self._msi),  # MSI messages sent, not yet taken by the CPU
            "interrupts_delivered": self.interrupts_delivered,
            "stats": self.bus.stats.save_state(),
            "marks": [[cmd, st.save_state(), t - now] for cmd, st, t in self._marks],
            "devices": devices,
        }

    def load_state(self, state: dict) -> None:
        """Apply ``save_state()`` output to a machine built the same way (same devices on
        the same bus, RAM already written); the next ``run()`` carries on from there."""
        now = time.perf_counter()
        self.irq_lines = {int(irq): bool(up) for irq, up in state["irq_lines"]}
        self._edges = {int(g) for g in state["edges"]}
        with self._msi_lock:
            self._msi = {int(v) & 0xFF for v in state.get("msi", [])}
        self.interrupts_delivered = int(state["interrupts_delivered"])
        self.bus.stats = ExitStats.from_state(state["stats"])
        self._marks = [
            (int(cmd), ExitStats.from_state(st), now + float(dt)) for cmd, st, dt in state["marks"]
        ]
        missing = set(self.devices) ^ set(state["devices"])
        if missing:
            raise RuntimeError(f"the snapshot's devices differ from this machine's: {missing}")
        for name, dev in self.devices.items():
            dev.load_state(state["devices"][name])  # type: ignore[attr-defined]
        self._entry = state["entry"]
        if state["cpu"] is not None:
            if self.cpu is None:
                self.cpu = self._make_cpu()
            self.cpu.load_cpu(state["cpu"])

    # -- measurement window (debug port BEGIN / MARK / END) ---------------------------------
    def _mark(self, cmd: int) -> None:
        """Snapshot at a mark; the mark writes themselves are discounted from the counts."""
        now = time.perf_counter()
        if cmd == CMD_BEGIN:
            self._marks = []
        elif not self._marks:
            return  # a MARK or END outside a window
        snap = self.bus.stats.snapshot()
        n = len(self._marks) + 1  # mark writes seen in this window, this one included
        snap.total -= n
        snap.by_reason[REASON_PIO] -= n
        snap.by_device[self.debug.name] -= n
        snap.by_register[f"{self.debug.name}.cmd"] -= n
        self._marks.append((cmd, snap, now))
        if cmd == CMD_END:
            first, last = self._marks[0], self._marks[-1]
            self.window = last[1] - first[1]
            self.window_seconds = last[2] - first[2]
            self.phases = [
                (a[0], b[1] - a[1], b[2] - a[2])
                for a, b in zip(self._marks, self._marks[1:], strict=False)
            ]

    # -- loading ------------------------------------------------------------------------
    def load_elf(self, path_or_blob: str | Path | bytes) -> ElfImage:
        blob = path_or_blob if isinstance(path_or_blob, bytes) else Path(path_or_blob).read_bytes()
        image = parse_elf(blob)
        load_elf(image, self.memory.view, min_addr=memory.LOAD_ADDR)
        self.image = image
        self.start(image.entry)
        return image

    def write_params(self, blob: bytes) -> None:
        if len(blob) > memory.PML4_ADDR - memory.PARAMS_ADDR:
            raise ValueError("parameter block too large")
        self.memory.write(memory.PARAMS_ADDR, blob)

    def start(self, entry: int) -> None:
        """Set the entry point (RIP); the stack is ``memory.STACK_TOP`` minus a return slot."""
        self._entry = entry

    # -- CPU ---------------------------------------------------------------------------
    def _make_cpu(self) -> CpuBackend:
        choice = self.requested_cpu
        if choice == "auto":
            ok, _reason = kvm_usable()
            choice = "kvm" if ok else "soft"
        if choice == "kvm":
            cpu: CpuBackend = KvmCpu(self)
        else:
            from emulator.soft import SoftCpu

            cpu = SoftCpu(self)
        self.cpu_name = choice
        return cpu

    def run(self, max_exits: int | None = None, timeout: float | None = None) -> None:
        """Run the guest until it halts for good (or reports its result)."""
        if self._entry is None:
            raise RuntimeError("nothing to run: load_elf() or start() first")
        if self.cpu is None:
            self.cpu = self._make_cpu()
            # SysV: at function entry RSP + 8 is 16-byte aligned.
            self.cpu.reset(self._entry, memory.STACK_TOP - 8)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._deadline = deadline
        t0 = time.perf_counter()
        try:
            self.cpu.run(max_exits=max_exits, deadline=deadline)
        finally:
            self.run_seconds += time.perf_counter() - t0

    def fail(self, exc: BaseException) -> None:
        """From any thread: stop the vCPU and make :meth:`run` raise ``exc`` (the first
        one wins), even while the guest spins on RAM without exits -- e.g. a polling
        driver whose device lives in a vhost-user back-end that just died.  The soft CPU
        stops at once; KVM_RUN returns at the deadline timer's next tick (every 50 ms
        when ``run`` has a timeout; without one, at the guest's next exit)."""
        if self.async_error is None:
            self.async_error = exc
        cpu = self.cpu
        if cpu is not None:
            cpu.kick()

    def close(self) -> None:
        if self.cpu is not None:
            self.cpu.close()
            self.cpu = None
        while self.closers:
            self.closers.pop()()
        if self._wake_fd >= 0:
            self.irqfds.pop(self._wake_fd, None)
            os.close(self._wake_fd)
            self._wake_fd = -1
        self.memory.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
