"""virtio-input in the emulator: ``VirtioInput`` (built-in keyboard) behind virtio-mmio,
driven by guest-drivers/virtio_input.c, which keeps the eventq full, sleeps, and
checks every event it receives against the expected sequence, in order.

Events are injected by the machine's idle hook when the guest halts, a burst of
``queue_depth`` key groups (EV_KEY + SYN_REPORT) at a time; the device fills the
buffers before the vCPU resumes, so the counts are exact on both CPUs: per burst one
HLT, one InterruptStatus read and one InterruptACK write.  With EVENT_IDX reposting
buffers costs nothing; with flag-based suppression the eventq's idle service keeps
notifications on, so every repost after a burst but the last is one QueueNotify.
"""

from __future__ import annotations

import pytest

import emulator.virtio_input_paths  # noqa: F401  (registers the paths)
from emulator import run


@pytest.mark.usefixtures("need_gcc")
@pytest.mark.parametrize("burst", [1, 16])
@pytest.mark.parametrize(("path", "notify"), [("virtio-input", 0), ("virtio-input-noevent", 1)])
def test_guest_reads_events_in_order(cpu, path, notify, burst):
    res = run.run_workload(path, cpu, kib=4, queue_depth=burst, timeout=120)
    assert res["verified"], res
    events = 2 * (4096 // 16)
    injections = events // (2 * burst)
    assert res["ios"] == events and res["unit"] == "event"
    assert res["interrupts"] == injections
    regs = res["exits_by_register"]
    assert regs["cpu.hlt"] == injections
    assert regs["virtio-input.interrupt_status"] == injections
    assert regs["virtio-input.interrupt_ack"] == injections
    assert regs.get("virtio-input.queue_notify", 0) == notify * (injections - 1)
    assert res["exits_total"] == (3 + notify) * injections - notify
