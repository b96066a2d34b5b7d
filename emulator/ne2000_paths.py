"""The ``ne2000`` workload path: two ISA NE2000s of one machine, cabled back to back.

NIC 0 at :data:`IO_BASES` [0] (IRQ 9, QEMU's ``ne2k_isa`` defaults) and NIC 1 at
[1] (IRQ 10) share one :class:`~emulator.devices.ne2000.EthernetLink`.  The guest
program (``guest-drivers/ne2000.c``) sends half the frames from NIC 0 to NIC 1 and the
other half back, ``queue_depth`` frames before the receiver drains its ring, and checks
every byte it receives.  An *I/O* of this path is one packet: sent by one NIC and
received by the other.  The workload size is the frame bytes moved, so ``exits/MiB``
compares with the block paths' figure for the same amount of data.

The host side checks what the guest cannot see: that exactly the frames the guest
counted crossed the cable, each NIC transmitted and received its half, and neither
NIC recorded a programming error.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from emulator import run as _run
from emulator.devices import dp8390
from emulator.devices.ne2000 import EthernetLink, Ne2000
from emulator.machine import Machine

IO_BASES = (0x300, 0x320)
IRQS = (dp8390.DEFAULT_IRQ, 10)
MACS = (bytes.fromhex("525400120001"), bytes.fromhex("525400120002"))
FRAME_LEN = dp8390.ETH_FRAME_LEN
TX_PAGES = 6  # guest-drivers/ne2000.c: TX_PAGE..TX_PAGE+5, then the receive ring
RING_PAGES = dp8390.RAM_END_PAGE - dp8390.RAM_FIRST_PAGE - TX_PAGES

# struct params in guest-drivers/ne2000.c
NE2000_PARAMS = struct.Struct("<8I2I2I")

RESULT_NAMES = {
    1: "bad parameters",
    2: "reset did not complete",
    3: "PROM unreadable",
    4: "remote DMA did not complete",
    5: "transmit error",
    6: "receive error",
    7: "receive ring inconsistent",
    8: "verification failed",
}


def max_batch(frame_len: int = FRAME_LEN) -> int:
    """Frames one receiver can hold before it drains its ring.

    The NIC (like QEMU's) stores a frame only while the ring has room for a maximum
    one; each frame takes ``ceil((4 + frame + FCS) / 256)`` pages and one ring page
    stays between CURR and BNRY.
    """
    pages = -(-(dp8390.RX_HEADER_LEN + max(frame_len, dp8390.ETH_ZLEN) + 4) // 256)
    free = (RING_PAGES - 1) * dp8390.PAGE_SIZE
    return 1 + (free - dp8390.RX_ROOM_NEEDED) // (pages * dp8390.PAGE_SIZE)


MAX_QUEUE_DEPTH = max_batch()


def packet_count(total_bytes: int, batch: int, frame_len: int = FRAME_LEN) -> int:
    """Frames for a workload of ``total_bytes``: a multiple of 2 * batch, at least one
    batch each way."""
    step = 2 * batch
    return max(step, total_bytes // frame_len // step * step)


def params(npackets: int, batch: int, irq: int, seed: int, frame_len: int = FRAME_LEN) -> bytes:
    return NE2000_PARAMS.pack(
        _run.PARAMS_MAGIC, _run.PARAMS_VERSION, irq, npackets, frame_len, batch, seed, 0,
        *IO_BASES, *IRQS,
    )  # fmt: skip


def _setup(m: Machine, spec: _run.WorkloadSpec) -> Callable[[], bool]:
    if spec.queue_depth > max_batch(FRAME_LEN):
        raise ValueError(f"ne2000: at most {max_batch(FRAME_LEN)} frames fit a receive ring")
    nics = [
        Ne2000(mac, irq=m.irq_line(irq), name=f"ne2000-{i}")
        for i, (mac, irq) in enumerate(zip(MACS, IRQS, strict=True))
    ]
    for nic, base in zip(nics, IO_BASES, strict=True):
        nic.attach(m.bus, base)
        m.devices[nic.name] = nic
    link = EthernetLink(*nics)
    npackets = packet_count(spec.total_bytes, spec.queue_depth)
    m.write_params(params(npackets, spec.queue_depth, spec.irq_param, spec.seed))

    def verify() -> bool:
        half = npackets // 2
        return (
            not any(n.errors for n in nics)
            and m.debug.ios == npackets
            and link.frames == npackets
            and all(n.tx_frames == half and n.rx_frames == half for n in nics)
            and not any(n.rx_missed or n.rx_filtered for n in nics)
        )

    return verify


NET_PHASES = ("a-to-b", "b-to-a")


def _phase_ios(npackets: int) -> tuple[int, ...]:
    return (npackets // 2, npackets // 2)


_run.register_path(
    "ne2000",
    _run.WorkloadPath(
        "ne2000",
        _setup,
        MAX_QUEUE_DEPTH,
        "two ISA NE2000s back to back, 16-bit remote DMA through the data port",
        NET_PHASES,
        _phase_ios,
        extra={"io_bytes": FRAME_LEN, "unit": "packet", "count": packet_count},
    ),
)
