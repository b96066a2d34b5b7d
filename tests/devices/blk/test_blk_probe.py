"""Never serve an image under the wrong format (``virtio/devices/blk/probe.py``).

Images are made by the real ``qemu-img create`` for every format it can create,
and our probe must name the format ``qemu-img info`` names; formats qemu-img
cannot create (bochs, cloop, dmg) get a header laid out by hand from their
published layouts.  The CLI refuses them with one line; ``--format raw`` serves
them; a probed raw image refuses a guest write that would turn sector 0 into
another format's header (QEMU's probed-raw rule), on both data paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from virtio.devices.blk import BlkOptions, ImageFormatError, VirtioBlk
from virtio.devices.blk.probe import check_image, probe
from virtio.testing.qemu_img import qemu_img_create

REPO = Path(__file__).resolve().parents[3]
QEMU_IMG = shutil.which("qemu-img")
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")

CREATABLE = {
    "qcow2": [],
    "qcow": [],
    "qed": [],
    "vmdk": [],
    "vdi": [],
    "vhdx": [],
    "vpc": [],
    "parallels": [],
    "luks": ["--object", "secret,id=s0,data=pw", "-o", "key-secret=s0,iter-time=10"],
}


def qemu_img_format(path: Path, extra: list[str]) -> str:
    out = subprocess.run(
        [QEMU_IMG, "info", "--output=json", *_secret(extra), str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)["format"]


def _secret(extra: list[str]) -> list[str]:
    return extra[:2] if extra else []


@needs_qemu_img
@pytest.mark.parametrize("fmt", sorted(CREATABLE))
def test_probe_names_what_qemu_img_made(tmp_path, fmt):
    img = tmp_path / f"disk.{fmt}"
    qemu_img_create("-f", fmt, *CREATABLE[fmt], str(img), "16M")  # retries LUKS calibration
    head = img.read_bytes()[:512]
    assert probe(head) == fmt == qemu_img_format(img, CREATABLE[fmt])
    with pytest.raises(ImageFormatError, match=rf"is a {fmt} image, not a raw disk"):
        check_image(img, None)
    assert check_image(img, "raw", force=True) == "raw"  # the user said so


def test_hand_made_headers_and_raw(tmp_path):
    assert probe(b"Bochs Virtual HD Image\0" + bytes(100)) == "bochs"
    cloop = (
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
    )
    assert probe(cloop) == "cloop"
    assert probe(bytes(512), tail=b"koly" + bytes(508), name="x.dmg") == "dmg"
    assert probe(bytes(512), tail=b"koly" + bytes(508), name="x.img") is None  # as QEMU
    assert probe(bytes(512)) is None
    assert probe(b"\xeb\x63\x90" + bytes(509)) is None  # an MBR boot sector is raw


def test_unaligned_size_refused_unless_forced(tmp_path):
    img = tmp_path / "odd.img"
    img.write_bytes(bytes(1000))
    with pytest.raises(ImageFormatError, match="not a multiple of 512"):
        check_image(img, None)
    assert check_image(img, None, force=True) == "raw"
    with pytest.raises(ImageFormatError, match="not a multiple of 512"):
        VirtioBlk.from_options(BlkOptions(path=str(img)))
    dev = VirtioBlk.from_options(BlkOptions(path=str(img)), force=True)
    try:
        assert dev.capacity == 1
    finally:
        dev.close()


def test_qcow2_format_needs_a_qcow2_image(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    with pytest.raises(ImageFormatError, match="is not a qcow2 image"):
        check_image(img, "qcow2")


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtio", "serve", "blk", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )


@needs_qemu_img
def test_cli_refuses_a_qcow2_image_with_one_line(tmp_path):
    img = tmp_path / "disk.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    before = img.read_bytes()
    sock = os.fspath(tmp_path / "s.sock")
    r = _serve("--socket-path", sock, "--blk-file", str(img))
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert "is a qcow2 image, not a raw disk" in r.stderr and "--format raw" in r.stderr
    assert "use --format qcow2" in r.stderr  # served since issue 9
    assert img.read_bytes() == before and not Path(sock).exists()
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    r = _serve("--socket-path", sock, "--blk-file", str(raw), "--format", "qcow2")
    assert r.returncode == 1 and "is not a qcow2 image" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not Path(sock).exists()
