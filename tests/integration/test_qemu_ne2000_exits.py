"""bench/qemu_ne2000_exits.py: the emulator's NE2000 against QEMU's ne2k_isa, same program."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from emulator.devices import debugport
from emulator.ne2000_paths import MAX_QUEUE_DEPTH

BENCH = Path(__file__).resolve().parents[2] / "bench" / "qemu_ne2000_exits.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pyvirtio_bench_qemu_ne2000", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


qn = _load_bench()


@pytest.fixture
def emulator_ready() -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: guest programs cannot be built")
    pytest.importorskip("unicorn", reason="unicorn not installed (extra 'emulator')")


def _mr(rw: str, addr: int, value: int, name: str, size: int = 1, cpu: int = 0) -> str:
    return (
        f"memory_region_ops_{rw} cpu {cpu} mr 0x55d0c0ffee00 addr 0x{addr:x} "
        f"value 0x{value:x} size {size} name '{name}'"
    )


def test_parse_trace_counts_the_window_by_board_and_port() -> None:
    cmd, arg = qn.CMD_PORT, qn.ARG_PORT
    lines = [
        _mr("write", 0x300, 0x21, "ne2000"),  # init, before the window
        _mr("write", cmd, debugport.CMD_BEGIN, "isa-debugcon"),
        _mr("write", 0x310, 0x1234, "ne2000", 2),
        _mr("write", 0x310, 0x1234, "ne2000", 2),
        _mr("read", 0x327, 0x40, "ne2000"),
        _mr("write", 0x3F8, 0x41, "serial"),
        _mr("write", 0xFEE01004, 0x4026, "apic-msi", 4, cpu=-1),  # not a vCPU access
        _mr("write", cmd, debugport.CMD_MARK, "isa-debugcon"),
        _mr("write", 0x307, 0x40, "ne2000"),
        _mr("write", cmd, debugport.CMD_END, "isa-debugcon"),
        _mr("write", 0x307, 0x40, "ne2000"),  # after: ignored
        _mr("write", arg, 16, "io", 4),
        _mr("write", cmd, debugport.CMD_IOS, "isa-debugcon"),
        _mr("write", arg, 0, "io", 4),
        _mr("write", cmd, debugport.CMD_RESULT, "isa-debugcon"),
    ]
    t = qn.parse_trace(lines)
    assert t.marked and t.result == 0 and t.ios == 16
    assert dict(t.accesses) == {"nic0:0x10:w": 2, "nic1:0x07:r": 1, "nic0:0x07:w": 1}
    assert dict(t.other) == {"serial:0x3f8:w": 1}
    assert not qn.parse_trace(lines[:-6]).marked


@pytest.mark.parametrize("batch", [1, MAX_QUEUE_DEPTH])
@pytest.mark.usefixtures("emulator_ready")
def test_same_program_same_accesses_in_qemu_and_emulator(qemu, batch):
    """The guest program verifies its frames on QEMU's ne2k_isa, and QEMU's trace shows
    exactly the port accesses the emulator's NE2000 counted, port by port."""
    npackets = 2 * batch if batch > 1 else 6
    ours, exits = qn.run_emulator(npackets, batch, "soft")
    assert exits["verified"] and ours.result == 0
    q = qn.run_qemu(qemu, npackets, batch, timeout=120)
    assert q.marked and q.result == 0 and q.verify_errors == 0 and q.ios == npackets
    assert q.other == {}
    assert q.accesses == ours.accesses
    # 757 words out per frame, one access each; 757 words in plus the 2-word header.
    assert q.accesses["nic0:0x10:w"] == 757 * npackets // 2
    assert q.accesses["nic1:0x10:r"] == (757 + 2) * npackets // 2
