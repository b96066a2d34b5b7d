"""Fixtures for the run-driver tests: guest compiler, CPU backends (honest skips)."""

from __future__ import annotations

import logging
import shutil

import pytest

from emulator.cpu import kvm_usable


@pytest.fixture(autouse=True)
def _need_gcc_and_unicorn(caplog) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: guest programs cannot be built")
    pytest.importorskip("unicorn")
    caplog.set_level(logging.CRITICAL)  # driver errors are the point here: keep logs quiet


@pytest.fixture
def need_kvm() -> None:
    ok, reason = kvm_usable()
    if not ok:
        pytest.skip(f"/dev/kvm not usable for 64-bit guests: {reason}")
