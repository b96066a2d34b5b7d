"""virtio-pci devices in the emulator, and the ``virtio-pci`` workload paths.

:func:`add_virtio_pci` puts any ``VirtioDevice`` (blk, rng, ...) on the machine's PCI
bus behind ``virtio.transport.pci.PciTransport``: a slot on bus 0 (the host bridge at
0xCF8/0xCFC is created on first use), BAR 0 assigned from the PCI memory window as
firmware would, INTx on line :data:`VIRTIO_PCI_IRQ`, MSI-X messages delivered by the
machine (:meth:`Machine.deliver_msi`).  :func:`attach_vhost_user_pci` does the same
for a device served by a vhost-user back-end (``emulator.vhost_user``): the rings go
to the back-end at DRIVER_OK and each queue's notify address is an ioeventfd, so on
KVM a kick is no VMM exit at all.

In-process devices keep the execution model of ``emulator.virtio_mmio``: the notify
write is an exit, the device serves the whole batch before the vCPU resumes
(``TrioRunner``), so exit counts are exact and equal on KVM and the soft CPU.

The guest program is the very ``guest-drivers/virtio_blk.c`` of the virtio-mmio paths:
a parameter block with ``mmio_base`` 0 tells it to find its device on the PCI bus
(``guest-drivers/virtio_pci.h``).  Interrupt completion (``irq=True``) uses MSI-X in
IDT mode (no register access in the handler: 1 exit per batch, the HLT) and INTx +
the ISR status in HLT wake-up mode.

Paths: ``virtio-pci`` (split ring + EVENT_IDX), ``virtio-pci-packed``, and
``vhost-user-pci`` (``virtio serve blk`` in another process).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from emulator import run as _run
from emulator import virtio_mmio as _vmmio
from emulator import workload_disk as _disk
from emulator.machine import Machine
from emulator.pci.function import BarAllocator, PciFunction
from emulator.pci.host import pci_host
from virtio.device import VirtioDevice
from virtio.memory import FdRegion, MmapGuestMemory
from virtio.transport.mmio import TrioRunner
from virtio.transport.pci import NOTIFY_WIDTH, PciTransport

if TYPE_CHECKING:
    from emulator.vhost_user import VhostUserClient

VIRTIO_PCI_IRQ = 11
"""INTx line of virtio-pci functions (vector 0x20 + 11 when delivered through the IDT)."""


def _allocator(m: Machine) -> BarAllocator:
    alloc = m.devices.get("pci-bar-allocator")
    if alloc is None:
        alloc = BarAllocator()
        m.devices["pci-bar-allocator"] = alloc
    assert isinstance(alloc, BarAllocator)
    return alloc


def _guest_memory(m: Machine) -> Callable[[], MmapGuestMemory]:
    memories: list[MmapGuestMemory] = []
    m.closers.append(lambda: [mem.close() for mem in memories])

    def guest_memory() -> MmapGuestMemory:
        memories.append(MmapGuestMemory([FdRegion(0, m.ram_size, m.ram_fd)]))
        return memories[-1]

    return guest_memory


def plug(
    m: Machine, transport: PciTransport, *, irq: int = VIRTIO_PCI_IRQ, slot: int | None = None
):
    """Put ``transport`` on the machine's PCI bus; returns its ``PciFunction``."""
    function = PciFunction(m, transport, irq=irq)
    function.assign_bars(_allocator(m))
    pci_host(m).add(function, slot)
    m.irq_line(irq)
    m.devices[transport.name] = transport
    return function


def add_virtio_pci(
    m: Machine,
    device: VirtioDevice,
    *,
    name: str | None = None,
    irq: int = VIRTIO_PCI_IRQ,
    slot: int | None = None,
    runner: TrioRunner | None = None,
) -> PciTransport:
    """``device`` as a virtio-pci function of ``m``, served in process and synchronously
    (one ``TrioRunner`` for the machine unless ``runner`` is given).  The machine closes
    what this creates; ``transport.function`` is the ``PciFunction``."""
    if runner is None:
        runner = TrioRunner(name=f"{name or 'virtio-pci'}-device")
        m.closers.append(runner.close)
    transport = PciTransport(
        device, _guest_memory(m), runner=runner, name=name or f"virtio-pci-{device.device_id}"
    )
    transport.function = plug(m, transport, irq=irq, slot=slot)  # type: ignore[attr-defined]
    return transport


def attach_vhost_user_pci(
    m: Machine,
    client: VhostUserClient,
    *,
    name: str = "vhost-user-blk",
    irq: int = VIRTIO_PCI_IRQ,
    slot: int | None = None,
    **backend_kwargs,
) -> PciTransport:
    """The device served by ``client``'s back-end as a virtio-pci function: the
    ``VhostUserBackend`` of the virtio-mmio front-end behind a ``PciTransport``, queue
    notify addresses as ioeventfds (2 bytes, datamatch = queue index) whenever BAR 0 is
    mapped."""
    from emulator import vhost_user as _vu

    backend = _vu.VhostUserBackend(m, client, **backend_kwargs)
    m.closers.append(backend.close)
    transport = PciTransport(backend, _guest_memory(m), name=name, ring_reset=False)
    function = plug(m, transport, irq=irq, slot=slot)
    registered: list = []

    def on_map(bar: int, base: int | None) -> None:
        while registered:
            m.remove_ioeventfd(registered.pop())
        if base is None:
            return
        for v in backend.vrings:
            addr = base + transport.notify_address(v.index)
            m.ioeventfd(addr, NOTIFY_WIDTH, v.kick, datamatch=v.index)
            registered.append(m.ioeventfds[-1])

    function.on_map.append(on_map)
    m.irqfd(backend.irq_fd, irq)  # the notifier wakes a halted guest when the back-end dies
    transport.function = function  # type: ignore[attr-defined]
    backend.start_notifier(transport)  # type: ignore[arg-type]
    return transport


# -- workload paths ------------------------------------------------------------------------
def _write_params(m: Machine, spec: _run.WorkloadSpec, *, event_idx: bool, packed: bool) -> None:
    m.write_params(
        _vmmio.VIRTIO_PARAMS.pack(
            _run.PARAMS_MAGIC, _run.PARAMS_VERSION, spec.irq_param, VIRTIO_PCI_IRQ,
            spec.nreqs, spec.queue_depth, int(event_idx), int(packed),
            0, _vmmio.RING_ADDR, _vmmio.BUF_ADDR, _vmmio.HDR_ADDR,  # mmio_base 0: PCI
            spec.seed, _vmmio.QUEUE_SIZE, 1, _run.REQUEST_BYTES,
        )
    )  # fmt: skip


def _setup(*, event_idx: bool, packed: bool):
    def setup(m: Machine, spec: _run.WorkloadSpec) -> Callable[[], bool]:
        blk, backend = _disk.workload_blk(
            m, spec, queue_size=_vmmio.QUEUE_SIZE, serial="pyvirtio-pci"
        )
        transport = add_virtio_pci(m, blk, name="virtio-blk")
        _write_params(m, spec, event_idx=event_idx, packed=packed)

        def verify() -> bool:
            if transport.errors:
                return False
            return _disk.disk_ok(_disk.read_disk(backend, _disk.written_bytes(spec)), spec)

        return verify

    return setup


def _vhost_user_setup(m: Machine, spec: _run.WorkloadSpec) -> Callable[[], bool]:
    from emulator import vhost_user as _vu

    tmp = tempfile.mkdtemp(prefix="pyvirtio-vu-pci-")
    m.closers.append(lambda: shutil.rmtree(tmp, ignore_errors=True))  # runs last
    image = spec.image or os.path.join(tmp, "disk.img")
    _disk.ensure_image(image, _disk.disk_size(spec))
    sock = os.path.join(tmp, "vhost-user.sock")
    process = _vu.BackendProcess(
        _vu.backend_argv("ours", sock, image, _vmmio.QUEUE_SIZE), os.path.join(tmp, "log")
    )
    m.closers.append(process.stop)
    client = _vu.VhostUserClient.connect(sock, alive=process.exit_reason)
    try:
        dev = attach_vhost_user_pci(m, client, queue_max=_vmmio.QUEUE_SIZE)
    except BaseException:
        client.close()
        raise
    dev.backend.process = process  # type: ignore[attr-defined]
    _write_params(m, spec, event_idx=True, packed=False)

    def verify() -> bool:
        if dev.errors:
            return False
        return _disk.disk_ok(_disk.read_image(image, _disk.written_bytes(spec)), spec)

    return verify


def _phase_ios(nreqs: int) -> tuple[int, ...]:
    return (nreqs, 0, nreqs)


PATHS = {
    "virtio-pci": (True, False, "virtio-blk over virtio-pci (modern), split ring + EVENT_IDX"),
    "virtio-pci-packed": (True, True, "virtio-blk over virtio-pci, packed ring + EVENT_IDX"),
}

for _name, (_evidx, _packed, _desc) in PATHS.items():
    _run.register_path(
        _name,
        _run.WorkloadPath(
            "virtio_blk",
            _setup(event_idx=_evidx, packed=_packed),
            _vmmio.MAX_QUEUE_DEPTH,
            _desc,
            _run.IDE_PHASES,
            _phase_ios,
            extra={"event_idx": _evidx, "packed": _packed, "transport": "pci"},
        ),
    )
_run.register_path(
    "vhost-user-pci",
    _run.WorkloadPath(
        "virtio_blk",
        _vhost_user_setup,
        _vmmio.MAX_QUEUE_DEPTH,
        "virtio-blk over virtio-pci, device in a vhost-user back-end (virtio serve blk);"
        " ioeventfd notify addresses, MSI-X or INTx calls",
        _run.IDE_PHASES,
        _phase_ios,
        extra={"event_idx": True, "packed": False, "backend": "ours", "transport": "pci"},
    ),
)
