"""The NBD client's errors (``nbd.py``, ``nbd_tls.py``): each a ``BackendIOError``,
so the guest sees VIRTIO_BLK_S_IOERR for a request that meets one."""

from __future__ import annotations

from virtio.errors import BackendIOError


class NbdError(BackendIOError):
    """The NBD server refused something, broke the protocol, or went away."""


class NbdClosedError(NbdError):
    """The server closed the connection during the handshake."""


class NbdReplyError(NbdError):
    """A well-framed reply whose content breaks the protocol (e.g. a block status
    chunk for another metadata context, a zero-length extent, extents beyond the
    request): the request fails, the connection stays."""


class NbdTlsError(NbdError):
    """TLS with the NBD server failed: the server refused it, or requires it and the
    URI did not ask for it (``nbd://`` rather than ``nbds://``), its certificate did
    not verify, or our certificate files are unusable."""
