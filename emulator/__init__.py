"""Small KVM / unicorn VMM for counting vmexits of emulated vs paravirtual I/O.

Entry points (imported lazily, so ``import emulator`` needs neither /dev/kvm nor
unicorn): :class:`emulator.machine.Machine` and :func:`emulator.run.run_workload`.
See ``emulator/README.md`` for the design and the measured figures.
"""

from __future__ import annotations

__all__ = ["Machine", "run_workload"]


def __getattr__(name: str):
    if name == "Machine":
        from emulator.machine import Machine

        return Machine
    if name == "run_workload":
        from emulator.run import run_workload

        return run_workload
    raise AttributeError(name)
