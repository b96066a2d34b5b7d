"""Save a running VM to a file and restore it in another process (issue 12 §7).

A snapshot holds the guest RAM, the vCPU state (portable between the KVM and the soft
CPU: general registers, RIP, RFLAGS, IDTR/GDTR; segments and control registers are the
flat long mode every machine sets up, and are checked), the machine's interrupt lines,
exit counters, MSI messages not yet taken and measurement marks, every device's state
(the virtio-mmio transport's registers; for virtio-pci the host bridge's CONFIG_ADDRESS,
each function's Command, BARs and Interrupt Line, the BAR allocator, and the transport's
common configuration, ISR status, MSI-X vectors, table and pending bits; each
virtqueue's ``QueueState``; the device's own state such as blk's disk contents), and a
*recipe*: plain data saying how to build the same machine again (for
workloads, the ``run_workload`` arguments).  Restoring builds the machine from the
recipe, then overwrites RAM and state, and the guest carries on from the instruction
after the saved exit.

When: ``Machine.pause_at_exit(N)`` stops after the first PIO/MMIO write exit numbered N
or later.  Exit numbers are the same on both CPU backends, so a snapshot taken at exit N
on KVM and one taken at N on the soft CPU are the same guest state; a snapshot saved on
one backend restores on the other.  In the synchronous virtio-mmio mode a device has
settled by the end of every exit, so no request is half done inside the device at a
save point; requests the driver has made available but not notified yet are in RAM and
are served after the restore like any other.

File format (all integers little-endian)::

    magic   8 bytes  b"PYVSNAP\\0"
    version u32      FORMAT_VERSION
    hdrlen  u32      length of the JSON header
    header  JSON     {"recipe", "machine", "ram_size", "blobs": [sizes...]}
    blobs   zlib     one zlib stream per blob, concatenated: blob 0 is RAM; byte strings
                     inside the machine state are blobs too, referenced as {"$blob": i}
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from emulator.machine import Machine
from virtio.errors import VirtioError

MAGIC = b"PYVSNAP\0"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sII")
_BLOB_LEN = struct.Struct("<Q")
MAX_HEADER = 16 << 20


class SnapshotError(RuntimeError):
    """A snapshot that cannot be written, read or applied; the message says why."""


@dataclasses.dataclass
class Snapshot:
    recipe: dict[str, Any]
    machine: dict[str, Any]
    ram: bytes

    @property
    def exits(self) -> int:
        """The number of exits the guest had made when it was saved."""
        return int(self.machine["stats"]["total"])


def capture(m: Machine, recipe: dict[str, Any]) -> Snapshot:
    """The snapshot of a paused (or never started) machine."""
    try:
        state = m.save_state()
    except RuntimeError as e:
        raise SnapshotError(str(e)) from e
    return Snapshot(recipe, state, bytes(m.memory.view))


def apply(m: Machine, snap: Snapshot) -> None:
    """Put ``snap`` into machine ``m`` (built from ``snap.recipe``, same RAM size)."""
    if len(snap.ram) != m.memory.size:
        raise SnapshotError(
            f"snapshot RAM is {len(snap.ram)} bytes, the machine has {m.memory.size}"
        )
    m.memory.view[:] = snap.ram
    try:
        m.load_state(snap.machine)
    except (KeyError, TypeError, ValueError, RuntimeError, VirtioError) as e:
        raise SnapshotError(f"snapshot state does not apply: {type(e).__name__}: {e}") from e


# -- file format -----------------------------------------------------------------------------


def _extract(obj: Any, blobs: list[bytes]) -> Any:
    if isinstance(obj, bytes | bytearray):
        blobs.append(bytes(obj))
        return {"$blob": len(blobs) - 1}
    if isinstance(obj, dict):
        return {k: _extract(v, blobs) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_extract(v, blobs) for v in obj]
    return obj


def _insert(obj: Any, blobs: list[bytes]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"$blob"}:
            i = obj["$blob"]
            if not isinstance(i, int) or not 0 < i < len(blobs):
                raise SnapshotError(f"bad blob reference {i!r}")
            return blobs[i]
        return {k: _insert(v, blobs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_insert(v, blobs) for v in obj]
    return obj


def write(snap: Snapshot, path: str | os.PathLike[str]) -> None:
    """Write ``snap`` to ``path`` (atomically: a temporary file renamed over it)."""
    blobs = [snap.ram]
    machine = _extract(snap.machine, blobs)
    packed = [zlib.compress(b, 1) for b in blobs]
    header = json.dumps(
        {
            "recipe": snap.recipe,
            "machine": machine,
            "ram_size": len(snap.ram),
            "blobs": [len(b) for b in blobs],
        },
        separators=(",", ":"),
    ).encode()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_HEAD.pack(MAGIC, FORMAT_VERSION, len(header)))
        f.write(header)
        for p in packed:
            f.write(_BLOB_LEN.pack(len(p)))
            f.write(p)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: str | os.PathLike[str]) -> Snapshot:
    """Read a snapshot file; SnapshotError names what is wrong with a bad one."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SnapshotError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) < _HEAD.size:
        raise SnapshotError(f"{path}: too short for a snapshot")
    magic, version, hdrlen = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"{path}: not a pyvirtio snapshot (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"{path}: snapshot format {version}, this emulator reads {FORMAT_VERSION}"
        )
    if hdrlen > MAX_HEADER or _HEAD.size + hdrlen > len(data):
        raise SnapshotError(f"{path}: header length {hdrlen} is impossible")
    try:
        header = json.loads(data[_HEAD.size : _HEAD.size + hdrlen])
        sizes = [int(n) for n in header["blobs"]]
        ram_size = int(header["ram_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{path}: malformed header: {e}") from None
    off = _HEAD.size + hdrlen
    blobs = []
    for size in sizes:
        if off + _BLOB_LEN.size > len(data):
            raise SnapshotError(f"{path}: truncated")
        (n,) = _BLOB_LEN.unpack_from(data, off)
        off += _BLOB_LEN.size
        if off + n > len(data):
            raise SnapshotError(f"{path}: truncated")
        d = zlib.decompressobj()
        try:
            blob = d.decompress(data[off : off + n], size + 1)
        except zlib.error as e:
            raise SnapshotError(f"{path}: corrupt blob: {e}") from None
        if len(blob) != size or not d.eof:
            raise SnapshotError(f"{path}: a blob is not the {size} bytes its header says")
        blobs.append(blob)
        off += n
    if not blobs or len(blobs[0]) != ram_size:
        raise SnapshotError(f"{path}: RAM blob missing or not {ram_size} bytes")
    return Snapshot(header["recipe"], _insert(header["machine"], blobs), blobs[0])
