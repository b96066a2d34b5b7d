"""The ``virtio-net`` workload paths: two virtio-net NICs of one machine on one switch.

Both NICs are ``virtio.devices.net.VirtioNet`` (the class ``virtio serve net`` runs
under vhost-user), ports of one ``virtio.devices.net.switch.Switch``, each behind its
own ``MmioTransport`` (synchronous mode) at :data:`MMIO_BASES` with IRQs
:data:`IRQS`.  The two transports share one ``TrioRunner``: a QueueNotify on NIC 0's
transmitq1 returns only when the whole loop is idle, i.e. after the switch delivered
the frames into NIC 1's receive buffers.  Exit counts are therefore deterministic and
equal on KVM and the soft CPU, as for virtio-blk (``emulator/virtio_mmio.py``).

The guest program (``guest-drivers/virtio_net.c``) runs the NE2000 path's workload
(``emulator/ne2000_paths.py``): half the frames from NIC 0 to NIC 1, half back,
``queue_depth`` frames per notify; an I/O is one packet, sent and received.

Registered paths: ``virtio-net`` (split ring + EVENT_IDX), ``virtio-net-packed``
(packed ring + EVENT_IDX), ``virtio-net-noevent`` (split, flag-based suppression).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from emulator import run as _run
from emulator.machine import Machine
from emulator.ne2000_paths import NET_PHASES, packet_count
from virtio.devices.net import VirtioNet
from virtio.devices.net.switch import Switch
from virtio.memory import FdRegion, MmapGuestMemory
from virtio.spec.mmio import VIRTIO_MMIO_REGION_SIZE
from virtio.transport.mmio import MmioTransport, TrioRunner

MMIO_BASES = (0xD000_0000, 0xD000_1000)
IRQS = (5, 6)
MACS = (bytes.fromhex("525400130001"), bytes.fromhex("525400130002"))
FRAME_LEN = 1514
QUEUE_SIZE = 256
MAX_QUEUE_DEPTH = 64  # MAX_BATCH in guest-drivers/virtio_net.c
RING_ADDR = 0x300000  # 4 queues * 64 KiB
BUF_ADDR = 0x400000  # 2 NICs * 1 MiB

VALUE_BAD_HEADERS = 5  # dbg_value key: receive headers with num_buffers != 1 or a GSO type

# struct params in guest-drivers/virtio_net.c
NET_PARAMS = struct.Struct("<12I2Q2Q")

RESULT_NAMES = {
    1: "bad parameters",
    2: "bad magic",
    3: "not a version 2 device",
    4: "not a network device",
    5: "features missing",
    6: "FEATURES_OK refused",
    7: "queue setup failed",
    10: "bad receive buffer id",
    12: "verification failed",
    13: "device needs reset",
}


def params(
    npackets: int, batch: int, irq: int, seed: int, *, event_idx: bool, packed: bool
) -> bytes:
    return NET_PARAMS.pack(
        _run.PARAMS_MAGIC, _run.PARAMS_VERSION, irq, npackets, FRAME_LEN, batch, seed,
        int(event_idx), int(packed), QUEUE_SIZE, *IRQS, *MMIO_BASES, RING_ADDR, BUF_ADDR,
    )  # fmt: skip


def add_nics(m: Machine) -> tuple[Switch, list[VirtioNet], list[MmioTransport]]:
    """Two ``VirtioNet`` ports on one switch, mapped on ``m``'s bus (one runner)."""
    switch = Switch()
    held: list[MmapGuestMemory] = []

    def guest_memory() -> MmapGuestMemory:
        held.append(MmapGuestMemory([FdRegion(0, m.ram_size, m.ram_fd)]))
        return held[-1]

    m.closers.append(lambda: [mem.close() for mem in held])
    runner = TrioRunner(name="virtio-net-devices")
    m.closers.append(runner.close)
    nics, transports = [], []
    for i, (base, irq, mac) in enumerate(zip(MMIO_BASES, IRQS, MACS, strict=True)):
        nic = VirtioNet(name=f"net{i}", switch=switch, mac=mac, queue_size=QUEUE_SIZE)
        t = MmioTransport(nic, guest_memory, m.irq_line(irq), runner=runner, name=f"virtio-net-{i}")
        m.bus.add_mmio(base, VIRTIO_MMIO_REGION_SIZE, t)
        m.devices[t.name] = t
        nics.append(nic)
        transports.append(t)
    return switch, nics, transports


def _setup(*, event_idx: bool, packed: bool):
    def setup(m: Machine, spec: _run.WorkloadSpec) -> Callable[[], bool]:
        if spec.queue_depth > MAX_QUEUE_DEPTH:
            raise ValueError(f"virtio-net: at most {MAX_QUEUE_DEPTH} frames per notify")
        switch, nics, transports = add_nics(m)
        npackets = packet_count(spec.total_bytes, spec.queue_depth, FRAME_LEN)
        m.write_params(
            params(
                npackets, spec.queue_depth, spec.irq_param, spec.seed,
                event_idx=event_idx, packed=packed,
            )
        )  # fmt: skip

        def verify() -> bool:
            half = npackets // 2
            ports = switch.statistics()
            return (
                not any(t.errors for t in transports)
                and m.debug.ios == npackets
                and m.debug.values.get(VALUE_BAD_HEADERS) == 0
                and all(
                    ports[n.name]["in_packets"] == half and ports[n.name]["out_packets"] == half
                    for n in nics
                )
                and not any(
                    k.startswith("dropped") and v for p in ports.values() for k, v in p.items()
                )
                and not any(n.errors for n in nics)
            )

        return verify

    return setup


def _phase_ios(npackets: int) -> tuple[int, ...]:
    return (npackets // 2, npackets // 2)


PATHS = {
    "virtio-net": (True, False, "two virtio-net NICs on the switch, split ring + EVENT_IDX"),
    "virtio-net-noevent": (False, False, "two virtio-net NICs on the switch, split ring"),
    "virtio-net-packed": (True, True, "two virtio-net NICs on the switch, packed ring"),
}

for _name, (_evidx, _packed, _desc) in PATHS.items():
    _run.register_path(
        _name,
        _run.WorkloadPath(
            "virtio_net",
            _setup(event_idx=_evidx, packed=_packed),
            MAX_QUEUE_DEPTH,
            _desc,
            NET_PHASES,
            _phase_ios,
            extra={
                "io_bytes": FRAME_LEN, "unit": "packet", "count": packet_count,
                "event_idx": _evidx, "packed": _packed,
            },
        ),
    )  # fmt: skip
