"""The ``virtio-mmio`` workload paths: virtio-blk in the VMM behind a virtio-mmio transport.

The device is ``virtio.devices.blk.VirtioBlk`` (the very class the vhost-user backend
serves) over a ``MemoryBackend`` (default) or a raw image file (``image=``), behind
``virtio.transport.mmio.MmioTransport`` mapped at :data:`MMIO_BASE` with interrupt line
:data:`VIRTIO_IRQ`.  The guest program is ``guest-drivers/virtio_blk.c``.

QueueNotify is an ordinary MMIO exit (no ioeventfd): the transport services the queue
on that exit, in the ``TrioRunner`` thread, before the vCPU resumes (see
``virtio.transport.mmio``).  So the guest always finds the whole batch completed, exit
counts are deterministic, and they are the same on KVM and on the soft CPU.

Registered paths (all 4 KiB requests, write + flush + read-verify):

* ``virtio-mmio``: split ring with VIRTIO_F_EVENT_IDX (the default driver setup);
* ``virtio-mmio-noevent``: split ring, flag-based suppression (no EVENT_IDX);
* ``virtio-mmio-packed``: packed ring (VIRTIO_F_RING_PACKED) with EVENT_IDX.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from emulator import memory
from emulator import run as _run
from emulator import workload_disk as _disk
from emulator.machine import Machine
from virtio.memory import FdRegion, MmapGuestMemory
from virtio.spec.mmio import VIRTIO_MMIO_REGION_SIZE
from virtio.transport.mmio import MmioTransport, TrioRunner

MMIO_BASE = 0xD000_0000
"""Below 4 GiB and above any RAM size the runner uses; mapped uncached by the page tables."""
VIRTIO_IRQ = 5
QUEUE_SIZE = 256
MAX_QUEUE_DEPTH = 64  # 3 descriptors per request must fit in QUEUE_SIZE
RING_ADDR = 0x300000
HDR_ADDR = 0x310000
BUF_ADDR = 0x400000

# struct params in guest-drivers/virtio_blk.c
VIRTIO_PARAMS = struct.Struct("<8I4Q4I")
# ... and its last field, poll_spins, written apart (a zero, left by writers of the
# fields above, means the program's default): used-ring polls between two Status reads.
POLL_SPINS_PARAM = struct.Struct("<I")
POLL_FOREVER = 0xFFFF_FFFF
"""``poll_spins``: never read Status while polling (a device the VMM watches itself)."""


def write_poll_spins(m: Machine, spins: int) -> None:
    """Set ``poll_spins`` in a ``virtio_blk.c`` parameter block already written."""
    m.memory.write(memory.PARAMS_ADDR + VIRTIO_PARAMS.size, POLL_SPINS_PARAM.pack(spins))


# Guest result codes (VE_* in guest-drivers/virtio_mmio.h)
RESULT_NAMES = {
    1: "bad parameters",
    2: "bad magic",
    3: "not a version 2 device",
    4: "not a block device",
    5: "features missing",
    6: "FEATURES_OK refused",
    7: "queue setup failed",
    8: "capacity too small",
    9: "write failed",
    10: "read failed",
    11: "flush failed",
    12: "verification failed",
    13: "device needs reset",
}


def _setup(*, event_idx: bool, packed: bool):
    def setup(m: Machine, spec: _run.WorkloadSpec) -> Callable[[], bool]:
        blk, backend = _disk.workload_blk(m, spec, queue_size=QUEUE_SIZE, serial="pyvirtio-mmio")
        mem_holder: list[MmapGuestMemory] = []

        def guest_memory() -> MmapGuestMemory:
            mem = MmapGuestMemory([FdRegion(0, m.ram_size, m.ram_fd)])
            mem_holder.append(mem)
            return mem

        m.closers.append(lambda: [mem.close() for mem in mem_holder])
        runner = TrioRunner(name="virtio-mmio-device")
        m.closers.append(runner.close)
        transport = MmioTransport(
            blk, guest_memory, m.irq_line(VIRTIO_IRQ), runner=runner, name="virtio-blk"
        )
        m.bus.add_mmio(MMIO_BASE, VIRTIO_MMIO_REGION_SIZE, transport)
        m.devices["virtio-blk"] = transport
        m.write_params(
            VIRTIO_PARAMS.pack(
                _run.PARAMS_MAGIC, _run.PARAMS_VERSION, spec.irq_param, VIRTIO_IRQ,
                spec.nreqs, spec.queue_depth, int(event_idx), int(packed),
                MMIO_BASE, RING_ADDR, BUF_ADDR, HDR_ADDR,
                spec.seed, QUEUE_SIZE, 1, _run.REQUEST_BYTES,
            )
        )  # fmt: skip

        def verify() -> bool:
            if transport.errors:
                return False
            return _disk.disk_ok(_disk.read_disk(backend, _disk.written_bytes(spec)), spec)

        return verify

    return setup


def _phase_ios(nreqs: int) -> tuple[int, ...]:
    return (nreqs, 0, nreqs)


PATHS = {
    "virtio-mmio": (True, False, "virtio-blk over virtio-mmio, split ring + EVENT_IDX"),
    "virtio-mmio-noevent": (False, False, "virtio-blk over virtio-mmio, split ring, no EVENT_IDX"),
    "virtio-mmio-packed": (True, True, "virtio-blk over virtio-mmio, packed ring + EVENT_IDX"),
}

for _name, (_evidx, _packed, _desc) in PATHS.items():
    _run.register_path(
        _name,
        _run.WorkloadPath(
            "virtio_blk",
            _setup(event_idx=_evidx, packed=_packed),
            MAX_QUEUE_DEPTH,
            _desc,
            _run.IDE_PHASES,
            _phase_ios,
            extra={"event_idx": _evidx, "packed": _packed},
        ),
    )
