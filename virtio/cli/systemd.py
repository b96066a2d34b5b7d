"""systemd integration without libsystemd: socket activation and readiness.

* Socket activation (``sd_listen_fds(3)``): systemd passes listening sockets from
  fd 3 on and says how many in ``LISTEN_FDS``, for the process ``LISTEN_PID``.
  ``listen_fds()`` returns them (and unsets the variables, so children do not
  inherit them), so ``virtio serve blk`` needs neither ``--socket-path`` nor
  ``--fd`` under a ``.socket`` unit.
* Readiness (``sd_notify(3)``, ``Type=notify``): ``notify("READY=1")`` sends one
  datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace)
  once the back-end listens.  Without ``NOTIFY_SOCKET`` it does nothing.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def listen_fds(*, unset: bool = True) -> list[int]:
    """The fds systemd passed to this process (empty when not socket-activated)."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"STOPPING=1"``) to the service manager;
    returns whether there was one to tell."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), address)
    return True
