"""Save a running VM and restore it in a new machine (emulator/snapshot.py, issue 12 §7).

The workload is the virtio-blk write / flush / read-verify guest program over
virtio-mmio.  A snapshot is taken mid-I/O (part of the disk written), restored on the
*other* CPU backend, and must run to the end with every block verified and the same
total number of exits as an uninterrupted run (an exit replayed or lost after the
restore would change it).
"""

from __future__ import annotations

import json
import struct

import pytest

from emulator import run, snapshot
from emulator.machine import Machine

KIB = 256
QD = 2  # two requests per notify: the write phase spans a third of all exits


def _written_sectors(snap: snapshot.Snapshot) -> int:
    disk = snap.machine["devices"]["virtio-blk"]["device"]["disk"]
    nsect = KIB * 1024 // 512
    return sum(
        disk[lba * 512 : (lba + 1) * 512] == run.expected_sector(lba, 0x1234_5678)
        for lba in range(nsect)
    )


@pytest.fixture(scope="module")
def reference() -> dict:
    """An uninterrupted run (the soft CPU: exit counts are the same on both)."""
    pytest.importorskip("unicorn")
    return run.run_workload("virtio-mmio", "soft", kib=KIB, queue_depth=QD, irq=True)


@pytest.mark.parametrize(
    ("path", "save_cpu", "restore_cpu"),
    [
        ("virtio-mmio", "kvm", "soft"),
        ("virtio-mmio", "soft", "kvm"),
        ("virtio-mmio-packed", "kvm", "soft"),
    ],
)
def test_saved_mid_io_restores_on_the_other_cpu(
    path, save_cpu, restore_cpu, reference, tmp_path, need_kvm, need_soft, need_gcc
):
    snap_file = tmp_path / "vm.snap"
    ref = reference["all_exits"]
    save_at = ref // 3  # in the write phase (checked below)
    first = run.run_workload(
        path, save_cpu, kib=KIB, queue_depth=QD, irq=True, save_at=save_at, save_to=snap_file
    )
    assert first["verified"] and first["saved_at_exit"] >= save_at
    snap = snapshot.read(snap_file)
    assert snap.exits == first["saved_at_exit"]
    # Mid-I/O: some of the disk is written, not all of it.
    written = _written_sectors(snap)
    assert 0 < written < KIB * 1024 // 512, written
    restored = run.restore_workload(snap_file, restore_cpu)
    assert restored["cpu"] == restore_cpu
    assert restored["verified"], restored
    assert restored["restored_at_exit"] == first["saved_at_exit"]
    assert restored["ios"] == first["ios"] == KIB // 4 * 2
    assert restored["all_exits"] == first["all_exits"]
    if path == "virtio-mmio":
        assert restored["all_exits"] == ref
        assert restored["exits_total"] == reference["exits_total"]


def test_restore_twice_from_one_file_is_deterministic(tmp_path, need_soft, need_gcc):
    snap_file = tmp_path / "vm.snap"
    run.run_workload("virtio-mmio", "soft", kib=64, queue_depth=4, save_at=40, save_to=snap_file)
    a = run.restore_workload(snap_file, "soft")
    b = run.restore_workload(snap_file, "soft")
    assert a["verified"] and b["verified"]
    assert a["exits_by_register"] == b["exits_by_register"]


@pytest.fixture
def saved(tmp_path, need_soft, need_gcc):
    snap_file = tmp_path / "vm.snap"
    run.run_workload("virtio-mmio", "soft", kib=64, queue_depth=4, save_at=40, save_to=snap_file)
    return snap_file


def _rewrite_header(path, mutate) -> None:
    data = path.read_bytes()
    magic, version, hdrlen = struct.unpack_from("<8sII", data)
    header = json.loads(data[16 : 16 + hdrlen])
    mutate(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<8sII", magic, version, len(new)) + new + data[16 + hdrlen :])


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda h: h["machine"]["cpu"]["gprs"].pop("rip"), "registers"),
        (lambda h: h["machine"]["cpu"].update(cr3=0x9000), "CR3"),
        (lambda h: h["machine"]["devices"]["virtio-blk"]["queues"][0]["vq"].update(size=3),
         "power of 2"),
        (lambda h: h["machine"]["devices"]["virtio-blk"]["queues"][0]["vq"].update(bogus=1),
         "unknown queue state"),
        (lambda h: h["machine"]["devices"].pop("virtio-blk"), "devices differ"),
        (lambda h: h["machine"]["devices"]["virtio-blk"]["device"].update(disk={"$blob": 0}),
         "bad blob reference"),
    ],
)  # fmt: skip
def test_tampered_snapshots_are_refused_with_a_reason(saved, mutate, why):
    _rewrite_header(saved, mutate)
    with pytest.raises(snapshot.SnapshotError, match=why):
        run.restore_workload(saved, "soft")


def test_damaged_files_are_refused(saved, tmp_path):
    data = saved.read_bytes()
    for name, blob, why in [
        ("short", data[:10], "too short"),
        ("magic", b"XXXXXXXX" + data[8:], "not a pyvirtio snapshot"),
        ("truncated", data[:-100], "truncated|corrupt|not the"),
        ("version", data[:8] + struct.pack("<I", 99) + data[12:], "format 99"),
    ]:
        bad = tmp_path / name
        bad.write_bytes(blob)
        with pytest.raises(snapshot.SnapshotError, match=why):
            snapshot.read(bad)


def test_a_running_machine_cannot_be_saved_unpaused(need_soft):
    m = Machine(ram_size=4 << 20, cpu="soft")
    try:
        m.memory.write(0x100000, bytes.fromhex("f4"))  # hlt
        m.idle_hlt_stops = True
        m.start(0x100000)
        m.run(max_exits=5)
        with pytest.raises(snapshot.SnapshotError, match="paused"):
            snapshot.capture(m, {})
    finally:
        m.close()


# -- virtio-pci (issue 12 §7 with §6): the host bridge, the function's header and BAR,
# the transport's common configuration, ISR and MSI-X table saved and restored.
@pytest.fixture(scope="module")
def pci_reference() -> dict:
    pytest.importorskip("unicorn")
    return run.run_workload("virtio-pci", "soft", kib=KIB, queue_depth=QD, irq=True)


@pytest.mark.parametrize(
    ("path", "save_cpu", "restore_cpu"),
    [
        ("virtio-pci", "kvm", "soft"),
        ("virtio-pci", "soft", "kvm"),
        ("virtio-pci-packed", "kvm", "soft"),
    ],
)
def test_virtio_pci_saved_mid_io_restores_on_the_other_cpu(
    path, save_cpu, restore_cpu, pci_reference, tmp_path, need_kvm, need_soft, need_gcc
):
    snap_file = tmp_path / "vm.snap"
    save_at = pci_reference["all_exits"] * 3 // 5  # after the PCI enumeration: writing
    first = run.run_workload(
        path, save_cpu, kib=KIB, queue_depth=QD, irq=True, save_at=save_at, save_to=snap_file
    )
    assert first["verified"] and first["saved_at_exit"] >= save_at
    snap = snapshot.read(snap_file)
    devices = snap.machine["devices"]
    assert 0 < _written_sectors(snap) < KIB * 1024 // 512  # mid-I/O
    # The driver had set up MSI-X (vectors for the queue and configuration changes) and
    # enabled the BAR: both must come back, or no interrupt would reach the guest.
    blk = devices["virtio-blk"]
    assert blk["msix"]["enabled"] and blk["queues"][0]["vector"] != 0xFFFF
    fn = devices["pci-host"]["slots"][1][1]  # slot 0: the host bridge
    assert fn["command"] & 0x6 == 0x6  # Memory Space + Bus Master
    restored = run.restore_workload(snap_file, restore_cpu)
    assert restored["verified"], restored
    assert restored["ios"] == first["ios"] == KIB // 4 * 2
    assert restored["all_exits"] == first["all_exits"]
    if path == "virtio-pci":
        assert restored["all_exits"] == pci_reference["all_exits"]
        assert restored["exits_total"] == pci_reference["exits_total"]


@pytest.fixture
def pci_saved(tmp_path, need_soft, need_gcc):
    snap_file = tmp_path / "pci.snap"
    run.run_workload("virtio-pci", "soft", kib=64, queue_depth=4, irq=True, save_at=60,
                     save_to=snap_file)  # fmt: skip
    return snap_file


def _pci_fn(h) -> dict:
    return h["machine"]["devices"]["pci-host"]["slots"][1][1]


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda h: _pci_fn(h).update(bars=[[0, 0xE0000010]]), "not aligned"),
        (lambda h: _pci_fn(h).update(bars=[]), "BARs are"),
        (lambda h: h["machine"]["devices"]["pci-host"]["slots"].pop(), "slots are"),
        (lambda h: h["machine"]["devices"]["virtio-blk"]["msix"]["entries"].pop(), "MSI-X"),
        (lambda h: h["machine"]["devices"]["virtio-blk"]["msix"].update(pending=1 << 40),
         "pending bits"),
        (lambda h: h["machine"]["devices"]["virtio-blk"].update(isr="x"), "isr"),
        (lambda h: h["machine"]["devices"]["pci-bar-allocator"].update(next=0x1000),
         "memory window"),
    ],
)  # fmt: skip
def test_tampered_pci_snapshots_are_refused_with_a_reason(pci_saved, mutate, why):
    _rewrite_header(pci_saved, mutate)
    with pytest.raises(snapshot.SnapshotError, match=why):
        run.restore_workload(pci_saved, "soft")
