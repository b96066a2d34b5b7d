"""Fixtures for the emulator tests: CPU backend parametrisation with honest skips."""

from __future__ import annotations

import shutil

import pytest

from emulator.cpu import kvm_usable


def _kvm_skip_reason() -> str | None:
    ok, reason = kvm_usable()
    return None if ok else f"/dev/kvm not usable for 64-bit guests: {reason}"


def _soft_skip_reason() -> str | None:
    try:
        import unicorn  # noqa: F401
    except ImportError:
        return "unicorn not installed (extra 'emulator')"
    return None


def cpu_params() -> list:
    kvm_reason = _kvm_skip_reason()
    soft_reason = _soft_skip_reason()
    return [
        pytest.param(
            "soft",
            marks=[pytest.mark.skipif(soft_reason is not None, reason=soft_reason or "")],
        ),
        pytest.param(
            "kvm",
            marks=[
                pytest.mark.kvm,
                pytest.mark.skipif(kvm_reason is not None, reason=kvm_reason or ""),
            ],
        ),
    ]


@pytest.fixture(params=cpu_params())
def cpu(request) -> str:
    return request.param


@pytest.fixture
def need_gcc() -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: guest programs cannot be built")


@pytest.fixture
def need_kvm() -> None:
    reason = _kvm_skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def need_soft() -> None:
    reason = _soft_skip_reason()
    if reason is not None:
        pytest.skip(reason)
