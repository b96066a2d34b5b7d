"""The catalogue of buggy drivers (issue 12, Tests): every bug is caught by
``run-driver`` and named by its clause; the races only under a ``--timing`` mode,
reproducibly by seed.  The driver is tests/drvkit/drivers/buggy.c (args[0]: the bug);
with bug 0 it is correct."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.drvkit import run_driver
from virtio.spec import sections as sec

BUGGY = Path(__file__).parent / "drivers" / "buggy.c"

# bug number -> (device, the clause of the first driver error, error class)
CATALOGUE = {
    1: ("blk", sec.S_4_2_2_2, "MmioAccessError"),  # 16-bit control register read
    2: ("blk", sec.S_4_2_2_2, "MmioAccessError"),  # write to MagicValue
    3: ("blk", sec.S_3_1_1, "QueueSetupError"),  # no FEATURES_OK, then DRIVER_OK
    4: ("blk", sec.S_2_1_1, "DeviceStatusError"),  # clears ACKNOWLEDGE
    5: ("blk", sec.S_2_2_1, "FeatureNegotiationError"),  # unoffered feature
    6: ("blk", sec.S_6_1, "FeatureNegotiationError"),  # no VERSION_1
    7: ("blk", sec.S_4_2_2_2, "QueueSetupError"),  # QueueNum > QueueNumMax
    8: ("blk", sec.S_4_2_2_2, "QueueSetupError"),  # queue set-up while ready
    9: ("blk", sec.S_3_1_1, "NotificationError"),  # notify before DRIVER_OK
    10: ("blk", sec.S_2_7_5, "DescriptorChainError"),  # next outside the table
    11: ("blk", sec.S_2_7_6, "InvalidAvailIdx"),  # avail idx jump
    12: ("blk", sec.S_5_2_6_1, "DriverError"),  # FLUSH with sector 5 (strict)
    13: ("blk", sec.S_5_2_6_1, "DriverError"),  # read beyond capacity (strict)
    14: ("blk", sec.S_5_2_6_1, "DriverError"),  # 100-byte OUT (strict)
    15: ("blk", sec.S_2_7_4_2, "DescriptorChainError"),  # writable before readable
    16: ("blk", sec.S_3_1_1, "FeatureNegotiationError"),  # features after FEATURES_OK
    17: ("blk", sec.S_4_2_2_2, "MmioAccessError"),  # config read past its end
    18: ("rng", sec.S_5_4_6_1, "DescriptorChainError"),  # readable entropy buffer
}
PCI_CATALOGUE = {  # the register bugs made in the common configuration structure
    **CATALOGUE,
    1: ("blk", sec.S_4_1_3_1, "PciAccessError"),  # 16-bit read of the 8-bit device_status
    2: ("blk", sec.S_4_1_4_3_2, "PciAccessError"),  # write to num_queues
    7: ("blk", sec.S_4_1_4_3_2, "QueueSetupError"),  # queue_size 257 (> max, not 2^n)
    8: ("blk", sec.S_4_1_4_3_2, "QueueSetupError"),  # queue_desc_lo while queue_enable
    17: ("blk", sec.S_4_1_4_6, "PciAccessError"),  # past the device configuration
}
"""§4.1: over virtio-pci every transport-independent bug is reported identically."""
RACE_NO_RECHECK = 101
RACE_USED_EVENT = 102
RACE_REFILL = 103
RACE_ORDER = 104
RACE_STATUS_EARLY = 105


def run(bug: int, device: str = "blk", **kw):
    kw.setdefault("cpu", "soft")
    kw.setdefault("timeout", 60)
    return run_driver(BUGGY, device, args=[bug], **kw)


@pytest.mark.parametrize("device", ["blk", "rng"])
def test_the_correct_variant_passes(device):
    res = run(0, device)
    assert res.success and res.exit_status == 0, res.to_json()


@pytest.mark.parametrize("bug", sorted(CATALOGUE))
def test_bug_is_named_by_its_clause(bug):
    device, section, cls = CATALOGUE[bug]
    res = run(bug, device)
    d = res.as_dict()
    assert d["result"] == 0, d  # the program believes it worked ...
    assert res.exit_status == 1 and not res.success  # ... run-driver does not
    first = res.driver_errors[0]
    assert (first["clause"], first["class"]) == (section.number, cls), d["driver_errors"]
    assert first["label"] == section.label
    assert first["rip"].startswith("0x1")  # inside the program, linked at 1 MiB
    assert "register" in first and "exit" in first


@pytest.mark.parametrize("bug", sorted(PCI_CATALOGUE))
def test_bug_over_pci_is_named_by_its_clause(bug):
    device, section, cls = PCI_CATALOGUE[bug]
    res = run(bug, device, transport="pci")
    d = res.as_dict()
    assert d["result"] == 0 and not res.success, d
    first = res.driver_errors[0]
    assert (first["clause"], first["class"], first["label"]) == (
        section.number, cls, section.label,
    ), d["driver_errors"]  # fmt: skip
    assert first["rip"].startswith("0x1") and "register" in first


def test_correct_variant_passes_over_pci():
    assert all(run(0, dev, transport="pci").success for dev in ("blk", "rng"))


def test_strict_checks_are_off_with_no_strict():
    """§5.2.6.1 violations are answered with IOERR either way; only strict reports them."""
    res = run(12, "blk", strict=False)
    assert res.success, res.driver_errors


@pytest.mark.parametrize("bug", [1, 2, 7, 17])
def test_register_rules_are_identical_on_kvm_and_soft(bug, need_kvm):
    """§4.2.2.2 width/access rules: the same errors, at the same exits, on both CPUs."""
    runs = [run(bug, cpu=cpu, timeout=300).driver_errors for cpu in ("soft", "kvm")]
    keys = ("clause", "class", "message", "register", "access", "exit")
    soft, kvm = ([{k: e.get(k) for k in keys} for e in errs] for errs in runs)
    assert soft == kvm and soft


@pytest.mark.parametrize(
    ("bug", "mode"),
    [(RACE_NO_RECHECK, "deferred"), (RACE_NO_RECHECK, "random"), (RACE_USED_EVENT, "batch")],
)
def test_races_show_only_under_timing(bug, mode):
    assert run(bug).success  # inline: every request is done when the notify returns
    first, again = (run(bug, timing=mode, seed=7).as_dict() for _ in range(2))
    assert not first["success"] and first["halt"].startswith("halted")
    assert not first["driver_errors"]  # the spec allows what the device did
    # Reproducible by seed: the same failure at the same exit.
    assert (first["halt"], first["exits_total"]) == (again["halt"], again["exits_total"])


# The device's work follows the timing model: a request is *processed* (data read,
# status written) when the model admits it, not when it is made available, so races
# between the driver and the device's work show (virtio/service.py CompletionGate.admit).
WORK_RACES = [
    # bug, mode that exposes it, modes it survives (besides inline), what goes wrong
    (RACE_REFILL, "deferred", ["batch"]),  # §2.7.13/§2.7.14: the device reads the rewrite
    (RACE_ORDER, "reorder", ["deferred", "batch", "slow-start"]),  # §2.7.8: any order
    (RACE_STATUS_EARLY, "deferred", ["batch"]),  # §2.7.14, §5.2.6: status not yet written
]


@pytest.mark.parametrize(("bug", "mode", "survives"), WORK_RACES)
def test_races_with_the_device_work(bug, mode, survives):
    assert run(bug).success  # inline: the device did everything inside the notify
    for other in survives:
        assert run(bug, timing=other, seed=7).success, other
    first, again = (run(bug, timing=mode, seed=7).as_dict() for _ in range(2))
    assert first["result"] == 12 and first["values"]["1"] > 0  # PV_E_VERIFY: bad data seen
    assert not first["driver_errors"] and first["halt"] is None  # the device did no wrong
    # Reproducible by seed: the same outcome at the same exit.
    keys = ("result", "values", "exits_total", "requests_served")
    assert {k: first[k] for k in keys} == {k: again[k] for k in keys}


def test_status_written_when_processed_not_when_made_available(tmp_path):
    """Under deferred timing the status byte is written when the device admits the
    request (its ``defer`` ... ``used`` in the trace), after the notify returned."""
    from emulator.drvkit.trace import read_trace

    trace = tmp_path / "t"
    d = run(RACE_STATUS_EARLY, timing="deferred", seed=1, trace=trace).as_dict()
    assert d["values"]["1"] == 8  # all 4 writes and 4 reads seen unfinished
    events = read_trace(trace)
    defer = next(e for e in events if e.kind == "defer")
    used = next(e for e in events if e.kind == "used" and e.exit >= defer.exit)
    assert used.exit == defer.fields["until"] > defer.exit


@pytest.mark.parametrize(("bug", "mode", "survives"), WORK_RACES)
def test_races_with_the_device_work_over_pci(bug, mode, survives):
    """The timing model sits in the service layer: the same races over virtio-pci."""
    assert run(bug, transport="pci").success
    d = run(bug, transport="pci", timing=mode, seed=7).as_dict()
    assert d["result"] == 12 and d["values"]["1"] > 0 and not d["driver_errors"], d
