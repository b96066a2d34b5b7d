"""The virtio-mmio paths: virtio-blk behind MmioTransport, driven by guest-drivers/virtio_blk.c.

Exit counts are exact (the device completes a batch on the QueueNotify exit) and the
same on KVM and on the soft CPU."""

from __future__ import annotations

import pytest

from emulator.cpu import kvm_usable
from emulator.run import PATHS, run_workload

KIB = 256  # 64 requests per phase


def expected_notifies(nreqs: int, qd: int) -> int:
    batches = -(-nreqs // qd)
    return 2 * batches + 1  # write + read batches, one flush


@pytest.mark.usefixtures("need_gcc")
@pytest.mark.parametrize("path", ["virtio-mmio", "virtio-mmio-noevent", "virtio-mmio-packed"])
@pytest.mark.parametrize("qd", [1, 32])
def test_polled_exits_are_one_notify_per_batch(cpu, path, qd):
    res = run_workload(path, cpu, kib=KIB, queue_depth=qd)
    assert res["verified"]
    nreqs = KIB // 4
    assert res["ios"] == 2 * nreqs
    assert res["exits_by_register"] == {"virtio-blk.queue_notify": expected_notifies(nreqs, qd)}
    assert res["phases"]["write"]["exits"] == -(-nreqs // qd)
    assert res["phases"]["flush"]["exits"] == 1


@pytest.mark.usefixtures("need_gcc")
@pytest.mark.parametrize("irq_mode", ["idt", "hlt"])
def test_interrupt_completion(cpu, irq_mode):
    res = run_workload("virtio-mmio", cpu, kib=KIB, queue_depth=32, irq=True, irq_mode=irq_mode)
    assert res["verified"]
    n = expected_notifies(KIB // 4, 32)
    # per batch: notify, HLT, InterruptStatus read, InterruptACK write
    assert res["exits_by_register"] == {
        "cpu.hlt": n,
        "virtio-blk.interrupt_ack": n,
        "virtio-blk.interrupt_status": n,
        "virtio-blk.queue_notify": n,
    }
    assert res["interrupts"] == (n if irq_mode == "idt" else 0)


@pytest.mark.usefixtures("need_gcc", "need_soft")
def test_qd32_meets_exit_goal():
    res = run_workload("virtio-mmio", "soft", mib=1, queue_depth=32)
    assert res["exits_per_io"] <= 0.05


@pytest.mark.usefixtures("need_gcc", "need_soft")
def test_raw_file_image(tmp_path):
    image = tmp_path / "disk.img"
    res = run_workload("virtio-mmio", "soft", kib=KIB, queue_depth=32, image=str(image))
    assert res["verified"]
    assert image.stat().st_size >= KIB << 10


@pytest.mark.usefixtures("need_gcc", "need_soft")
def test_queue_depth_limit():
    with pytest.raises(ValueError, match="queue_depth"):
        run_workload(
            "virtio-mmio", "soft", kib=KIB, queue_depth=PATHS["virtio-mmio"].max_queue_depth + 1
        )


@pytest.mark.usefixtures("need_gcc", "need_soft")
@pytest.mark.skipif(not kvm_usable()[0], reason="/dev/kvm not usable")
@pytest.mark.kvm
@pytest.mark.parametrize("qd", [1, 32])
def test_kvm_and_soft_counts_equal(qd):
    a = run_workload("virtio-mmio", "soft", kib=KIB, queue_depth=qd, irq=True)
    b = run_workload("virtio-mmio", "kvm", kib=KIB, queue_depth=qd, irq=True)
    for key in ("exits_total", "exits_by_reason", "exits_by_register", "interrupts", "ios"):
        assert a[key] == b[key], key
