"""bench/qemu_virtio_exits.py: the emulator's virtio-net (virtio-mmio) and virtio-blk
(virtio-pci) paths against QEMU's own devices, the same guest program on both."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from emulator.devices import debugport

BENCH = Path(__file__).resolve().parents[2] / "bench" / "qemu_virtio_exits.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pyvirtio_bench_qemu_virtio", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


qv = _load_bench()


@pytest.fixture
def emulator_ready() -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: guest programs cannot be built")
    pytest.importorskip("unicorn", reason="unicorn not installed (extra 'emulator')")


def _mr(rw: str, addr: int, value: int, name: str, size: int = 4, cpu: int = 0) -> str:
    return (
        f"memory_region_ops_{rw} cpu {cpu} mr 0x55d0c0ffee00 addr 0x{addr:x} "
        f"value 0x{value:x} size {size} name '{name}'"
    )


def test_parse_trace_names_registers_as_the_emulator_does() -> None:
    cmd, arg = qv.CMD_PORT, qv.ARG_PORT
    nic0, nic1 = qv.MICROVM_MMIO_BASES
    lines = [
        _mr("write", nic0 + 0x70, 0xF, "virtio-mmio"),  # DRIVER_OK, before the window
        _mr("write", cmd, debugport.CMD_BEGIN, "isa-debugcon", 1),
        _mr("write", nic0 + 0x50, 1, "virtio-mmio"),  # QueueNotify, transmitq1
        _mr("read", nic1 + 0x70, 0xF, "virtio-mmio"),  # Status
        _mr("read", nic1 + 0x100, 0x52, "virtio-mmio", 1),  # configuration space
        _mr("write", 0xFEE00000, 0x4021, "apic-msi", cpu=-1),  # QEMU's own: not counted
        _mr("write", 0x3F8, 0x41, "serial", 1),
        _mr("write", cmd, debugport.CMD_END, "isa-debugcon", 1),
        _mr("write", nic0 + 0x50, 1, "virtio-mmio"),  # after: ignored
        _mr("write", arg, 5, "io"),
        _mr("write", cmd, debugport.CMD_KEY, "isa-debugcon", 1),
        _mr("write", arg, 3, "io"),
        _mr("write", cmd, debugport.CMD_VALUE, "isa-debugcon", 1),
        _mr("write", arg, 0, "io"),
        _mr("write", cmd, debugport.CMD_RESULT, "isa-debugcon", 1),
    ]
    t = qv.parse_trace(lines, qv.net_register)
    assert t.marked and t.result == 0 and t.values == {5: 3}
    assert dict(t.accesses) == {
        "virtio-net-0.queue_notify": 1,
        "virtio-net-1.status": 1,
        "virtio-net-1.config": 1,
    }
    assert t.poll_reads == 1
    assert dict(t.other) == {"serial:0x3f8:w": 1}
    # virtio-pci regions: the structure by QEMU's region name, the field by the offset.
    assert qv.pci_register("virtio-pci-notify-virtio-blk", 0xFEBFB000) == "virtio-blk.queue_notify"
    assert qv.pci_register("virtio-pci-common-virtio-blk", 0xFEBF8014) == "virtio-blk.device_status"
    assert qv.pci_register("virtio-pci-isr-virtio-blk", 0xFEBF9000) == "virtio-blk.isr"
    assert qv.pci_register("ide", 0x1F7) is None


@pytest.mark.parametrize(
    ("workload", "kib", "qd"),
    [("virtio-net", 12, 1), ("virtio-net", 12, 8), ("virtio-net-packed", 12, 8),
     ("virtio-net-noevent", 12, 1), ("virtio-blk-pci", 16, 1), ("virtio-blk-pci", 16, 4)],
)  # fmt: skip
@pytest.mark.usefixtures("emulator_ready")
def test_same_program_same_accesses_in_qemu_and_emulator(qemu, workload, kib, qd):
    """The program verifies its data on QEMU's device, and QEMU's trace shows exactly
    the device accesses the emulator counted as exits, register by register: one
    notify per batch and nothing else in the window."""
    w = qv.WORKLOADS[workload]
    row = qv.compare(w, kib << 10, qd, "soft", [])
    count = w.count(kib << 10, qd)
    assert row["emulator"]["verified"] and row["ios"] == count * w.ios_per_count
    q = qv.run_qemu(qemu, w, count, qd, timeout=120)
    assert q.marked and q.result == 0 and q.verify_errors == 0
    assert q.ios == row["ios"] and q.other == {}
    assert dict(q.accesses) == row["emulator"]["by_register"]
    notifies = {k: v for k, v in q.accesses.items() if k.endswith(".queue_notify")}
    assert sum(notifies.values()) == q.total  # only notifies: the rings are in RAM
    if workload.startswith("virtio-net"):  # packed / no EVENT_IDX too: receive quiet
        assert notifies == {"virtio-net-0.queue_notify": count // 2 // qd,
                            "virtio-net-1.queue_notify": count // 2 // qd}  # fmt: skip
        # Headers QEMU fills differently (num_buffers without MRG_RXBUF) are counted,
        # never more than one per frame; the data itself verified above.
        assert 0 <= q.values[qv.vnet.VALUE_BAD_HEADERS] <= count
    else:  # writes, one flush, reads
        assert notifies == {"virtio-blk.queue_notify": 2 * (count // qd) + 1}
