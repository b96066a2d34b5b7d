"""The guest-driver developer's toolkit: ``virtio run-driver`` (issue 12 §1-§5).

* ``abi``: the parameter block a guest program reads (``guest-drivers/include/pyvirtio.h``);
* ``devices``: the device table (``--device``: blk, net, input, rng), one entry per device type;
* ``netdev`` / ``inputdev``: what run-driver adds to virtio-net (a wire with an echo peer,
  link state, frame faults, strict header checks) and virtio-input (a typist, strict
  status checks);
* ``timing``: device timing models (``--timing``): when completions reach the used ring;
* ``inject``: fault injection (``--inject``);
* ``trace``: the trace (``--trace``): line format, Chrome/Perfetto JSON, annotated replay;
* ``session``: :func:`run_driver`, which puts them together on an emulator ``Machine``.

See docs/driver-toolkit.md.
"""

from __future__ import annotations

from emulator.drvkit.session import DriverRun, RunDriverError, run_driver

__all__ = ["DriverRun", "RunDriverError", "run_driver"]
