"""Live migration of a :class:`~virtio.testing.qemu.QemuGuest` to another QEMU (QMP).

::

    dst = QemuGuest(image, devices=[...], qmp=True, incoming="unix:/tmp/x/mig.sock")
    info = await migrate(src, dst, "unix:/tmp/x/mig.sock")   # query-migrate's answer
    dst.take_over_console(src)
    print(info["downtime"], info["total-time"])            # milliseconds
"""

from __future__ import annotations

from typing import Any

import trio

from virtio.testing.qemu import QemuError, QemuGuest

__all__ = ["MigrationFailed", "migrate"]


class MigrationFailed(QemuError):
    """QEMU reported the migration failed (``.info`` is its query-migrate answer)."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        super().__init__(f"migration {info.get('status')}: {info.get('error-desc', info)}")


async def migrate(
    src: QemuGuest, dst: QemuGuest, uri: str, *, timeout: float = 120.0, poll: float = 0.05
) -> dict[str, Any]:
    """Migrate ``src``'s guest to ``dst`` (started with ``incoming=uri``) and wait until
    the destination runs it.  Returns the source's final ``query-migrate`` answer
    (``downtime``, ``total-time``, ``setup-time`` in ms, ``ram`` statistics)."""
    if src.qmp is None or dst.qmp is None:
        raise QemuError("migration needs QemuGuest(..., qmp=True) on both sides")
    await src.qmp.execute("migrate", {"uri": uri})
    with trio.fail_after(timeout):
        while True:
            info = await src.qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise MigrationFailed(info)
            await trio.sleep(poll)
        while not (await dst.qmp.execute("query-status")).get("running"):
            await trio.sleep(poll)
    return info
