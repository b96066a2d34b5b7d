"""``run_driver``: one guest program against one device, with the toolkit around it.

The device is the project's own ``VirtioDevice`` for the type (``devices.DEVICES``),
in strict mode, behind the emulator's virtio-mmio transport or, with
``transport="pci"``, a virtio-pci function on bus 0 (``emulator.pci``; synchronous
mode: ``TrioRunner``), with a :class:`~emulator.drvkit.timing.TimingGate` as its completion
gate.  The transport is mapped through :class:`DriverPort`, which sees every register
access: it traces them, notices status changes, and gives each driver error its
context (register, value, queue, guest RIP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emulator import guest_build
from emulator.cpu import ExitLimit, GuestFault
from emulator.drvkit import abi
from emulator.drvkit.devices import DEVICES, DeviceKind, DeviceOptions
from emulator.drvkit.inject import Injection, Injector, parse
from emulator.drvkit.timing import TimingGate, TimingParams
from emulator.drvkit.trace import Tracer
from emulator.machine import GuestHalted, Machine
from virtio.errors import DriverError
from virtio.memory import FdRegion, MmapGuestMemory
from virtio.queues.chain import DescriptorChain
from virtio.service import QueueRole, QueueService
from virtio.spec.mmio import VIRTIO_MMIO_REGION_SIZE, MmioReg
from virtio.spec.status import DeviceStatus
from virtio.transport.mmio import MmioTransport, TrioRunner
from virtio.transport.pci import PciTransport

MMIO_BASE = 0xD000_0000
IRQ_LINE = 5
DEFAULT_RAM = 32 << 20
_NOTIFY = int(MmioReg.VIRTIO_MMIO_QUEUE_NOTIFY)


class RunDriverError(ValueError):
    """A run that cannot start: unknown device, unavailable transport, bad program."""


def status_names(value: int) -> list[str]:
    return [s.name for s in DeviceStatus if value & int(s)]  # type: ignore[misc]


@dataclass
class DriverRun:
    """The outcome (``as_dict()`` is the ``--json`` document)."""

    data: dict = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return bool(self.data.get("success"))

    @property
    def exit_status(self) -> int:
        return 0 if self.success else 1

    @property
    def driver_errors(self) -> list[dict]:
        return self.data["driver_errors"]

    def clauses(self) -> list[str]:
        return [e["clause"] for e in self.driver_errors]

    def as_dict(self) -> dict:
        return self.data

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2)


class Session:
    """The pieces of one run, for the port, the gate hooks and the injector."""

    def __init__(self, m: Machine, kind: DeviceKind, opts: DeviceOptions, gate: TimingGate):
        self.machine = m
        self.kind = kind
        self.gate = gate
        self.device = kind.make(opts)
        self.tracer: Tracer | None = None
        self.transport: MmioTransport | PciTransport
        self.errors: list[dict] = []
        self._nerr = 0
        self._status = 0
        self._irq = False
        self._vqs: dict[int, object] = {}
        self.host = None
        """The device's host side (``DeviceKind.host``: input's typist), or ``None``."""

    @property
    def exits(self) -> int:
        return self.gate.now

    # -- snapshots (run-driver --save-at / --restore, emulator/snapshot.py) ----------------
    def save_state(self) -> dict:
        t = self.transport
        return {
            "transport": t.save_state(),
            "events": [[isinstance(e, DriverError), str(e)] for e in t.errors],
            "gate": self.gate.save_state(),
            "injector": {"log": self.injector.log, "refusals": self.injector._refusals},
            "errors": self.errors,
            "status": self._status,
            "irq": self._irq,
            "host": self.host.save_state() if self.host is not None else None,
        }

    def load_state(self, state: dict) -> None:
        t = self.transport
        t.load_state(state["transport"])
        t.errors = [
            DriverError(f"(before the snapshot) {msg}") if driver else RuntimeError(msg)
            for driver, msg in state["events"]
        ]  # type: ignore[misc]
        self._nerr = len(t.errors)
        self.errors = list(state["errors"])
        self._status, self._irq = int(state["status"]), bool(state["irq"])
        self.injector.log = list(state["injector"]["log"])
        self.injector._refusals = int(state["injector"]["refusals"])
        if self.host is not None and state.get("host") is not None:
            self.host.load_state(state["host"])
        gate_state = state["gate"]
        held = {int(h[3]) for h in [*gate_state["held"], *gate_state.get("waiting", [])]}
        services: dict[int, QueueService] = {}
        active = t.active
        if held and active is None:
            raise ValueError("held completions but the device is not live")
        if active is not None:
            # Buffer queues serve again at once: they wait for data, not for a kick (net
            # receive, input events); request queues start at their next notification.
            device = self.device
            filled = {
                i
                for i, q in enumerate(t.queues)
                if q.vq is not None and device.queue_role(i) is QueueRole.BUFFERS
            }
            indices = sorted(held | filled)

            async def start_services() -> None:
                run = device.service_run(active)
                for i in indices:
                    await run.ensure(i)
                restored = getattr(device, "after_restore", None)
                if restored is not None:
                    restored()
                await run.settle()

            assert t.runner is not None
            t.runner.call(start_services)
            services = dict(active.services)
        self.gate.load_state(state["gate"], services)

    def trace(self, event: str, /, **fields: object) -> None:
        if self.tracer is not None:
            self.tracer.add(self.gate.now, event, **fields)

    # -- hooks ----------------------------------------------------------------------------
    def irq(self, raw):
        def set_level(level: bool) -> None:
            raw(level)
            if bool(level) != self._irq:
                self._irq = bool(level)
                t = self.transport
                isr = t.isr if isinstance(t, PciTransport) else t.interrupt_status
                self.trace("irq", level=int(level), isr=isr)

        return set_level

    def on_exit(self) -> None:
        self.gate.tick()
        self.injector.on_exit(self.gate.now)
        if self.host is not None:
            self.host.on_exit(self.gate.now)
        self.sync()

    def on_idle(self) -> bool:
        """The guest sleeps with nothing pending: the device finishes what it holds,
        else the host acts, else time jumps to the next ``@exit=N`` injection."""
        progressed = self.gate.idle() or (self.host is not None and self.host.on_idle())
        if not progressed:
            at = self.injector.next_exit(self.gate.now)
            if at is not None:
                self.gate.now = at
                self.injector.on_exit(at)
                progressed = True
        self.sync()
        return progressed

    def on_release(self, service: QueueService, items: Sequence[tuple[DescriptorChain, int]]):
        if self.tracer is not None:
            self.trace(
                "used",
                queue=service.index,
                heads=",".join(str(c.head) for c, _ in items),
                lens=",".join(str(n) for _, n in items),
            )

    def on_hold(self, service: QueueService, chain: DescriptorChain, until: int) -> None:
        self.trace("hold", queue=service.index, head=chain.head, until=until)

    def on_defer(self, service: QueueService, chain: DescriptorChain, until: int) -> None:
        self.trace("defer", queue=service.index, head=chain.head, until=until)

    def device_call(self, starts: list, queues: list[int]) -> None:
        """Start requests the timing model admits, in the device's loop, and return
        once the device settled (their work done or parked).  A driver error found
        meanwhile names the queue (``admitted``: not during a register access)."""
        t = self.transport
        active = t.active
        if active is None or t.runner is None:
            return

        async def run() -> None:
            for start in starts:
                start()
            await active.wait_settled()

        t.runner.call(run)
        self.sync({"queue": queues[0], "admitted": True} if len(queues) == 1 else None)

    def sync(self, access: dict | None = None) -> None:
        """After anything the guest or the device did: status changes, new errors."""
        t = self.transport
        if t.status != self._status:
            old, self._status = self._status, t.status
            self.trace("status", old=old, new=t.status, names="|".join(status_names(t.status)))
        if len(t.errors) > self._nerr:
            new = t.errors[self._nerr :]
            self._nerr = len(t.errors)
            for exc in new:
                if isinstance(exc, DriverError):
                    self._record(exc, access)
                else:
                    self.trace("inject-effect", note=str(exc))
        if self.tracer is not None:
            for i, q in enumerate(t.queues):
                if q.vq is not None and self._vqs.get(i) is not q.vq:
                    self._vqs[i] = q.vq
                    q.vq.inflight = _PopTracer(self, i, q.vq.packed)

    def _record(self, exc: DriverError, access: dict | None) -> None:
        s = exc.spec_section
        entry: dict = {
            "class": type(exc).__name__,
            "clause": s.number if s is not None else exc.section.split(" ")[0],
            "label": s.label if s is not None else "",
            "section": exc.section,
            "message": exc.message,
            "exit": self.gate.now,
        }
        if access is not None:
            entry.update(access)
            if access.get("register") == "queue_notify" and "value" in access:
                entry["queue"] = access["value"] & 0xFFFF
        cpu = self.machine.cpu
        if cpu is not None:
            with contextlib.suppress(Exception):  # best effort: the CPU state may not give it
                entry["rip"] = hex(cpu.regs()["rip"])
        self.errors.append(entry)
        self.trace(
            "error",
            **{"class": entry["class"]},
            clause=entry["clause"],
            label=entry["label"],
            message=entry["message"],
            **{k: entry[k] for k in ("register", "rip") if k in entry},
        )


class _PopTracer:
    """``Virtqueue.inflight`` observer: traces every chain the device takes."""

    def __init__(self, session: Session, index: int, packed: bool) -> None:
        self.session, self.index, self.ring = session, index, "packed" if packed else "split"

    def on_pop(self, chains: Sequence[DescriptorChain]) -> None:
        for c in chains:
            segs = ",".join(
                f"{s.addr:#x}+{s.length}:{'w' if s.writable else 'r'}" for s in c.segments
            )
            self.session.trace(
                "pop", queue=self.index, head=c.head, ndesc=c.ndesc, ring=self.ring, segs=segs
            )

    def on_used(self, chains: Sequence[DescriptorChain], used_idx: int) -> None:
        pass  # traced with the lengths by the gate (Session.on_release)


class DriverPort:
    """The transport as the bus sees it under run-driver (same name and registers)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport = session.transport
        self.name = self.transport.name

    def __getattr__(self, name: str):
        # virtio-pci: the PciFunction reads the BARs, IDs and capabilities through here.
        return getattr(self.__dict__["transport"], name)

    def register_name(self, offset: int, is_write: bool) -> str:
        return self.transport.register_name(offset, is_write)

    def read(self, offset: int, size: int) -> int:
        s = self.session
        value = self.transport.read(offset, size)
        reg = self.transport.register_name(offset, False)
        s.trace("read", reg=reg, off=offset, size=size, value=value)
        s.sync({"register": reg, "access": "read", "offset": offset, "size": size, "value": value})
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        s = self.session
        reg = self.transport.register_name(offset, True)
        s.trace("write", reg=reg, off=offset, size=size, value=value)
        if (offset == _NOTIFY and size == 4) or reg == "queue_notify":
            s.trace("notify", queue=value & 0xFFFF)
        self.transport.write(offset, size, value)
        s.sync({"register": reg, "access": "write", "offset": offset, "size": size, "value": value})


def _plug_pci(m: Machine, s: Session, guest_memory, runner: TrioRunner, device: str):
    """The device as a virtio-pci function on bus 0 (BAR 0 assigned as firmware would,
    INTx on ``VIRTIO_PCI_IRQ``, MSI-X delivered by the machine), its BAR seen through a
    :class:`DriverPort`.  Returns (BAR 0 address, INTx line, bus/device/function)."""
    from emulator.pci.function import PciFunction
    from emulator.pci.host import pci_host
    from emulator.pci.virtio import VIRTIO_PCI_IRQ, _allocator

    t = PciTransport(s.device, guest_memory, runner=runner, name=f"virtio-{device}")
    s.transport = t
    function = PciFunction(m, DriverPort(s), irq=VIRTIO_PCI_IRQ)
    function.assign_bars(_allocator(m))
    pci_host(m).add(function)
    m.irq_line(VIRTIO_PCI_IRQ)
    t.intx = s.irq(function.set_intx)
    t.msi = function.send_msi
    t.function = function  # type: ignore[attr-defined]
    assert function.slot is not None
    return function.bar_base[0], VIRTIO_PCI_IRQ, function.slot << 11


def _device_counters(device) -> dict:
    """What the device type counts for the driver developer (net: the wire; input:
    events delivered and status events)."""
    wire = getattr(device, "wire_statistics", None)
    if wire is not None:
        return {**wire(), "errors": dict(device.errors)}
    if hasattr(device, "status_events"):
        return {**device.statistics(), "status_events": [list(e) for e in device.status_events]}
    return {}


def _load_program(program: str | Path) -> Path:
    path = Path(program)
    if not path.exists():
        raise RunDriverError(f"{program}: no such file")
    if path.suffix == ".c":
        return guest_build.build_source(path)
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise RunDriverError(f"{program}: neither a .c file nor an ELF executable")
    return path


def template_path(device: str) -> Path:
    """The template driver of a device type (``guest-drivers/templates``)."""
    return guest_build.TEMPLATES_DIR / DEVICES[device].template


def run_driver(
    program: str | Path | None,
    device: str = "blk",
    *,
    transport: str = "mmio",
    cpu: str = "auto",
    disk: str | None = None,
    timing: str = "inline",
    seed: int = 0,
    timing_params: TimingParams | None = None,
    inject: Sequence[str | Injection] = (),
    trace: str | Path | None = None,
    strict: bool = True,
    args: Sequence[int] = (),
    timeout: float = 120.0,
    ram_size: int = DEFAULT_RAM,
    save_at: int | None = None,
    save_to: str | Path | None = None,
    restore: str | Path | None = None,
) -> DriverRun:
    """Run guest ``program`` (a C file or an ELF) against a ``device`` and report.

    ``save_at=N, save_to=FILE``: pause after exit N (the first write exit from N on),
    save the VM to FILE (``emulator.snapshot``: RAM, CPU, device and queue state,
    requests the timing model holds, injections done), then carry on.
    ``restore=FILE``: instead of loading ``program``, restore FILE and carry on from
    there (on ``cpu``, which may differ from the one that saved it); the device, timing
    model, seed, injections, strictness and arguments are the snapshot's (the values
    given here are ignored); the disk is a memory disk unless ``disk`` names a raw file,
    which the saved contents are written into."""
    snap = None
    if restore is not None:
        from emulator import snapshot

        snap = snapshot.read(restore)
        r = snap.recipe
        if r.get("kind") != "run-driver":
            raise RunDriverError(f"{restore}: not a run-driver snapshot")
        device, transport, timing = str(r["device"]), str(r["transport"]), str(r["timing"])
        seed, strict, ram_size = int(r["seed"]), bool(r["strict"]), int(r["ram_size"])
        timing_params = TimingParams(**r["timing_params"])
        inject, args = list(r["inject"]), [int(a) for a in r["args"]]
    if (save_at is None) != (save_to is None):
        raise RunDriverError("save_at and save_to go together")
    if device not in DEVICES:
        raise RunDriverError(f"unknown device {device!r}; known: {', '.join(sorted(DEVICES))}")
    if transport not in abi.TRANSPORTS:
        raise RunDriverError(f"unknown transport {transport!r}; known: mmio, pci")
    if len(args) > abi.MAX_ARGS:
        raise RunDriverError(f"at most {abi.MAX_ARGS} --arg values")
    injections = [i if isinstance(i, Injection) else parse(i) for i in inject]
    elf = _load_program(program) if snap is None else None
    kind = DEVICES[device]
    gate = TimingGate(timing, seed, timing_params)
    gate.in_order = set(kind.in_order)
    recipe = {
        "kind": "run-driver", "device": device, "transport": transport, "timing": timing,
        "seed": seed, "timing_params": dataclasses.asdict(gate.params),
        "inject": [i.text for i in injections], "strict": strict, "args": list(args),
        "ram_size": ram_size,
    }  # fmt: skip
    saved_at: int | None = None
    opts = DeviceOptions(disk=disk)
    m = Machine(ram_size=ram_size, cpu=cpu)
    runner: TrioRunner | None = None
    halt: str | None = None
    try:
        m.closers.extend(opts.closers)
        s = Session(m, kind, opts, gate)
        m.closers.extend(opts.closers[len(m.closers) :])
        s.tracer = Tracer() if trace is not None else None
        s.device.strict = strict
        s.device.completion_gate = gate
        s.injector = Injector(s, injections)
        s.injector.setup_device()
        if kind.host is not None:
            s.host = kind.host(s)
        gate.on_complete.append(s.injector.on_complete)
        gate.on_hold = s.on_hold if s.tracer is not None else None
        gate.on_defer = s.on_defer if s.tracer is not None else None
        gate.device_call = s.device_call
        gate.on_release = s.on_release
        held: list[MmapGuestMemory] = []

        def guest_memory() -> MmapGuestMemory:
            held.append(MmapGuestMemory([FdRegion(0, m.ram_size, m.ram_fd)]))
            return held[-1]

        m.closers.append(lambda: [mem.close() for mem in held])
        runner = TrioRunner(name=f"run-driver-{device}")
        if transport == "pci":
            regs_base, irq_line, pci_bdf = _plug_pci(m, s, guest_memory, runner, device)
        else:
            s.transport = MmioTransport(
                s.device, guest_memory, s.irq(m.irq_line(IRQ_LINE)), runner=runner,
                name=f"virtio-{device}",
            )  # fmt: skip
            m.bus.add_mmio(MMIO_BASE, VIRTIO_MMIO_REGION_SIZE, DriverPort(s))
            regs_base, irq_line, pci_bdf = MMIO_BASE, IRQ_LINE, 0
        m.bus.after_exit.append(s.on_exit)
        m.idle_hooks.append(s.on_idle)
        m.devices["run-driver"] = s
        if snap is None:
            assert elf is not None
            image = m.load_elf(elf)
            params = abi.Params(
                int(kind.device_id), transport, regs_base, irq_line, ram_size,
                abi.heap_base(image.end), tuple(args), pci_bdf,
            )  # fmt: skip
            m.write_params(params.pack())
        else:
            from emulator import snapshot

            snapshot.apply(m, snap)
            s.trace("restored", file=str(restore), exit=s.exits)
        if s.tracer is not None:
            s.tracer.restart_clock()
        try:
            if save_at is not None:
                from emulator import snapshot

                m.pause_at_exit(save_at)
                m.run(timeout=timeout)
                if m.paused:
                    saved_at = m.bus.stats.total
                    snapshot.write(snapshot.capture(m, recipe), save_to)  # type: ignore[arg-type]
                    s.trace("saved", file=str(save_to), exit=s.exits)
                    m.resume()
                    m.run(timeout=timeout)
            else:
                m.run(timeout=timeout)
        except GuestHalted as exc:
            halt = f"halted: {exc}"
        except ExitLimit as exc:
            halt = f"timeout: {exc}"
        except GuestFault as exc:
            halt = f"guest fault: {exc}"
        s.sync()
        dbg = m.debug
        if halt is not None:
            s.trace("halt", reason=halt)
        elif dbg.result is not None:
            s.trace("result", value=dbg.result)
        t = s.transport
        result = dbg.result
        data = {
            "program": str(program),
            "device": device,
            "transport": transport,
            "cpu": m.cpu_name,
            "timing": timing,
            "seed": seed,
            "strict": strict,
            "args": list(args),
            "result": result,
            "result_name": abi.RESULT_NAMES.get(result or 0, "ok" if result == 0 else ""),
            "halt": halt,
            "success": result == 0 and halt is None and not s.errors,
            "output": dbg.text,
            "progress": dbg.ios,
            "values": {str(k): v for k, v in sorted(dbg.values.items())},
            "driver_errors": s.errors,
            "device_status": {
                "value": t.status,
                "names": status_names(t.status),
                "needs_reset": bool(t.status & int(DeviceStatus.DEVICE_NEEDS_RESET)),
                "failed": bool(t.status & int(DeviceStatus.FAILED)),
            },
            "device_events": [str(e) for e in t.errors if not isinstance(e, DriverError)],
            "exits_total": m.bus.stats.total,
            "exits_by_reason": dict(sorted(m.bus.stats.by_reason.items())),
            "interrupts_raised": t.interrupts_raised,
            "requests_served": gate.released,
            "requests_held_at_end": gate.held,
            "injections": s.injector.log,
            "device_counters": _device_counters(s.device),
            "saved_at_exit": saved_at,
            "restored_from": str(restore) if restore is not None else None,
        }
        if s.tracer is not None and trace is not None:
            lines, chrome = s.tracer.write(trace)
            data["trace"] = {"lines": str(lines), "chrome_json": str(chrome)}
        return DriverRun(data)
    finally:
        if runner is not None:
            runner.close()
        m.close()
