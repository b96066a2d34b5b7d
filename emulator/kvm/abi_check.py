"""Check :mod:`emulator.kvm.abi` against the installed ``<linux/kvm.h>`` with a cffi build.

Every ``KVM_*`` integer in ``abi`` is compared with the header's macro of the same
name (so ioctl numbers are the header's ``_IO``/``_IOR``/``_IOW``/``_IOWR``
expansions), and every :class:`~emulator.kvm.abi.CStruct` with the compiler's
``offsetof`` of each field and ``sizeof`` of the struct (or union member)::

    python -m emulator.kvm.abi_check      # exit status 1 and a list on any mismatch

A C compiler and the kernel's uapi headers (Debian: ``linux-libc-dev``) are needed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import tempfile

from emulator.kvm import abi

__all__ = ["Check", "checks", "header_values", "layout_checks", "mismatches"]


@dataclasses.dataclass(frozen=True)
class Check:
    """``c_expr`` evaluated by the compiler must equal ``ours`` (``at_least``: be >=)."""

    what: str
    c_expr: str
    ours: int
    at_least: bool = False


def layout_checks(name: str, layout: abi.CStruct) -> list[Check]:
    t = layout.c_type
    prefix = f"{layout.member}." if layout.member else ""
    out = []
    for field, rel in layout.fields.items():
        out.append(
            Check(f"{name}: offsetof({t}, {prefix}{field})", f"offsetof({t}, {prefix}{field})",
                  layout.offset + rel)
        )  # fmt: skip
    size_expr = f"sizeof((({t} *)0)->{layout.member})" if layout.member else f"sizeof({t})"
    if layout.member:
        out.append(Check(f"{name}: offsetof({t}, {layout.member})",
                         f"offsetof({t}, {layout.member})", layout.offset))  # fmt: skip
    out.append(Check(f"{name}: {size_expr}", size_expr, layout.size, at_least=not layout.whole))
    return out


def checks() -> list[Check]:
    """Everything in :mod:`emulator.kvm.abi` that the header defines too."""
    out = [
        Check(name, name, value)
        for name, value in vars(abi).items()
        if name.startswith("KVM") and isinstance(value, int)
    ]
    for name, value in vars(abi).items():
        if isinstance(value, abi.CStruct):
            out.extend(layout_checks(name, value))
    sregs = "struct kvm_sregs"
    for i, seg in enumerate(abi.SEGMENT_NAMES):
        out.append(Check(f"kvm_sregs.{seg}", f"offsetof({sregs}, {seg})", i * abi.SEGMENT.size))
    segments = len(abi.SEGMENT_NAMES) * abi.SEGMENT.size
    for i, table in enumerate(abi.DTABLE_NAMES):
        out.append(
            Check(f"kvm_sregs.{table}", f"offsetof({sregs}, {table})",
                  segments + i * abi.DTABLE.size)
        )  # fmt: skip
    out.append(Check("SREGS_SIZE", f"sizeof({sregs})", abi.SREGS_SIZE))
    out.append(
        Check("SREGS_INTERRUPT_BITMAP_SIZE", f"sizeof((({sregs} *)0)->interrupt_bitmap)",
              abi.SREGS_INTERRUPT_BITMAP_SIZE)
    )  # fmt: skip
    return out


def header_values(exprs: list[str]) -> list[int]:
    """The values of C integer expressions over ``<linux/kvm.h>`` (a cffi module built
    in a temporary directory; CompileError-like exceptions if the header lacks a name)."""
    from cffi import FFI

    ffi = FFI()
    ffi.cdef("void pv_kvm_values(long long *out);")
    body = "\n".join(f"    out[{i}] = (long long)({e});" for i, e in enumerate(exprs))
    ffi.set_source(
        "_pyvirtio_kvm_abi_check",
        "#include <stddef.h>\n#include <linux/kvm.h>\n"
        f"static void pv_kvm_values(long long *out)\n{{\n{body}\n}}\n",
    )
    with tempfile.TemporaryDirectory(prefix="pyvirtio-kvm-abi-") as tmp:
        path = ffi.compile(tmpdir=tmp, verbose=False)
        spec = importlib.util.spec_from_file_location("_pyvirtio_kvm_abi_check", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    out = module.ffi.new("long long[]", max(1, len(exprs)))
    module.lib.pv_kvm_values(out)
    return list(out)[: len(exprs)]


def mismatches(items: list[Check] | None = None) -> list[str]:
    """One line per check the header disagrees with (empty: all agree)."""
    items = checks() if items is None else items
    values = header_values([c.c_expr for c in items])
    bad = []
    for check, value in zip(items, values, strict=True):
        ok = value >= check.ours if check.at_least else value == check.ours
        if not ok:
            relation = ">=" if check.at_least else "=="
            bad.append(f"{check.what}: header {value:#x}, ours {check.ours:#x} ({relation})")
    return bad


def main() -> int:
    bad = mismatches()
    for line in bad:
        print(line, file=sys.stderr)
    print(f"{len(checks())} checks against <linux/kvm.h>: {len(bad)} mismatch(es)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
