"""The checked-in ``spec/`` artifacts equal a fresh generation, and the header compiles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import virtio.spec as spec

SPEC_DIR = Path(__file__).resolve().parents[2] / "spec"
REGEN = "regenerate: python -m virtio spec --json/--header (see spec/README.md)"


def test_json_is_current() -> None:
    assert (SPEC_DIR / "virtio-1.4.json").read_text() == spec.export_json(), REGEN


def test_header_is_current() -> None:
    assert (SPEC_DIR / "virtio_spec.h").read_text() == spec.c_header(), REGEN


def test_header_compiles(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot compile spec/virtio_spec.h")
    src = tmp_path / "use.c"
    src.write_text(
        '#include "virtio_spec.h"\n'
        "struct vring_desc d;\n"
        '_Static_assert(VIRTIO_ID_BLOCK == 2, "id");\n'
        '_Static_assert(sizeof(struct virtio_blk_config) == 96, "blk");\n'
    )
    subprocess.run(
        [gcc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I", str(SPEC_DIR),
         str(src)],
        check=True,
    )  # fmt: skip
