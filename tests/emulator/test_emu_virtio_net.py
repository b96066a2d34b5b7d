"""virtio-net in the emulator: two ``VirtioNet`` ports of one switch behind virtio-mmio,
driven by guest-drivers/virtio_net.c (send on one NIC, receive on the other, every
byte checked by the guest; the host checks the switch's counters).

Exit counts are exact (the device runs inside the QueueNotify exit) and equal on KVM
and the soft CPU: one exit per batch of packets on every ring layout, as with QEMU's
virtio-net (bench/qemu_virtio_exits.py).  Reposting receive buffers costs none: while
the device holds receive buffers it has notifications off (split EVENT_IDX: avail_event
left behind; without EVENT_IDX VRING_USED_F_NO_NOTIFY, §2.7.10; packed: the event flags
DISABLE, §2.8.10) and asks for them only when it runs out.
"""

from __future__ import annotations

import pytest

import emulator.virtio_net_paths  # noqa: F401  (registers the paths)
from emulator import run


@pytest.mark.usefixtures("need_gcc")
@pytest.mark.parametrize(
    ("path", "notifies_per_batch"),
    [("virtio-net", 1), ("virtio-net-packed", 1), ("virtio-net-noevent", 1)],
)
@pytest.mark.parametrize("qd", [1, 8])
def test_two_nics_exchange_frames(cpu, path, notifies_per_batch, qd):
    res = run.run_workload(path, cpu, kib=48, queue_depth=qd, timeout=300)
    assert res["verified"], res
    assert res["ios"] == 32
    assert res["exits_per_io"] == notifies_per_batch / qd
    assert set(res["exits_by_reason"]) == {"MMIO"}
    regs = res["exits_by_register"]
    assert regs == {
        "virtio-net-0.queue_notify": res["exits_total"] // 2,
        "virtio-net-1.queue_notify": res["exits_total"] // 2,
    }
    for phase in res["phases"].values():
        assert phase["ios"] == 16 and phase["exits"] == 16 // qd * notifies_per_batch


@pytest.mark.usefixtures("need_gcc")
def test_interrupt_completion_costs_hlt_and_ack(cpu):
    """--irq (IDT): per batch the tx notify, one HLT, InterruptStatus read and ACK."""
    res = run.run_workload("virtio-net", cpu, kib=48, queue_depth=8, irq=True, timeout=300)
    assert res["verified"], res
    batches = res["ios"] // 8
    assert res["exits_total"] == 4 * batches
    assert res["interrupts"] >= batches
