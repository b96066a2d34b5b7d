"""virtio-pci in the emulator: the host bridge, BARs, MSI-X delivery and the
``virtio-pci`` paths, driven by the same guest-drivers/virtio_blk.c and virtio_rng.c as
virtio-mmio (mmio_base 0: the driver enumerates the PCI bus).

In-process devices complete a batch on the notify exit, so counts are exact and the
same on KVM and the soft CPU; the vhost-user back-end is reached through ioeventfd
notify addresses (no exit per kick)."""

from __future__ import annotations

import struct

import pytest

from emulator import guest_build
from emulator.machine import Machine
from emulator.pci.function import CMD_BUS_MASTER, CMD_MEMORY, PCI_MMIO_BASE
from emulator.pci.host import CONFIG_ADDRESS, CONFIG_DATA, pci_host
from emulator.pci.virtio import VIRTIO_PCI_IRQ, add_virtio_pci
from emulator.run import run_workload
from virtio.devices.rng import VirtioRng
from virtio.transport.pci import BAR_SIZE

KIB = 256  # 64 requests per phase


def expected_notifies(nreqs: int, qd: int) -> int:
    return 2 * -(-nreqs // qd) + 1  # write + read batches, one flush


@pytest.mark.usefixtures("need_gcc")
@pytest.mark.parametrize("path", ["virtio-pci", "virtio-pci-packed"])
@pytest.mark.parametrize("qd", [1, 32])
def test_polled_exits_match_virtio_mmio(cpu, path, qd):
    res = run_workload(path, cpu, kib=KIB, queue_depth=qd)
    assert res["verified"]
    n = expected_notifies(KIB // 4, qd)
    assert res["exits_by_register"] == {"virtio-blk.queue_notify": n}
    mmio = run_workload("virtio-mmio", cpu, kib=KIB, queue_depth=qd)
    assert mmio["exits_total"] == res["exits_total"]


@pytest.mark.usefixtures("need_gcc")
def test_msix_completion_costs_one_hlt_per_batch(cpu):
    """IDT mode uses MSI-X: the handler touches no register (virtio-mmio needs an
    InterruptStatus read and an InterruptACK write per batch)."""
    res = run_workload("virtio-pci", cpu, kib=KIB, queue_depth=32, irq=True)
    assert res["verified"]
    n = expected_notifies(KIB // 4, 32)
    assert res["exits_by_register"] == {"cpu.hlt": n, "virtio-blk.queue_notify": n}
    assert res["interrupts"] == n


@pytest.mark.usefixtures("need_gcc")
def test_intx_completion_reads_the_isr(cpu):
    res = run_workload("virtio-pci", cpu, kib=KIB, queue_depth=32, irq=True, irq_mode="hlt")
    assert res["verified"]
    n = expected_notifies(KIB // 4, 32)
    assert res["exits_by_register"] == {
        "cpu.hlt": n,
        "virtio-blk.isr": n,
        "virtio-blk.queue_notify": n,
    }


@pytest.mark.usefixtures("need_gcc")
@pytest.mark.parametrize("irq", [False, True])
def test_vhost_user_pci_kicks_are_not_exits(cpu, irq):
    res = run_workload("vhost-user-pci", cpu, kib=KIB, queue_depth=32, irq=irq)
    assert res["verified"]
    regs = res["exits_by_register"]
    assert not any(r.endswith("queue_notify") for r in regs), regs  # ioeventfd
    assert set(regs) <= {"cpu.hlt"}, regs
    if irq:
        assert res["interrupts"] >= 1 and regs.get("cpu.hlt", 0) >= 1


RNG_PARAMS = struct.Struct("<8I3Q")  # struct params in guest-drivers/virtio_rng.c


@pytest.mark.usefixtures("need_gcc")
def test_virtio_rng_over_pci(cpu):
    """The rng driver, unchanged, finds its device on the PCI bus."""
    elf = guest_build.build("virtio_rng")
    with Machine(ram_size=32 << 20, cpu=cpu) as m:
        t = add_virtio_pci(m, VirtioRng(), name="virtio-rng")
        m.write_params(RNG_PARAMS.pack(0x4F495650, 1, 8, 64, 4, 1, 0, 64, 0, 0x300000, 0x400000))
        m.load_elf(elf)
        m.run(timeout=120)
        assert m.debug.result == 0, m.debug.text
        assert m.debug.ios == 32 and not t.errors
        assert m.window is not None
        assert m.window.by_register == {"virtio-rng.queue_notify": 4}


# -- the host bridge and BARs, driven from the VMM side -------------------------------------
class Cfg:
    """Configuration mechanism #1 as a guest uses it."""

    def __init__(self, m: Machine) -> None:
        self.bus = m.bus

    def read(self, dev: int, reg: int, size: int = 4) -> int:
        self.bus.handle_pio(
            CONFIG_ADDRESS, 4, True, 1, (0x8000_0000 | dev << 11 | reg).to_bytes(4, "little")
        )
        out = self.bus.handle_pio(CONFIG_DATA + (reg & 3), size, False, 1, b"")
        return int.from_bytes(out, "little")

    def write(self, dev: int, reg: int, size: int, value: int) -> None:
        self.bus.handle_pio(
            CONFIG_ADDRESS, 4, True, 1, (0x8000_0000 | dev << 11 | reg).to_bytes(4, "little")
        )
        self.bus.handle_pio(CONFIG_DATA + (reg & 3), size, True, 1, value.to_bytes(size, "little"))


def test_enumeration_bar_sizing_and_decoding():
    with Machine(ram_size=8 << 20, cpu="soft") as m:
        t = add_virtio_pci(m, VirtioRng(), name="virtio-rng")
        cfg = Cfg(m)
        assert cfg.read(0, 0) & 0xFFFF == 0x1B36  # the host bridge
        assert cfg.read(5, 0) == 0xFFFF_FFFF  # an empty slot
        slot = t.function.slot
        assert cfg.read(slot, 0) == 0x1044 << 16 | 0x1AF4
        assert cfg.read(slot, 0x06, 2) & 0x10  # capabilities list
        assert cfg.read(slot, 0x3D, 1) == 1 and cfg.read(slot, 0x3C, 1) == VIRTIO_PCI_IRQ
        base = cfg.read(slot, 0x10)
        assert base == PCI_MMIO_BASE and base % BAR_SIZE == 0
        cfg.write(slot, 0x10, 4, 0xFFFF_FFFF)  # sizing
        assert cfg.read(slot, 0x10) == (~(BAR_SIZE - 1)) & 0xFFFF_FFF0
        cfg.write(slot, 0x10, 4, base)
        # Not decoded until Memory Space is enabled.
        assert m.bus.handle_mmio(base + 0x12, 2, False, b"") == b"\xff\xff"
        cfg.write(slot, 0x04, 2, CMD_MEMORY | CMD_BUS_MASTER)
        assert m.bus.handle_mmio(base + 0x12, 2, False, b"") == (1).to_bytes(
            2, "little"
        )  # num_queues
        # Moving the BAR moves the window.
        cfg.write(slot, 0x10, 4, base + 0x10_0000)
        assert m.bus.handle_mmio(base + 0x12, 2, False, b"") == b"\xff\xff"
        assert m.bus.handle_mmio(base + 0x10_0000 + 0x12, 2, False, b"") == b"\x01\x00"
        assert not t.errors and pci_host(m).slots[slot] is t.function


def test_msi_needs_bus_master_and_the_interrupt_range():
    with Machine(ram_size=8 << 20, cpu="soft") as m:
        t = add_virtio_pci(m, VirtioRng(), name="virtio-rng")
        f = t.function
        f.send_msi(0xFEE0_0000, 0x31)
        assert f.msi_dropped == 1 and not m.irq_pending  # Bus Master off
        f.command = CMD_MEMORY | CMD_BUS_MASTER
        f.send_msi(0x1000, 0x31)
        assert f.msi_dropped == 2 and not m.irq_pending
        f.send_msi(0xFEE0_0000, 0x31)
        assert m.irq_pending
        m.idle_hlt_stops = True
        assert m.on_hlt(interrupts_enabled=True) == (True, 0x31)
        assert not m.irq_pending
