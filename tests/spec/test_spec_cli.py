"""``virtio spec``: JSON, tables and the C header."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import virtio.spec as spec
from virtio.cli import spec as cli_spec

ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    parser = argparse.ArgumentParser(prog="virtio")
    cli_spec.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_python_m_virtio_spec_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "virtio", "spec", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    data = json.loads(proc.stdout)
    for key in (
        "spec_version",
        "device_ids",
        "features",
        "status",
        "structs",
        "struct_fields",
        "constants",
        "sections",
    ):
        assert key in data, key
    assert data["spec_version"] == "1.4"
    assert data["device_ids"]["VIRTIO_ID_BLOCK"] == 2
    assert data["device_ids"]["VIRTIO_ID_NET"] == 1
    assert data["device_ids"]["VIRTIO_ID_INPUT"] == 18
    assert data["features"]["VIRTIO_BLK_F_FLUSH"] == 9
    assert data["features"]["VIRTIO_NET_F_MRG_RXBUF"] == 15
    assert data["features"]["VIRTIO_F_RING_PACKED"] == 34
    assert data["features"]["VIRTIO_F_VERSION_1"] == 32
    assert data["status"]["FEATURES_OK"] == 8
    assert data["structs"]["vring_desc"] == 16
    assert data["structs"]["virtio_input_event"] == 8
    assert data["structs"]["virtio_blk_outhdr"] == 16
    assert data["struct_fields"]["vring_desc"] == [
        ["addr", 0, 8],
        ["len", 8, 4],
        ["flags", 12, 2],
        ["next", 14, 2],
    ]
    assert data["constants"]["VRING_DESC_F_INDIRECT"] == 4
    assert data["constants"]["VIRTIO_MMIO_CONFIG"] == 0x100
    assert data["sections"]["VRING_DESC_F_NEXT"] == "2.7.5 The Virtqueue Descriptor Table"
    assert data == spec.export()


def test_tables(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(["spec"], capsys)
    assert out.startswith("virtio 1.4")
    for text in (
        "Device IDs",
        "Feature bits: transport",
        "Feature bits: blk",
        "Feature bits: net",
        "Device status bits",
        "Structures",
    ):
        assert text in out
    lines = out.splitlines()
    assert any(line.split()[:2] == ["2", "VIRTIO_ID_BLOCK"] and "§5.2.1" in line for line in lines)
    assert any(
        line.split()[:2] == ["34", "VIRTIO_F_RING_PACKED"] and "§6" in line for line in lines
    )
    assert any("VIRTIO_F_ADMIN_VQ" in line and "not in 1.2" in line for line in lines)
    assert any(line.split() == ["+12", "2", "flags"] for line in lines)
    assert "virtio_blk_config  96 bytes  §5.2.4 Device configuration layout" in out


def test_json_and_header_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["spec", "--json"], capsys) == spec.export_json()
    header = _run(["spec", "--header"], capsys)
    assert header == spec.c_header()
    assert "#define VIRTIO_F_RING_PACKED 34" in header
    assert "struct vring_desc {" in header
