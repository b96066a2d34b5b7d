"""CPU backends: a common run loop contract and the KVM implementation.

A backend runs the guest until it stops and routes every exit through the machine:

* PIO / MMIO -> ``machine.bus`` (accounted + dispatched);
* HLT -> counted as ``"HLT"``, then ``machine.on_hlt(IF)`` decides: stop, resume at
  the next instruction, or deliver an interrupt vector through the guest's IDT;
* anything fatal (triple fault, entry failure, emulation error) -> :class:`GuestFault`.

Interrupts are only delivered at a HLT (see :mod:`emulator.machine`), which keeps the
exit counts identical on both backends.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import TYPE_CHECKING, Protocol

from emulator import exits, memory
from emulator.exits import CPU_DEVICE, FailExit, HltExit, MmioExit, OtherExit, PioExit, ShutdownExit
from emulator.kvm import KvmError, KvmUnavailable, abi

if TYPE_CHECKING:
    from emulator.machine import Machine


class GuestFault(RuntimeError):
    """The guest crashed (triple fault, invalid instruction, bad memory access...)."""


class ExitLimit(RuntimeError):
    """The guest did not stop within the allowed number of exits or time."""


class CpuBackend(Protocol):
    name: str

    def reset(self, entry: int, stack: int) -> None: ...

    def run(self, max_exits: int | None = None, deadline: float | None = None) -> None: ...

    def close(self) -> None: ...

    def kick(self) -> None:
        """From another thread: make ``run`` look at ``machine.async_error`` soon."""

    def save_cpu(self) -> dict: ...

    def load_cpu(self, state: dict) -> None: ...


GPR_NAMES = tuple(abi.REG_NAMES)
"""The registers a CPU state carries (``struct kvm_regs`` order: rax..r15, rip, rflags)."""
LONG_MODE_SELECTORS = {"cs": memory.CODE_SELECTOR, "ss": memory.DATA_SELECTOR}


class CpuStateError(RuntimeError):
    """A saved CPU state this backend cannot take (e.g. a CR3 the soft CPU cannot load)."""


def check_cpu_state(state: dict) -> None:
    """Validate a saved CPU state (untrusted: it comes from a file)."""
    gprs = state.get("gprs")
    if not isinstance(gprs, dict) or set(gprs) != set(GPR_NAMES):
        raise CpuStateError(f"CPU state must have the registers {', '.join(GPR_NAMES)}")
    for name, value in gprs.items():
        if not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise CpuStateError(f"register {name} = {value!r} is not a 64-bit value")
    for table in ("idt", "gdt"):
        base, limit = state.get(table, (None, None))
        if not isinstance(base, int) or not isinstance(limit, int) or not 0 <= limit <= 0xFFFF:
            raise CpuStateError(f"{table.upper()}R {state.get(table)!r} is not (base, limit)")
    if state.get("cr3") != memory.PML4_ADDR:
        raise CpuStateError(
            f"CR3 {state.get('cr3')!r} is not the emulator's page table ({memory.PML4_ADDR:#x}):"
            " guest programs run on the identity map the machine builds"
        )
    if state.get("selectors") != LONG_MODE_SELECTORS:
        raise CpuStateError(
            f"segment selectors {state.get('selectors')!r} are not the flat long-mode ones"
        )


_TIMER_PERIOD = 0.05


def _ignore_signal(signum: int, frame: object) -> None:
    pass


class KvmCpu:
    """One long-mode vCPU on /dev/kvm (no in-kernel irqchip: HLT exits to us)."""

    name = "kvm"

    def __init__(self, machine: Machine) -> None:
        from emulator.vm import Vm

        self.machine = machine
        self.vm = Vm()
        try:
            ram = machine.memory
            self.vm.set_user_memory_region(0, ram.size, ram.host_addr)
            self.vcpu = self.vm.create_vcpu(0)
            self.vcpu.set_cpuid2(self.vm.supported_cpuid())
            for reg in machine.ioeventfds:
                self.vm.ioeventfd(reg.addr, reg.size, reg.fd, reg.datamatch, reg.pio)
        except BaseException:
            self.vm.close()
            raise

    def reset(self, entry: int, stack: int) -> None:
        s = self.vcpu.get_sregs()
        s.update(memory.long_mode_segments())
        s["gdt"] = (memory.GDT_ADDR, memory.gdt_limit())
        s["idt"] = (memory.IDT_ADDR, 0)
        s["cr0"] = memory.LONG_MODE_CR0
        s["cr3"] = memory.PML4_ADDR
        s["cr4"] = memory.LONG_MODE_CR4
        s["efer"] = memory.LONG_MODE_EFER
        self.vcpu.set_sregs(s)
        self.vcpu.set_regs({"rip": entry, "rsp": stack, "rflags": 0x2})

    def run(self, max_exits: int | None = None, deadline: float | None = None) -> None:
        # A guest spinning without exits never returns from KVM_RUN: with a deadline, a
        # periodic SIGALRM (main thread only) makes KVM_RUN return with EINTR.
        # Whoever had SIGALRM / ITIMER_REAL before (e.g. a test timeout) gets both back.
        timer = deadline is not None and threading.current_thread() is threading.main_thread()
        if timer:
            t0 = time.monotonic()
            old = signal.signal(signal.SIGALRM, _ignore_signal)
            old_delay, old_interval = signal.setitimer(
                signal.ITIMER_REAL, _TIMER_PERIOD, _TIMER_PERIOD
            )
        try:
            self._run(max_exits, deadline)
        finally:
            if timer:
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
                signal.signal(signal.SIGALRM, old)
                if old_delay > 0:
                    left = max(old_delay - (time.monotonic() - t0), 1e-3)
                    signal.setitimer(signal.ITIMER_REAL, left, old_interval)

    def _run(self, max_exits: int | None, deadline: float | None) -> None:
        bus = self.machine.bus
        vcpu = self.vcpu
        n = 0
        while True:
            e = vcpu.run()
            if self.machine.async_error is not None:
                raise self.machine.async_error
            if isinstance(e, OtherExit) and e.kvm_reason == abi.KVM_EXIT_INTR:
                # a signal, not a guest exit: not accounted
                if deadline is not None and time.monotonic() > deadline:
                    raise ExitLimit("guest still running at the deadline")
                continue
            n += 1
            if isinstance(e, PioExit):
                data = bus.handle_pio(e.port, e.size, e.is_write, e.count, e.data)
                if not e.is_write:
                    vcpu.complete_in(e, data)
            elif isinstance(e, MmioExit):
                data = bus.handle_mmio(e.addr, e.size, e.is_write, e.data)
                if not e.is_write:
                    vcpu.complete_mmio_read(e, data)
            elif isinstance(e, HltExit):
                bus.stats.count(e.reason, CPU_DEVICE, e.reason.lower())
                resume, vector = self.machine.on_hlt(vcpu.if_flag)
                if not resume:
                    return
                if vector is not None:
                    if not vcpu.ready_for_interrupt_injection:  # pragma: no cover
                        raise GuestFault("kvm: halted with IF=1 but not ready for injection")
                    vcpu.interrupt(vector)
            elif isinstance(e, ShutdownExit | FailExit):
                bus.stats.count(e.reason, CPU_DEVICE, e.reason.lower())
                regs = vcpu.get_regs()
                raise GuestFault(f"kvm: {e} at rip={regs['rip']:#x}")
            else:
                bus.stats.count(e.reason, CPU_DEVICE, e.reason.lower())
            if self.machine.stop_requested:
                return
            if max_exits is not None and n >= max_exits:
                raise ExitLimit(f"guest still running after {n} exits")
            if deadline is not None and not n & 0x3FF and time.monotonic() > deadline:
                raise ExitLimit("guest still running at the deadline")

    def regs(self) -> dict[str, int]:
        return self.vcpu.get_regs()

    def save_cpu(self) -> dict:
        """The vCPU's architectural state between exits, in the portable form the soft CPU
        also takes.  A KVM_RUN with ``immediate_exit`` first completes an IN or MMIO read
        still pending in the run page (KVM's documented way to make the state consistent)."""
        vcpu = self.vcpu
        vcpu.run_page[abi.RUN_IMMEDIATE_EXIT] = 1
        try:
            e = vcpu.run()
        finally:
            vcpu.run_page[abi.RUN_IMMEDIATE_EXIT] = 0
        if not (isinstance(e, OtherExit) and e.kvm_reason == abi.KVM_EXIT_INTR):
            raise GuestFault(f"kvm: immediate exit returned {e} instead of EINTR")
        s = vcpu.get_sregs()
        return {
            "gprs": vcpu.get_regs(),
            "idt": list(s["idt"]),
            "gdt": list(s["gdt"]),
            "cr3": s["cr3"],
            "selectors": {"cs": s["cs"]["selector"], "ss": s["ss"]["selector"]},
        }

    def load_cpu(self, state: dict) -> None:
        check_cpu_state(state)
        gprs = state["gprs"]
        self.reset(gprs["rip"], gprs["rsp"])
        s = self.vcpu.get_sregs()
        s["idt"] = tuple(state["idt"])
        s["gdt"] = tuple(state["gdt"])
        self.vcpu.set_sregs(s)
        self.vcpu.set_regs(dict(gprs))

    def kick(self) -> None:
        """Nothing to do: with a deadline, the periodic SIGALRM already makes KVM_RUN
        return every ``_TIMER_PERIOD`` (signals go to the vCPU thread, the main one), and
        ``_run`` checks ``machine.async_error`` after every return."""

    def close(self) -> None:
        self.vm.close()


_KVM_PROBE: tuple[bool, str] | None = None

# Probe guest (64-bit): out 0xE9, al ; hlt
_PROBE_CODE = bytes.fromhex("b04be6e9f4")


def kvm_usable(refresh: bool = False) -> tuple[bool, str]:
    """Can we run a 64-bit guest on /dev/kvm here?  ``(ok, reason)``, cached.

    Opens /dev/kvm, builds a VM with the same long-mode setup the machine uses and runs
    a two-instruction guest (``out`` + ``hlt``).
    """
    global _KVM_PROBE
    if _KVM_PROBE is not None and not refresh:
        return _KVM_PROBE
    from emulator.machine import Machine

    try:
        m = Machine(ram_size=4 << 20, cpu="kvm")
        try:
            m.idle_hlt_stops = True
            m.memory.write(memory.LOAD_ADDR, _PROBE_CODE)
            m.start(memory.LOAD_ADDR)
            m.run(max_exits=10)
            ok = m.debug.text == "K" and m.bus.stats.by_reason.get(exits.REASON_HLT) == 1
            _KVM_PROBE = (ok, "ok" if ok else f"probe guest misbehaved: {m.debug.text!r}")
        finally:
            m.close()
    except KvmUnavailable as exc:
        _KVM_PROBE = (False, str(exc))
    except (KvmError, GuestFault, ExitLimit, OSError) as exc:
        _KVM_PROBE = (False, f"long-mode probe failed: {exc}")
    return _KVM_PROBE
