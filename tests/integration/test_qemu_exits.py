"""bench/qemu_exits.py: the would-be-exit counting of IDE vs virtio-blk I/O in QEMU."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio

from virtio.testing.guest_image import GuestImage

BENCH = Path(__file__).resolve().parents[2] / "bench" / "qemu_exits.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pyvirtio_bench_qemu_exits", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


qx = _load_bench()


def _mr(event: str, cpu: int, addr: int, value: int, name: str, size: int = 1) -> str:
    return (
        f"memory_region_ops_{event} cpu {cpu} mr 0x55d0c0ffee00 addr 0x{addr:x} "
        f"value 0x{value:x} size {size} name '{name}'"
    )


def test_parse_trace_counts_only_the_marked_window() -> None:
    begin = _mr("write", 0, 0x80, qx.MARK_BEGIN, "ioport80")
    end = _mr("write", 0, 0x80, qx.MARK_END, "ioport80")
    lines = [
        _mr("write", 0, 0x1F7, 0xC8, "ide"),  # before the window: ignored
        begin,
        _mr("write", 0, 0x1F7, 0xC8, "ide"),
        _mr("read", 0, 0x1F7, 0x50, "ide"),
        _mr("write", 0, 0xC000, 0x9, "piix-bmdma"),
        _mr("write", 0, 0xC004, 0x1000, "bmdma", 4),
        _mr("write", 0, 0xFEE000B0, 0, "apic-msi", 4),  # EOI
        _mr("write", 0, 0xFEE00380, 0x1234, "apic-msi", 4),  # timer initial count
        _mr("write", -1, 0xFEE01004, 0x4026, "apic-msi", 4),  # an MSI: not an access
        _mr("write", 0, 0xFE003000, 0, "virtio-pci-notify-virtio-blk", 2),
        _mr("read", 0, 0x3F8, 0x60, "serial"),
        "ioapic_set_irq vector: 14 level: 1",
        "ioapic_set_irq vector: 14 level: 0",
        "ide_exec_cmd IDE exec cmd: bus 0x1 state 0x2 cmd 0xc8",
        end,
        _mr("write", 0, 0x1F7, 0xC8, "ide"),  # after: ignored
    ]
    ide = qx.parse_trace(lines, "ide")
    assert ide.marked
    assert ide.register_accesses == 4
    assert dict(ide.device_registers) == {
        "ide:w": 1,
        "ide:r": 1,
        "piix-bmdma:w": 1,
        "bmdma:w": 1,
    }
    assert ide.notifies == 0
    assert dict(ide.lapic) == {"eoi:w": 1, "timer_initial_count:w": 1}
    assert ide.interrupt_messages == 1
    assert ide.other == {"virtio-pci-notify-virtio-blk:w": 1, "serial:r": 1}
    assert ide.events == {"ioapic_raise:14": 1, "ide_exec_cmd": 1}
    virtio = qx.parse_trace(lines, "virtio")
    assert (virtio.register_accesses, virtio.notifies) == (0, 1)
    assert not qx.parse_trace(lines[:-2], "ide").marked


def test_parse_guest_counters() -> None:
    interrupts = (
        "           CPU0       CPU1\n"
        " 14:        10          5   IO-APIC  14-edge      ata_piix\n"
        " 15:         0          0   IO-APIC  15-edge      ata_piix\n"
        " 25:         7          1   PCI-MSI 32769-edge      virtio0-req.0\n"
        "LOC:       100        200   Local timer interrupts\n"
    )
    assert qx.parse_interrupts(interrupts, "ide") == 15
    assert qx.parse_interrupts(interrupts, "virtio") == 8
    assert qx.parse_local_timer(interrupts) == 300
    assert qx.parse_block_stat("3 0 24 9 5 0 40 1 0 12 9 0 0 0 0 0 0") == 8


@pytest.mark.qemu
async def test_ide_costs_many_more_register_accesses_than_virtio(
    guest_image: GuestImage,
) -> None:
    cases = [qx.Case("ide", "randread", 1), qx.Case("virtio", "randread", 1)]
    with trio.fail_after(90):
        report = await qx.measure(guest_image, cases, ios=100)
    ide, virtio = report["results"]
    for r in (ide, virtio):
        assert r["window_marked"], r
        assert r["ios"] >= 100 and r["fio_ios"] >= 100, r
        for name, value in r["per_io"].items():
            assert math.isfinite(value) and value >= 0, (name, r)
        assert r["per_io"]["interrupts"] > 0, r
        assert r["per_io"]["lapic_accesses"] > 0, r
        assert r["per_io"]["exits"] > 0, r
    # PIIX IDE with BMDMA: a couple of dozen PIO accesses per 4 KiB request
    assert 10 <= ide["per_io"]["register_accesses"] <= 60, ide
    assert ide["per_io"]["notifies"] == 0
    assert ide["events"].get("ide_exec_cmd", 0) >= 100, ide
    # virtio-blk: no register access on the I/O path, ~one notify per request at QD1
    assert 0.5 <= virtio["per_io"]["notifies"] <= 1.5, virtio
    virtio_accesses = virtio["per_io"]["register_accesses"] + virtio["per_io"]["notifies"]
    assert ide["per_io"]["register_accesses"] >= 10 * virtio_accesses
    assert ide["per_io"]["exits"] > 3 * virtio["per_io"]["exits"]
