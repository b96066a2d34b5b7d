"""The ``virtio-input`` workload paths: a keyboard over virtio-mmio, events from the host.

The device is ``virtio.devices.input.VirtioInput`` with the built-in keyboard's
capabilities (the class ``virtio serve input`` runs under vhost-user) behind
``MmioTransport`` (synchronous mode) at :data:`MMIO_BASE`, IRQ :data:`IRQ`.  The
guest program (``guest-drivers/virtio_input.c``) keeps the eventq full and sleeps
(``sti; hlt``) until events come.  Events are injected by a machine *idle hook*: each
time the guest halts with no interrupt pending, the next ``queue_depth`` groups
(EV_KEY + SYN_REPORT) go to ``VirtioInput.inject`` and the hook waits until the
device has settled, so the used ring is filled and the line raised before the vCPU
resumes.  Exit counts are thus exact: per injection one HLT, the InterruptStatus read
and the InterruptACK write.  An I/O is one input event (8 bytes).

Paths: ``virtio-input`` (split ring + EVENT_IDX), ``virtio-input-noevent`` (flags).
``queue_depth`` is the burst: groups per injection (1: single key events).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from emulator import run as _run
from emulator.machine import Machine
from virtio.devices.input import VirtioInput, builtin
from virtio.memory import FdRegion, MmapGuestMemory
from virtio.spec.mmio import VIRTIO_MMIO_REGION_SIZE
from virtio.transport.mmio import MmioTransport, TrioRunner

MMIO_BASE = 0xD000_2000
IRQ = 7
QUEUE_SIZE = 64
MAX_BURST = QUEUE_SIZE // 2  # groups of two events that fit the eventq at once
RING_ADDR = 0x300000
BUF_ADDR = 0x400000
EVENT_BYTES = 8
EV_SYN, EV_KEY, SYN_REPORT = 0, 1, 0

# struct params in guest-drivers/virtio_input.c
INPUT_PARAMS = struct.Struct("<10I3Q")


def expected_event(i: int, seed: int) -> tuple[int, int, int]:
    """Event ``i`` of the workload (``expected()`` in virtio_input.c)."""
    g = i // 2
    if i & 1:
        return (EV_SYN, SYN_REPORT, 0)
    h = ((g ^ seed) * 2654435761) & 0xFFFF_FFFF
    return (EV_KEY, 16 + (h >> 16) % 40, 0 if g & 1 else 1)


def group_count(total_bytes: int, burst: int) -> int:
    """Key groups for a workload of ``total_bytes`` of events: a multiple of ``burst``."""
    groups = total_bytes // (2 * EVENT_BYTES)
    return max(burst, groups // burst * burst)


def _event_count(total_bytes: int, burst: int) -> int:
    return 2 * group_count(total_bytes, burst)


def _setup(*, event_idx: bool):
    def setup(m: Machine, spec: _run.WorkloadSpec) -> Callable[[], bool]:
        burst = spec.queue_depth
        if burst > MAX_BURST:
            raise ValueError(f"virtio-input: at most {MAX_BURST} groups per injection")
        ngroups = group_count(spec.total_bytes, burst)
        device = VirtioInput(builtin("keyboard"))
        held: list[MmapGuestMemory] = []

        def guest_memory() -> MmapGuestMemory:
            held.append(MmapGuestMemory([FdRegion(0, m.ram_size, m.ram_fd)]))
            return held[-1]

        m.closers.append(lambda: [mem.close() for mem in held])
        runner = TrioRunner(name="virtio-input-device")
        m.closers.append(runner.close)
        transport = MmioTransport(
            device, guest_memory, m.irq_line(IRQ), runner=runner, name="virtio-input"
        )
        m.bus.add_mmio(MMIO_BASE, VIRTIO_MMIO_REGION_SIZE, transport)
        m.devices[transport.name] = transport
        events = [expected_event(i, spec.seed) for i in range(2 * ngroups)]
        state = {"next": 0}

        async def inject_and_settle(chunk: list) -> None:
            device.inject(chunk)
            active = transport.active
            if active is not None:
                await active.wait_settled()

        def on_idle() -> bool:
            start = state["next"]
            if start >= len(events) or transport.active is None:
                return False
            chunk = events[start : start + 2 * burst]
            state["next"] = start + len(chunk)
            runner.call(inject_and_settle, chunk)
            return True

        m.idle_hooks.append(on_idle)
        m.write_params(
            INPUT_PARAMS.pack(
                _run.PARAMS_MAGIC, _run.PARAMS_VERSION, ngroups, burst, spec.seed,
                int(event_idx), 0, QUEUE_SIZE, IRQ, 0, MMIO_BASE, RING_ADDR, BUF_ADDR,
            )
        )  # fmt: skip

        def verify() -> bool:
            return (
                not transport.errors
                and m.debug.ios == len(events)
                and device.events_delivered == len(events)
                and device.groups_dropped == 0
            )

        return verify

    return setup


PATHS = {
    "virtio-input": (True, "virtio-input keyboard over virtio-mmio, split ring + EVENT_IDX"),
    "virtio-input-noevent": (False, "virtio-input keyboard over virtio-mmio, split ring"),
}

for _name, (_evidx, _desc) in PATHS.items():
    _run.register_path(
        _name,
        _run.WorkloadPath(
            "virtio_input",
            _setup(event_idx=_evidx),
            MAX_BURST,
            _desc,
            (),
            None,
            extra={"io_bytes": EVENT_BYTES, "unit": "event", "count": _event_count},
        ),
    )
