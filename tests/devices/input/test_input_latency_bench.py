"""bench/input_latency.py runs end to end for every source (the figures in
docs/benchmarks.md come from it): every group reaches the front-end, each figure
covers every group.  No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "input_latency.py"
GROUPS = 40


@pytest.mark.parametrize("source", ["control", "loop", "thread", "inproc"])
def test_the_latency_bench_delivers_every_group(source: str) -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--source", source, "--groups", str(GROUPS), "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    res = json.loads(out.stdout)
    assert res["source"] == source and res["groups"] == GROUPS
    names = ["device"] + (["frontend"] if source != "inproc" else [])
    names += ["sent→inject", "sent→used"] if source == "control" else []
    for name in names:
        assert res[name]["n"] == GROUPS, name
        assert 0 < res[name]["p50"] <= res[name]["p99"] <= res[name]["max"], name
    # Every group went out, at injection or after waiting for buffers.
    ready = res.get("device, buffers ready", {"n": 0})["n"]
    assert ready + res["waited"] == GROUPS
    # Groups that found their buffers posted went out through the native call.
    assert ready <= res["native_groups"] <= GROUPS
