"""``run-driver --device net|input`` (issue 12 §1, §3, §4): the project's virtio-net and
virtio-input device classes under the emulator's virtio-mmio and virtio-pci transports,
their templates under every timing mode, the device-type strict checks (§5.1.9.2.1,
§5.8.6.1) and the net injections (link down/up, dropped and duplicated frames)."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.drvkit import run_driver
from emulator.drvkit.inject import InjectSpecError, parse
from emulator.drvkit.session import template_path
from emulator.drvkit.timing import MODES
from emulator.drvkit.trace import read_trace
from virtio.cli import main as cli
from virtio.spec import sections as sec

DRIVERS = Path(__file__).parent / "drivers"
# net: npkts depth irq packed event_idx len grace [bug]; input: nevents irq packed event_idx
# led [bug]
NET = [16, 4, 1, 0, 1, 64, 256]
INPUT = [32, 1, 0, 1, 1]
ARGS = {"net": NET, "input": INPUT}
SENT, RECEIVED, DUPS, LOST, DOWNS, UPS, BAD = (str(k) for k in range(1, 8))


def template(device: str, args=None, **kw):
    kw.setdefault("cpu", "soft")
    kw.setdefault("timeout", 60)
    return run_driver(template_path(device), device, args=args or ARGS[device], **kw)


def check_ok(res) -> dict:
    d = res.as_dict()
    assert res.exit_status == 0 and not d["driver_errors"], d
    assert d["requests_held_at_end"] == 0 and not d["device_status"]["needs_reset"]
    return d


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", ["net", "input"])
def test_templates_pass_every_timing_mode(device, mode):
    for seed in (1, 2):
        d = check_ok(template(device, timing=mode, seed=seed))
        if device == "net":
            assert d["values"][RECEIVED] == 16 and d["device_counters"]["echoed"] == 16
        else:
            assert d["values"]["1"] == 32 and d["device_counters"]["events"] == 32
            assert d["device_counters"]["status_events"] == [[0x11, 1, 1]]  # LED_CAPSL on


@pytest.mark.parametrize("device", ["net", "input"])
@pytest.mark.parametrize(("transport", "mode"), [("pci", "inline"), ("pci", "random")])
def test_templates_over_pci(device, transport, mode):
    d = check_ok(template(device, transport=transport, timing=mode, seed=5))
    assert d["transport"] == "pci" and d["output"].endswith("done\n")


@pytest.mark.parametrize("device", ["net", "input"])
def test_templates_polling_packed(device):
    args = [16, 4, 0, 1, 1, 64, 256] if device == "net" else [32, 0, 1, 1, 1]
    d = check_ok(template(device, args, timing="deferred"))
    assert d["exits_by_reason"].get("HLT", 0) <= 1  # polled with pv_pause (the HLT: the end)


# -- strict checks ------------------------------------------------------------------------
NET_BUGS = {  # bug -> what the first driver error says (§5.1.9.2.1)
    1: "MUST NOT set VIRTIO_NET_HDR_F_DATA_VALID",
    2: "num_buffers 1: the driver MUST set it to zero",
    3: "NEEDS_CSUM without VIRTIO_NET_F_CSUM",
    4: "bits 0x8 are not defined",
    5: "gso_type 0x1 not negotiated",
}
INPUT_BUGS = {1: "type 0x11 code 0x9", 2: "type 0x2 code 0x1"}


def buggy(device: str, bug: int, **kw):
    kw.setdefault("cpu", "soft")
    kw.setdefault("timeout", 60)
    program = DRIVERS / f"{device}_bugs.c"
    return run_driver(program, device, args=[*ARGS[device], bug], **kw)


def first_error(res, section) -> dict:
    assert not res.success and res.exit_status == 1
    e = res.driver_errors[0]
    assert (e["clause"], e["label"], e["class"]) == (section.number, section.label, "DriverError")
    assert e["register"] == "queue_notify" and e["queue"] == 1  # transmitq1 / statusq
    assert e["rip"].startswith("0x1")
    return e


def test_buggy_variants_without_the_bug_pass():
    assert buggy("net", 0).success and buggy("input", 0).success


@pytest.mark.parametrize("bug", sorted(NET_BUGS))
def test_net_header_bug_is_named_by_its_clause(bug):
    res = buggy("net", bug)
    e = first_error(res, sec.S_5_1_9_2_1)
    assert NET_BUGS[bug] in e["message"] and len(res.driver_errors) == 1
    d = res.as_dict()
    assert not d["device_status"]["needs_reset"]  # answered (sent or dropped), no reset
    refused = bug in (3, 5)  # the device drops what it cannot send; sends the rest
    assert d["values"][LOST] == (1 if refused else 0)
    assert d["result"] == (15 if refused else 0)


@pytest.mark.parametrize("bug", sorted(INPUT_BUGS))
def test_input_status_event_never_advertised(bug):
    res = buggy("input", bug)
    e = first_error(res, sec.S_5_8_6_1)
    assert INPUT_BUGS[bug] in e["message"] and "never advertised" in e["message"]
    d = res.as_dict()
    assert d["result"] == 0 and d["device_counters"]["status_ignored"] == 1


@pytest.mark.parametrize(("device", "bug"), [("net", 1), ("input", 1)])
def test_strict_checks_identical_over_pci(device, bug):
    mmio, pci = (buggy(device, bug, transport=t).driver_errors for t in ("mmio", "pci"))
    keys = ("clause", "label", "class", "message", "queue")
    assert [{k: e[k] for k in keys} for e in mmio] == [{k: e[k] for k in keys} for e in pci]


def test_no_strict_turns_the_device_type_checks_off():
    assert buggy("net", 2, strict=False).success
    assert buggy("input", 1, strict=False).success


# -- injections ---------------------------------------------------------------------------
def test_dropped_frame_is_lost(tmp_path):
    trace = tmp_path / "t"
    res = template("net", inject=["drop@pkt=3"], trace=trace)
    d = res.as_dict()
    assert d["result"] == 15 and not d["driver_errors"]  # PV_E_LOST, not a driver bug
    assert (d["values"][RECEIVED], d["values"][LOST]) == (15, 1)
    assert d["device_counters"]["dropped"] == 1
    assert d["injections"] == [
        {"inject": "drop@pkt=3", "kind": "drop", "exit": d["injections"][0]["exit"],
         "note": "transmitted frame 3 lost", "frame": 3}
    ]  # fmt: skip
    assert [e.fields["spec"] for e in read_trace(trace) if e.kind == "inject"] == ["drop@pkt=3"]


def test_duplicated_frame_comes_back_twice():
    d = check_ok(template("net", inject=["dup@pkt=5"]))
    assert (d["values"][RECEIVED], d["values"][DUPS]) == (16, 1)
    assert d["device_counters"]["echoed"] == 17 and d["injections"][0]["frame"] == 5


@pytest.mark.parametrize("irq", [1, 0])
def test_link_down_and_up(irq, tmp_path):
    """The driver sees both changes (configuration change, status LINK_UP) and sends
    nothing while the link is down; an interrupt-driven driver sleeps until link-up
    (the time jumps to the injection)."""
    trace = tmp_path / "t"
    args = [16, 4, irq, 0, 1, 64, 256]
    d = check_ok(
        template("net", args, inject=["link-down@exit=60", "link-up@exit=200"], trace=trace)
    )
    assert (d["values"][DOWNS], d["values"][UPS]) == (1, 1)
    assert d["device_counters"]["link_down"] == 0  # nothing sent into a dead link
    assert [i["exit"] for i in d["injections"]] == [60, 200]
    assert "net: link down\nnet: link up\n" in d["output"]
    injects = [e for e in read_trace(trace) if e.kind == "inject"]
    assert [(e.exit, e.fields["kind"]) for e in injects] == [(60, "link-down"), (200, "link-up")]


def test_link_down_for_good_the_template_waits():
    """No link-up comes: the interrupt-driven template sleeps for it, sending nothing."""
    d = template("net", inject=["link-down@exit=60"]).as_dict()
    assert d["halt"].startswith("halted") and d["result"] is None and not d["driver_errors"]
    assert d["device_counters"]["link_down"] == 0 and d["output"].endswith("link down\n")


@pytest.mark.parametrize(
    ("device", "spec"),
    [("blk", "link-down@exit=5"), ("blk", "drop@pkt=1"), ("input", "dup@pkt=2")],
)
def test_net_injections_need_a_net_device(device, spec):
    with pytest.raises(InjectSpecError):
        run_driver(template_path(device), device, inject=[spec], cpu="soft")


@pytest.mark.parametrize("spec", ["drop@req=1", "dup", "link-up", "link-down@pkt=2"])
def test_bad_net_inject_specs(spec):
    with pytest.raises(InjectSpecError):
        parse(spec)


def test_cli_runs_net_and_input(capsys):
    for device in ("net", "input"):
        assert cli(["run-driver", "template", "--device", device, "--cpu", "soft"]) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith("PASS")


@pytest.mark.parametrize(("device", "bug"), [("net", 1), ("input", 1)])
def test_same_run_on_kvm_and_soft(device, bug, need_kvm):
    """Exits are the device's clock: the same errors at the same exits on both CPUs."""
    runs = [
        buggy(device, bug, cpu=cpu, timing="random", seed=4).as_dict() for cpu in ("soft", "kvm")
    ]
    keys = ("clause", "message", "exit", "queue")
    soft, kvm = ([{k: e[k] for k in keys} for e in d["driver_errors"]] for d in runs)
    assert soft == kvm and soft
    assert runs[0]["exits_total"] == runs[1]["exits_total"]
    assert runs[0]["values"] == runs[1]["values"]
