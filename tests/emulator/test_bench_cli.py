"""``virtio bench``: JSON rows, verification flags, the PNG chart, exit status."""

from __future__ import annotations

import io
import json

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import imread

from emulator.ne2000_paths import MAX_QUEUE_DEPTH
from virtio.cli import bench, main
from virtio.cli.bench import chart_figure, chart_png, format_table, plan

pytestmark = pytest.mark.usefixtures("need_gcc", "need_soft")


def png_size(blob: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, decoded by matplotlib (raises if it is not one)."""
    pixels = imread(io.BytesIO(blob), format="png")
    return pixels.shape[1], pixels.shape[0]


def test_bench_json_mib1_soft(tmp_path, capsys):
    chart = tmp_path / "bench.png"
    # The paths this bench owns; vhost-user (another component) has its own test below.
    rc = main(["bench", "--json", "--mib", "1", "--cpu", "soft", "--chart", str(chart),
               "--paths", "ide-pio", "ide-dma", "virtio-mmio"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads(out.out)
    rows = doc["rows"]
    got = [(r["path"], r["queue_depth"]) for r in rows]
    assert got == [("ide-pio", 1), ("ide-dma", 1), ("virtio-mmio", 1), ("virtio-mmio", 32)]
    for r in rows:
        for key in (
            "path",
            "queue_depth",
            "cpu",
            "ios",
            "exits_per_io",
            "exits_by_reason",
            "mb_per_s",
            "verified",
        ):
            assert key in r
        assert r["verified"] is True
        assert r["cpu"] == "soft"
        assert r["ios"] == 2 * 256
        assert sum(r["exits_by_reason"].values()) == r["exits_total"]
    by = {(r["path"], r["queue_depth"]): r for r in rows}
    assert by[("virtio-mmio", 32)]["exits_per_io"] <= 0.05
    assert by[("ide-pio", 1)]["exits_per_io"] > 1000
    assert "running" in out.err and "done in" in out.err  # progress on stderr
    width, height = png_size(chart.read_bytes())
    assert width > 100 and height > 100


def test_bench_table_and_default_chart(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--kib", "32", "--cpu", "soft", "--paths", "ide-dma", "virtio-mmio"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "exits/IO" in out and "virtio-mmio" in out and "ide-dma" in out
    png_size((tmp_path / "virtio-bench.png").read_bytes())


def test_unknown_path_is_an_error(capsys):
    assert main(["bench", "--paths", "nope", "--chart", ""]) == 2
    assert "unknown path(s) nope" in capsys.readouterr().err


def test_optional_path_skipped_when_not_registered(capsys, monkeypatch):
    """A build without the vhost-user path module: asking for it skips it (with a
    note), the other rows run; a non-optional unknown path is still an error."""
    from emulator import run as emu

    monkeypatch.setattr(bench, "PATH_MODULES", ())
    monkeypatch.delitem(emu.PATHS, "vhost-user", raising=False)
    rc = main(["bench", "--json", "--kib", "16", "--cpu", "soft", "--chart", "",
               "--paths", "ide-dma", "vhost-user"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = json.loads(out.out)["rows"]
    assert [(r["path"], r["verified"]) for r in rows] == [("ide-dma", True)]
    assert "vhost-user: not registered in this build, skipped" in out.err
    assert main(["bench", "--chart", "", "--paths", "ide-dma", "vhost-userx"]) == 2


def test_plan_clamps_queue_depths_per_path():
    registry = bench.load_registry()
    rows = plan(["ide-dma", "virtio-mmio", "ne2000"], [1, 32, 32], registry)
    assert rows == [
        ("ide-dma", 1), ("virtio-mmio", 1), ("virtio-mmio", 32),
        ("ne2000", 1), ("ne2000", MAX_QUEUE_DEPTH),
    ]  # fmt: skip


def test_default_paths_include_vhost_user(tmp_path, capsys):
    """The default run has every path, vhost-user included, and all of them verify;
    vhost-user's data path takes no VMM exit."""
    assert "vhost-user" in bench.load_registry()
    rc = main(["bench", "--json", "--kib", "64", "--cpu", "soft", "--chart", ""])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = json.loads(out.out)["rows"]
    assert [(r["path"], r["queue_depth"]) for r in rows] == [
        ("ide-pio", 1), ("ide-dma", 1), ("virtio-mmio", 1), ("virtio-mmio", 32),
        ("virtio-pci", 1), ("virtio-pci", 32), ("vhost-user", 1), ("vhost-user", 32),
        ("vhost-user-pci", 1), ("vhost-user-pci", 32),
        ("ne2000", 1), ("ne2000", MAX_QUEUE_DEPTH), ("virtio-net", 1), ("virtio-net", 32),
        ("virtio-input", 1), ("virtio-input", 32),
    ]  # fmt: skip
    assert all(r["verified"] for r in rows), out.err
    by = {(r["path"], r["queue_depth"]): r for r in rows}
    for qd in (1, 32):  # same exits per request over both transports
        assert by[("virtio-pci", qd)]["exits_per_io"] == by[("virtio-mmio", qd)]["exits_per_io"]
    for path in ("vhost-user", "vhost-user-pci"):  # the back-end serves the queues
        vu = [r for r in rows if r["path"] == path]
        assert [r["queue_depth"] for r in vu] == [1, 32]
        assert [r["exits_per_io"] for r in vu] == [0, 0], vu


def test_failed_verification_exit_status(tmp_path, capsys, monkeypatch):
    from emulator import run as emu

    real = emu.run_workload

    def broken(*args, **kwargs):
        res = real(*args, **kwargs)
        res["verified"] = False
        return res

    monkeypatch.setattr(emu, "run_workload", broken)
    rc = main(["bench", "--json", "--kib", "16", "--cpu", "soft", "--paths", "ide-dma",
               "--chart", ""])  # fmt: skip
    assert rc == 1
    assert json.loads(capsys.readouterr().out)["rows"][0]["verified"] is False


CHART_ROWS = [
    {"path": "ide-pio", "queue_depth": 1, "cpu": "soft", "exits_per_io": 1043.2,
     "verified": True},
    {"path": "virtio-mmio", "queue_depth": 32, "cpu": "soft", "exits_per_io": 0.039,
     "verified": True},
    {"path": "vhost-user", "queue_depth": 1, "cpu": "soft", "exits_per_io": 0.0,
     "verified": True},
    {"path": "vhost-user", "queue_depth": 32, "cpu": "soft", "exits_per_io": None,
     "verified": False, "error": "RuntimeError: boom"},
    {"path": "ide-dma", "queue_depth": 1, "cpu": "soft", "exits_per_io": 14.0,
     "verified": False},
]  # fmt: skip


def test_chart_reads_right():
    """Values with thousands separators, a zero row says 0 (no bar on a log scale), a
    failed row says FAILED, an unverified one says so; decade ticks read 1,000."""
    fig = chart_figure(CHART_ROWS)
    FigureCanvasAgg(fig).draw()
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "ide-pio qd1 soft", "virtio-mmio qd32 soft", "vhost-user qd1 soft",
        "vhost-user qd32 soft", "ide-dma qd1 soft",
    ]  # fmt: skip
    texts = {round(t.get_position()[1]): t.get_text() for t in ax.texts}
    assert texts == {
        0: "1,043",
        1: "0.039",
        2: bench.ZERO_LABEL,
        3: bench.FAILED_LABEL,
        4: "14  (NOT VERIFIED)",
    }
    assert bench.ZERO_LABEL.startswith("0 ")
    bars = {round(p.get_y() + p.get_height() / 2): p for p in ax.patches}
    assert sorted(bars) == [0, 1, 4]  # rows with a positive value only
    for row, bar in bars.items():
        assert bar.get_x() + bar.get_width() == pytest.approx(CHART_ROWS[row]["exits_per_io"])
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert {"0.01", "1", "1,000", "10,000"} <= set(ticks)
    lo, hi = ax.get_xlim()
    assert lo <= 0.01 and hi >= 10_000


def test_chart_png_and_table_with_failed_row():
    width, height = png_size(chart_png(CHART_ROWS))
    assert (width, height) == (900, 440)  # 9 x (1.9 + 0.5 * 5) inches at 100 dpi
    rows = [
        {"path": "ide-dma", "queue_depth": 1, "cpu": "soft", "exits_per_io": 14.0,
         "verified": True, "ios": 2, "exits_per_io_by_reason": {"PIO": 14.0},
         "exits_per_mib": 3584.0, "mb_per_s": 1.0, "us_per_io": 200.0},
        {"path": "vhost-user", "queue_depth": 32, "cpu": "soft", "exits_per_io": None,
         "verified": False, "ios": 0, "exits_per_io_by_reason": {}, "exits_per_mib": None,
         "mb_per_s": None, "us_per_io": None, "error": "RuntimeError: boom"},
    ]  # fmt: skip
    table = format_table(rows)
    assert "FAILED" in table and "boom" in table and "3,584" in table


def test_ne2000_rows_count_exits_per_packet_and_per_mib(capsys):
    rc = main(["bench", "--json", "--kib", "44", "--cpu", "soft", "--chart", "",
               "--paths", "ne2000", "--queue-depth", "1", "32"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = json.loads(out.out)["rows"]
    assert [r["queue_depth"] for r in rows] == [1, MAX_QUEUE_DEPTH]
    for r in rows:
        assert r["verified"] and r["unit"] == "packet" and r["io_bytes"] == 1514
        mib = r["ios"] * 1514 / (1 << 20)
        assert r["exits_per_mib"] == pytest.approx(r["exits_total"] / mib)
    qd1, batched = rows
    assert qd1["ios"] == 28 and batched["ios"] == 18
    assert batched["exits_per_io"] < qd1["exits_per_io"] == 793.0
    table = format_table(rows)
    assert "1514 B pkt" in table and "ne2000" in table


def test_virtio_net_rows_next_to_ne2000(capsys):
    """virtio-net and NE2000 rows in one run: exits per packet and per MiB, the
    virtio rows at one QueueNotify per batch (1 at QD1, 1/32 batched)."""
    rc = main(["bench", "--json", "--kib", "96", "--cpu", "soft", "--chart", "",
               "--paths", "ne2000", "virtio-net", "--queue-depth", "1", "32"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = {(r["path"], r["queue_depth"]): r for r in json.loads(out.out)["rows"]}
    assert set(rows) == {("ne2000", 1), ("ne2000", MAX_QUEUE_DEPTH), ("virtio-net", 1),
                         ("virtio-net", 32)}  # fmt: skip
    for r in rows.values():
        assert r["verified"] and r["unit"] == "packet" and r["io_bytes"] == 1514
        mib = r["ios"] * 1514 / (1 << 20)
        assert r["exits_per_mib"] == pytest.approx(r["exits_total"] / mib)
    assert rows[("virtio-net", 1)]["exits_per_io"] == 1.0
    assert rows[("virtio-net", 32)]["exits_per_io"] == 1 / 32
    assert rows[("virtio-net", 1)]["exits_per_io_by_reason"] == {"MMIO": 1.0}
    assert rows[("ne2000", 1)]["exits_per_io"] > 500 * rows[("virtio-net", 1)]["exits_per_io"]
    assert "virtio-net" in format_table(list(rows.values()))


def test_virtio_input_rows_exits_per_event(capsys):
    """virtio-input rows: an I/O is one input event; single key groups cost 3 exits per
    group (HLT, InterruptStatus, InterruptACK), a burst of 32 groups the same 3."""
    rc = main(["bench", "--json", "--kib", "4", "--cpu", "soft", "--chart", "",
               "--paths", "virtio-input", "--queue-depth", "1", "32"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = json.loads(out.out)["rows"]
    assert [r["queue_depth"] for r in rows] == [1, 32]
    for r in rows:
        assert r["verified"] and r["unit"] == "event" and r["ios"] == 512
    assert rows[0]["exits_per_io"] == 1.5 and rows[1]["exits_per_io"] == 3 / 64
    assert "input event" in format_table(rows)


def test_default_size_is_quick_per_unit_and_full_restores_it(capsys):
    """Without --kib/--mib, input events and packets run a short default (16 KiB of
    events, 64 KiB of packets) so the default run stays quick; --full runs them at
    the requests' 256 KiB; an explicit size applies to every path."""
    registry = bench.load_registry()
    assert bench.path_kib(registry["virtio-input"], 256, False, False) == 16
    assert bench.path_kib(registry["ne2000"], 256, False, False) == 64
    assert bench.path_kib(registry["virtio-mmio"], 256, False, False) == 256
    assert bench.path_kib(registry["virtio-input"], 256, False, True) == 256
    assert bench.path_kib(registry["virtio-input"], 96, True, False) == 96
    for extra, events in (([], 16 * 1024 // 8), (["--full"], 256 * 1024 // 8)):
        rc = main(["bench", "--json", "--cpu", "soft", "--chart", "", "--paths", "virtio-input",
                   "--queue-depth", "32", *extra])  # fmt: skip
        out = capsys.readouterr()
        assert rc == 0, out.err
        (row,) = json.loads(out.out)["rows"]
        assert row["verified"] and row["ios"] == events and row["kib"] == events * 8 // 1024
        assert row["exits_per_io"] == 3 / 64  # the same per event at either size
