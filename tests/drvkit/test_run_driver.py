"""``virtio run-driver`` with the template drivers: every timing mode, injections,
traces, the JSON document and exit status (issue 12 §1-§3, §5)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from emulator.drvkit import RunDriverError, run_driver
from emulator.drvkit.inject import InjectSpecError, parse
from emulator.drvkit.session import template_path
from emulator.drvkit.timing import MODES
from emulator.drvkit.trace import chrome_trace, read_trace
from virtio.cli import main as cli

ARGS = {  # blk: nreqs depth irq ; rng: nbufs len rounds irq
    ("blk", "irq"): [16, 4, 1],
    ("blk", "poll"): [16, 4, 0],
    ("rng", "irq"): [8, 64, 4, 1],
    ("rng", "poll"): [8, 64, 4, 0],
}


def template(device: str, **kw):
    kw.setdefault("cpu", "soft")
    kw.setdefault("timeout", 60)
    kw.setdefault("args", ARGS[(device, "irq")])
    return run_driver(template_path(device), device, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("device", "wait"), sorted(ARGS))
def test_templates_pass_every_timing_mode(device, wait, mode):
    for seed in (1, 2, 3):
        res = template(device, timing=mode, seed=seed, args=ARGS[(device, wait)])
        d = res.as_dict()
        assert res.exit_status == 0, d
        assert d["requests_held_at_end"] == 0 and d["requests_served"] >= 32
        assert not d["device_status"]["needs_reset"]


def test_timing_changes_what_the_driver_sees():
    """Deferred completions make an interrupt-driven driver sleep; inline never does."""
    inline = template("blk").as_dict()
    deferred = template("blk", timing="deferred").as_dict()
    assert inline["interrupts_raised"] == 0 and deferred["interrupts_raised"] > 0
    assert deferred["exits_by_reason"]["HLT"] > inline["exits_by_reason"]["HLT"]


def test_inject_ioerr_reaches_the_driver():
    res = template("blk", inject=["ioerr@req=5"])
    d = res.as_dict()
    assert d["result"] == 9 and res.exit_status == 1 and not d["driver_errors"]
    assert [i["inject"] for i in d["injections"]] == ["ioerr@req=5"]


def test_inject_needs_reset_is_the_device_not_the_driver():
    d = template("blk", inject=["needs-reset@req=3"]).as_dict()
    assert d["result"] == 13  # PV_E_NEEDS_RESET: the template saw the config interrupt
    assert d["device_status"]["needs_reset"] and not d["driver_errors"]
    assert d["device_events"] and d["injections"][0]["request"] == 3


def test_inject_features_ok_refused():
    d = template("blk", inject=["features-ok-refused"]).as_dict()
    assert d["result"] == 6 and d["device_status"]["failed"] and not d["driver_errors"]


def test_inject_smaller_queue_num_max(tmp_path):
    trace = tmp_path / "t"
    d = template("blk", inject=["queue-num-max=8"], trace=trace).as_dict()
    assert d["success"], d
    reads = [e for e in read_trace(trace) if e.fields.get("reg") == "queue_num_max"]
    assert reads and all(e.fields["value"] == 8 for e in reads)


def test_inject_config_change_and_spurious_irq():
    """Interrupts arrive when the guest halts: deferred completions make it halt."""
    inject = ["config-change@req=3", "spurious-irq@exit=40"]
    d = template("blk", inject=inject, timing="deferred").as_dict()
    assert d["success"], d
    assert "configuration changed" in d["output"]
    assert "capacity 16384 -> 18432 sectors" in d["injections"][0]["note"]
    assert {i["kind"] for i in d["injections"]} == {"config-change", "spurious-irq"}


@pytest.mark.parametrize("spec", ["bogus", "ioerr", "ioerr@exit=3", "queue-num-max@req=1"])
def test_bad_inject_specs(spec):
    with pytest.raises(InjectSpecError):
        parse(spec)


def test_status_injection_needs_a_device_with_statuses():
    with pytest.raises(InjectSpecError):
        template("rng", inject=["ioerr@req=1"])


def test_trace_lines_chrome_json_and_replay(tmp_path, capsys):
    path = tmp_path / "run.trace"
    res = run_driver(
        template_path("blk"), "blk", cpu="soft", trace=path, timing="reorder", seed=5,
        args=[8, 4, 1], inject=["spurious-irq@exit=30"],
    )  # fmt: skip
    assert res.success
    events = list(read_trace(path))
    kinds = {e.kind for e in events}
    assert {"read", "write", "notify", "status", "pop", "used", "irq", "inject", "result"} <= kinds
    assert [e.seq for e in events] == list(range(len(events)))
    assert all(a.exit <= b.exit for a, b in itertools.pairwise(events))
    pops = sum(1 for e in events if e.kind == "pop")
    used = sum(len(str(e.fields["heads"]).split(",")) for e in events if e.kind == "used")
    assert pops == used == res.as_dict()["requests_served"] == 17
    chrome = json.loads(path.with_name("run.trace.json").read_text())
    for doc in (chrome, chrome_trace(events)):  # as written, and rebuilt from the lines
        phases = [e["ph"] for e in doc["traceEvents"]]
        assert phases.count("b") == phases.count("e") == 17
        assert all("ts" in e and "pid" in e for e in doc["traceEvents"] if e["ph"] != "M")
    assert cli(["trace", "show", str(path), "--kind", "notify", "--kind", "inject"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out and all("<- §" in line for line in out)
    assert any("§4.2.3.3 Available Buffer Notifications" in line for line in out)
    assert any("inject" in line and "§2.3" in line for line in out)


def test_trace_of_a_driver_error_names_the_clause(tmp_path, capsys):
    buggy = Path(__file__).parent / "drivers" / "buggy.c"
    path = tmp_path / "err.trace"
    res = run_driver(buggy, "blk", cpu="soft", args=[12], trace=path)  # FLUSH, sector 5
    assert res.exit_status == 1
    assert cli(["trace", "show", str(path), "--kind", "error"]) == 0
    out = capsys.readouterr().out
    assert "§5.2.6.1" in out and "drivernormative:Device Types / Block Device" in out


def test_cli_json_and_exit_status(capsys):
    argv = ["run-driver", "template", "--device", "rng", "--cpu", "soft", "--json"]
    assert cli([*argv, "--timing", "batch", "--seed", "4"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["success"] and d["timing"] == "batch" and d["device"] == "rng"
    assert cli([*argv, "--inject", "features-ok-refused"]) == 1
    assert json.loads(capsys.readouterr().out)["result"] == 6


def test_cli_text_report_names_the_clause(capsys):
    buggy = Path(__file__).parent / "drivers" / "buggy.c"
    assert cli(["run-driver", str(buggy), "--cpu", "soft", "--arg", "1"]) == 1
    out = capsys.readouterr().out
    assert "driver error §4.2.2.2 MmioAccessError at status (read)" in out
    assert out.rstrip().splitlines()[-1].startswith("FAIL:")


@pytest.mark.parametrize("mode", ["inline", "deferred", "random"])
@pytest.mark.parametrize("device", ["blk", "rng"])
def test_templates_over_pci(device, mode):
    """The same template finds its device on bus 0 (§4.1.2.2) and passes over virtio-pci."""
    d = template(device, transport="pci", timing=mode, seed=2).as_dict()
    assert d["success"] and d["transport"] == "pci", d
    assert d["requests_held_at_end"] == 0 and d["requests_served"] >= 32
    if mode != "inline":
        assert d["interrupts_raised"] > 0  # INTx, acknowledged by the ISR status read


def test_pci_injections_and_trace(tmp_path, capsys):
    trace = tmp_path / "pci.trace"
    rc = cli(
        ["run-driver", "template", "--transport", "pci", "--cpu", "soft", "--timing",
         "deferred", "--inject", "config-change@req=5", "--inject", "ioerr@req=20",
         "--trace", str(trace), "--json"]
    )  # fmt: skip
    d = json.loads(capsys.readouterr().out)
    assert rc == 1 and d["result"] == 9 and not d["driver_errors"]  # I/O error, no bug
    assert [i["inject"] for i in d["injections"]] == ["config-change@req=5", "ioerr@req=20"]
    events = list(read_trace(trace))
    regs = {e.fields.get("reg") for e in events if e.kind in ("read", "write")}
    assert {"device_status", "queue_enable", "queue_notify", "isr"} <= regs
    assert {"notify", "irq", "inject", "pop", "used"} <= {e.kind for e in events}


def test_unknown_transport_is_refused():
    with pytest.raises(RunDriverError):
        template("blk", transport="ccw")


def test_program_must_be_c_or_elf(tmp_path):
    junk = tmp_path / "x.bin"
    junk.write_bytes(b"not an elf")
    with pytest.raises(RunDriverError):
        run_driver(junk, "blk", cpu="soft")
