"""Bus dispatch and exit accounting, without a CPU."""

from __future__ import annotations

import pytest

from emulator.bus import UNMAPPED, Bus, BusConflict, Device
from emulator.exits import HltExit, MmioExit, PioExit
from emulator.stats import ExitStats


class Regs(Device):
    name = "regs"
    read_registers = {0: "a", 4: "b"}
    write_registers = {0: "a_w", 4: "b_w"}

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.value = 0x11223344

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


def test_pio_dispatch_with_window_offset_and_accounting():
    bus, dev = Bus(), Regs()
    bus.add_pio(0x100, 8, dev, offset=0)
    bus.add_pio(0x200, 2, dev, offset=4)
    assert bus.handle(PioExit(0x104, 1, False)) == b"\x44"
    bus.handle(PioExit(0x200, 2, True, 2, b"\x01\x00\x02\x00"))
    assert dev.log == [("r", 4, 1), ("w", 4, 2, 1), ("w", 4, 2, 2)]
    st = bus.stats
    assert st.total == 2 and st.accesses == 3
    assert st.by_reason == {"PIO": 2}
    assert st.by_register == {"regs.b": 1, "regs.b_w": 1}


def test_batched_in_returns_count_times_size():
    bus, dev = Bus(), Regs()
    bus.add_pio(0x1F0, 8, dev)
    out = bus.handle(PioExit(0x1F0, 2, False, 4))
    assert out == b"\x44\x33" * 4
    assert bus.stats.total == 1 and bus.stats.accesses == 4


def test_mmio_dispatch():
    bus, dev = Bus(), Regs()
    bus.add_mmio(0xD000_0000, 0x1000, dev)
    assert bus.handle(MmioExit(0xD000_0000, 4, False)) == (0x11223344).to_bytes(4, "little")
    bus.handle(MmioExit(0xD000_0004, 4, True, b"\x78\x56\x34\x12"))
    assert dev.log[-1] == ("w", 4, 4, 0x12345678)
    assert bus.stats.by_register == {"regs.a": 1, "regs.b_w": 1}
    assert bus.stats.by_reason == {"MMIO": 2}


def test_unmapped_reads_all_ones_and_is_accounted():
    bus = Bus()
    assert bus.handle(PioExit(0x80, 2, False)) == b"\xff\xff"
    assert bus.handle(MmioExit(0xFEE0_0000, 4, False)) == b"\xff" * 4
    bus.handle(PioExit(0x80, 1, True, 1, b"\x00"))
    assert bus.stats.by_device == {UNMAPPED: 3}


def test_access_straddling_a_mapping_end_is_unmapped():
    bus, dev = Bus(), Regs()
    bus.add_pio(0x100, 2, dev)
    assert bus.handle(PioExit(0x101, 2, False)) == b"\xff\xff"
    assert dev.log == []


def test_other_exits_counted_by_reason():
    bus = Bus()
    bus.handle(HltExit())
    assert bus.stats.by_reason == {"HLT": 1} and bus.stats.total == 1
    assert bus.stats.by_register == {"cpu.hlt": 1}


def test_overlap_rejected():
    bus = Bus()
    bus.add_pio(0x1F0, 8, Regs())
    with pytest.raises(BusConflict):
        bus.add_pio(0x1F7, 2, Regs())
    bus.add_pio(0x1F8, 1, Regs())  # adjacent is fine
    with pytest.raises(ValueError):
        bus.add_mmio(0x1000, 0, Regs())


def test_stats_snapshot_and_difference():
    st = ExitStats()
    st.count("PIO", "ide", "status")
    snap = st.snapshot()
    st.count("PIO", "ide", "status")
    st.count("HLT")
    d = st - snap
    assert d.total == 2
    assert d.by_reason == {"PIO": 1, "HLT": 1}
    assert d.by_register == {"ide.status": 1}
    assert d.as_dict()["by_device"] == {"ide": 1}
