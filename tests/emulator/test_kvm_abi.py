"""``emulator.kvm.abi`` against ``<linux/kvm.h>``: numbers and layouts from the compiler."""

from __future__ import annotations

import pytest

from emulator.kvm import abi
from emulator.kvm.abi_check import Check, checks, layout_checks, mismatches

pytestmark = pytest.mark.usefixtures("need_gcc")


def test_abi_matches_the_header_and_the_check_sees_errors():
    """One cffi build: every real check agrees, and planted errors are each reported."""
    broken_ioeventfd = abi.CStruct(  # `flags` forgotten: pad and size shift
        "struct kvm_ioeventfd",
        [("datamatch", "Q"), ("addr", "Q"), ("len", "I"), ("fd", "i"), ("pad", "36x")],
    )
    planted = [
        Check("planted KVM_RUN", "KVM_RUN", abi.KVM_RUN + 1),
        Check("planted KVM_GET_REGS", "KVM_GET_REGS", abi.KVM_GET_REGS ^ (1 << 16)),
        *layout_checks("planted IOEVENTFD", broken_ioeventfd),
    ]
    bad = mismatches([*checks(), *planted])
    assert bad == [
        f"planted KVM_RUN: header {abi.KVM_RUN:#x}, ours {abi.KVM_RUN + 1:#x} (==)",
        f"planted KVM_GET_REGS: header {abi.KVM_GET_REGS:#x},"
        f" ours {abi.KVM_GET_REGS ^ (1 << 16):#x} (==)",
        "planted IOEVENTFD: offsetof(struct kvm_ioeventfd, pad): header 0x1c, ours 0x18 (==)",
        "planted IOEVENTFD: sizeof(struct kvm_ioeventfd): header 0x40, ours 0x3c (==)",
    ]


def test_everything_declared_is_checked():
    what = {c.c_expr for c in checks()}
    ioctls = [n for n, v in vars(abi).items() if n.startswith("KVM_") and isinstance(v, int)]
    assert {"KVM_RUN", "KVM_GET_SREGS", "KVM_IOEVENTFD", "KVM_SET_CPUID2"} <= set(ioctls)
    assert set(ioctls) <= what
    layouts = [v for v in vars(abi).values() if isinstance(v, abi.CStruct)]
    assert len(layouts) >= 15
    for layout in layouts:
        for field in layout.fields:
            member = f"{layout.member}." if layout.member else ""
            assert f"offsetof({layout.c_type}, {member}{field})" in what
    assert "offsetof(struct kvm_run, io)" in what and "sizeof(struct kvm_sregs)" in what
