"""``virtio bench``: JSON rows, verification flags, the PNG chart, exit status."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from virtio.cli import main
from virtio.cli.bench import Canvas, chart_png, encode_png, format_table, plan

pytestmark = pytest.mark.usefixtures("need_gcc", "need_soft")


def read_png(blob: bytes) -> tuple[int, int, bytes]:
    """Minimal PNG reader (enough for our own encoder's output): checks signature,
    chunk CRCs, IHDR, returns (width, height, raw scanlines)."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr, kinds = 8, b"", None, []
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        kind = blob[pos + 4 : pos + 8]
        data = blob[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", blob[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + data) & 0xFFFFFFFF
        kinds.append(kind)
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    width, height, depth, color, *_ = ihdr
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


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
    width, height, _ = read_png(chart.read_bytes())
    assert width > 100 and height > 100


def test_bench_table_and_default_chart(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--kib", "32", "--cpu", "soft", "--paths", "ide-dma", "virtio-mmio"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "exits/IO" in out and "virtio-mmio" in out and "ide-dma" in out
    read_png((tmp_path / "virtio-bench.png").read_bytes())


def test_unknown_path_is_an_error(capsys):
    assert main(["bench", "--paths", "nope", "--chart", ""]) == 2


def test_optional_paths_skipped_when_not_registered(capsys):
    from emulator.run import PATHS

    registry = {k: v for k, v in PATHS.items() if k in ("ide-dma", "virtio-mmio")}
    rows = plan(["ide-dma", "virtio-mmio"], [1, 32], registry)
    assert rows == [("ide-dma", 1), ("virtio-mmio", 1), ("virtio-mmio", 32)]


def test_default_paths_include_vhost_user_when_available(tmp_path, capsys):
    from virtio.cli.bench import load_registry

    if "vhost-user" not in load_registry():
        pytest.skip("no vhost-user path in this build")
    rc = main(["bench", "--json", "--kib", "64", "--cpu", "soft", "--chart", ""])
    out = capsys.readouterr()
    rows = json.loads(out.out)["rows"]
    vu = [r for r in rows if r["path"] == "vhost-user"]
    assert [r["queue_depth"] for r in vu] == [1, 32]
    assert rc == (0 if all(r["verified"] for r in rows) else 1), out.err


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


def test_png_encoder_roundtrip():
    c = Canvas(7, 3)
    c.rect(1, 1, 3, 2, (10, 20, 30))
    width, height, raw = read_png(c.png())
    assert (width, height) == (7, 3)
    row1 = raw[1 * (1 + 21) : 2 * (1 + 21)]
    assert row1[0] == 0 and row1[1 + 3 : 1 + 6] == bytes((10, 20, 30))
    with pytest.raises(ValueError):
        encode_png(2, 2, b"\0" * 5)


def test_chart_and_table_with_failed_row():
    rows = [
        {"path": "ide-dma", "queue_depth": 1, "cpu": "soft", "exits_per_io": 14.0,
         "verified": True, "ios": 2, "exits_per_io_by_reason": {"PIO": 14.0},
         "exits_per_mib": 3584.0, "mb_per_s": 1.0, "us_per_io": 200.0},
        {"path": "vhost-user", "queue_depth": 32, "cpu": "soft", "exits_per_io": None,
         "verified": False, "ios": 0, "exits_per_io_by_reason": {}, "exits_per_mib": None,
         "mb_per_s": None, "us_per_io": None, "error": "RuntimeError: boom"},
    ]  # fmt: skip
    read_png(chart_png(rows))
    table = format_table(rows)
    assert "FAILED" in table and "boom" in table
