"""The native (cffi) core of the virtqueue engine and guest memory barriers.

``ffi`` and ``lib`` come from the compiled ``_vm_native_<hash>`` module, built on
first import when missing or out of date (the system C compiler is needed once).
"""

from __future__ import annotations

import importlib
import os
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()


def _load():
    from virtio.native import build

    name = f"virtio.native.{build.module_name()}"
    try:
        return importlib.import_module(name)
    except ImportError:
        pass

    with _lock:
        here = Path(__file__).resolve().parent
        if os.access(here, os.W_OK):
            build.build(here)
            importlib.invalidate_caches()
            return importlib.import_module(name)
        # Read-only install: build into a private directory and load from there.
        out = Path(tempfile.mkdtemp(prefix="pyvirtio-native-"))
        build.build(out)
        __path__.append(str(out))
        importlib.invalidate_caches()
        return importlib.import_module(name)


_mod = _load()
ffi = _mod.ffi
lib = _mod.lib

__all__ = ["ffi", "lib"]
