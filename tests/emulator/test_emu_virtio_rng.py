"""virtio-rng in the emulator: ``VirtioRng`` behind ``MmioTransport`` (synchronous mode,
the framework's own queue-service loop), driven by guest-drivers/virtio_rng.c.

The device code is the one ``virtio serve rng`` runs under vhost-user: nothing here is
transport-specific.  The guest checks every buffer (filled, non-constant, not a repeat);
the exit counts show the backpressure: with every posted buffer filled the device
asks for the next kick, so each round costs exactly one QueueNotify exit.
"""

from __future__ import annotations

import struct

import pytest

from emulator import guest_build
from emulator.machine import Machine
from virtio.devices.rng import VirtioRng
from virtio.memory import FdRegion, MmapGuestMemory
from virtio.spec.mmio import VIRTIO_MMIO_REGION_SIZE
from virtio.transport.mmio import MmioTransport, TrioRunner

MMIO_BASE = 0xD000_0000
RING_ADDR = 0x300000
BUF_ADDR = 0x400000
PARAMS = struct.Struct("<8I3Q")  # struct params in guest-drivers/virtio_rng.c
PARAMS_MAGIC = 0x4F495650
QUEUE_SIZE = 64


def run_rng(
    cpu: str,
    *,
    nbufs: int,
    buf_len: int,
    rounds: int,
    event_idx: bool,
    packed: bool,
    device: VirtioRng | None = None,
):
    elf = guest_build.build("virtio_rng")
    device = device or VirtioRng()
    with Machine(ram_size=32 << 20, cpu=cpu) as m, TrioRunner(name="virtio-rng") as runner:
        held: list[MmapGuestMemory] = []

        def guest_memory() -> MmapGuestMemory:
            held.append(MmapGuestMemory([FdRegion(0, m.ram_size, m.ram_fd)]))
            return held[-1]

        m.closers.append(lambda: [mem.close() for mem in held])
        transport = MmioTransport(device, guest_memory, m.irq_line(5), runner=runner, name="rng")
        m.bus.add_mmio(MMIO_BASE, VIRTIO_MMIO_REGION_SIZE, transport)
        m.write_params(
            PARAMS.pack(
                PARAMS_MAGIC, 1, nbufs, buf_len, rounds, int(event_idx), int(packed),
                QUEUE_SIZE, MMIO_BASE, RING_ADDR, BUF_ADDR,
            )
        )  # fmt: skip
        m.load_elf(elf)
        m.run(timeout=120)
        assert m.window is not None, m.debug.text
        return m.debug, m.window, transport, device


@pytest.mark.usefixtures("need_gcc")
@pytest.mark.parametrize(
    ("event_idx", "packed"), [(True, False), (False, False), (True, True)], ids=str
)
def test_guest_reads_random_bytes(cpu, event_idx, packed):
    nbufs, buf_len, rounds = 16, 256, 4
    dbg, window, transport, device = run_rng(
        cpu, nbufs=nbufs, buf_len=buf_len, rounds=rounds, event_idx=event_idx, packed=packed
    )
    assert dbg.result == 0, (dbg.result, dbg.text, transport.errors)
    assert dbg.ios == nbufs * rounds and dbg.verify_errors == 0
    assert dbg.values[1] == nbufs * rounds * buf_len  # every buffer filled completely
    assert device.buffers_filled == nbufs * rounds and not transport.errors
    # One notify per round: the device drained the ring, re-enabled notifications
    # and waited for the driver's next kick (no polling, no missed kick).
    assert dbg.values[2] == rounds
    assert window.by_register == {"rng.queue_notify": rounds}


@pytest.mark.usefixtures("need_gcc")
def test_buffer_larger_than_max_fill_is_partly_filled(cpu):
    """devicenormative §5.4.6.2: the device MAY use less than the entire buffer."""
    device = VirtioRng()
    device.max_fill = 100
    dbg, _, transport, _ = run_rng(
        cpu, nbufs=4, buf_len=256, rounds=2, event_idx=True, packed=False, device=device
    )
    assert dbg.result == 0 and dbg.verify_errors == 0, (dbg.text, transport.errors)
    assert dbg.values[1] == 4 * 2 * 100
