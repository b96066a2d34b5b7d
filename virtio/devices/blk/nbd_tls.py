"""TLS for the NBD client (``nbds://``, ``nbds+unix://``): X.509 certificates named
as libnbd's URIs name them, and a trio stream over the TLS socket the handshake made.

``?tls-certificates=DIR``: ``DIR/ca-cert.pem`` (the CA the server's certificate must
chain to), ``DIR/client-cert.pem`` + ``DIR/client-key.pem`` (optional: our
certificate, for servers that verify their peers).  Without the parameter, libnbd's
default directories ``$HOME/.pki/libnbd`` then ``/etc/pki/libnbd``, else the
system's CAs.  The server is verified by default (its chain; over TCP also its
name: the URI's host, or ``tls-hostname=``); ``tls-verify-peer=false`` skips it.
PSK (``tls-psk-file``) is refused: Python's ``ssl`` has no TLS-PSK here.

Two implementations of the client side, with the same checks: Python's ``ssl``
for ``NbdBackend``'s own connection (trio tasks, ``SslSocketStream``), and GnuTLS
in native code (``virtio/native/nbd_tls.c``, ``NativeTls``) for the connections
the native data plane takes over, whose records its thread sends and receives.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from virtio.devices.blk.nbd_errors import NbdTlsError

TRUE = ("1", "true", "on", "yes")
FALSE = ("0", "false", "off", "no")
QUERY_KEYS = {"socket", "tls-certificates", "tls-verify-peer", "tls-hostname"}


def _default_dirs() -> list[Path]:
    home = os.environ.get("HOME")
    return [*([Path(home) / ".pki" / "libnbd"] if home else []), Path("/etc/pki/libnbd")]


@dataclass(frozen=True)
class TlsConfig:
    certificates: str | None = None
    verify_peer: bool = True
    hostname: str | None = None
    """The name the server's certificate must carry (None: chain only)."""

    @classmethod
    def from_query(cls, uri: str, query: Mapping[str, list[str]], host: str | None) -> TlsConfig:
        """From an ``nbds://`` / ``nbds+unix://`` URI's query (``host``: TCP's host)."""
        if "tls-psk-file" in query:
            raise NbdTlsError(f"{uri}: TLS-PSK (tls-psk-file) is not supported, only X.509")
        unknown = sorted(set(query) - QUERY_KEYS)
        if unknown:
            raise NbdTlsError(f"{uri}: unknown URI parameter(s) {', '.join(unknown)}")
        verify = query.get("tls-verify-peer", ["true"])[-1].lower()
        if verify not in TRUE + FALSE:
            raise NbdTlsError(f"{uri}: tls-verify-peer={verify!r} is not a boolean")
        certs = query.get("tls-certificates", [None])[-1]
        return cls(certs, verify in TRUE, query.get("tls-hostname", [host])[-1])

    def files(self) -> tuple[Path | None, Path | None, Path | None]:
        """The CA file, client certificate and key to use (None: none; no CA file
        with ``verify_peer``: the system's CAs); raises ``NbdTlsError`` for
        unusable directories (the files' content is checked where they are loaded)."""
        if self.certificates is not None:
            where: Path | None = Path(self.certificates)
            if not where.is_dir():
                raise NbdTlsError(f"tls-certificates={self.certificates}: not a directory")
        else:
            where = next((d for d in _default_dirs() if d.is_dir()), None)
        if where is None:
            return None, None, None
        ca = where / "ca-cert.pem"
        if not ca.exists() and self.verify_peer and self.certificates is not None:
            raise NbdTlsError(f"{where}/ca-cert.pem is missing")
        cert, key = where / "client-cert.pem", where / "client-key.pem"
        if cert.exists() != key.exists():
            raise NbdTlsError(f"{where}: client-cert.pem and client-key.pem go together")
        return (
            ca if ca.exists() else None,
            cert if cert.exists() else None,
            key if key.exists() else None,
        )

    def context(self) -> ssl.SSLContext:
        """The client context; raises ``NbdTlsError`` for unusable files."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ca, cert, key = self.files()
        try:
            if ca is not None:
                ctx.load_verify_locations(cafile=str(ca))
            elif self.verify_peer:
                ctx.load_default_certs()
            if cert is not None and key is not None:
                ctx.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            where = next((p.parent for p in (ca, cert) if p is not None), None)
            raise NbdTlsError(f"TLS certificates in {where}: {exc}") from exc
        if not self.verify_peer:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.check_hostname = self.hostname is not None
        return ctx

    def native(self, sock: socket.socket, server: str, timeout: float) -> NativeTls:
        """The TLS handshake in native code (GnuTLS, ``virtio/native/nbd_tls.c``) on
        ``sock`` after NBD_OPT_STARTTLS, with the checks ``context()`` makes; for a
        connection the native data plane takes over."""
        from virtio.native import ffi, lib

        ca, cert, key = self.files()
        sock.settimeout(None)  # GnuTLS wants a blocking socket; the kernel times out
        tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        err = ffi.new("char[]", 512)
        handle = lib.nbd_tls_client(
            sock.fileno(),
            *(str(p).encode() if p else ffi.NULL for p in (ca, cert, key)),
            self.hostname.encode() if self.hostname else ffi.NULL,
            int(self.verify_peer),
            int(timeout * 1000),
            err,
            len(err),
        )
        if handle == ffi.NULL:
            why = ffi.string(err).decode(errors="replace").strip()
            if why.startswith("certificate did not verify"):
                raise NbdTlsError(f"{server}: its {why}")
            raise NbdTlsError(f"{server}: {why}")
        return NativeTls(sock, handle, server)

    def wrap(self, sock: socket.socket, server: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
        """The TLS handshake on the blocking ``sock`` (after NBD_OPT_STARTTLS) with
        ``ctx`` (from ``context()``, made before connecting: bad files fail early)."""
        try:
            return ctx.wrap_socket(sock, server_hostname=self.hostname)
        except ssl.SSLCertVerificationError as exc:
            msg = f"{server}: its certificate did not verify: {exc.verify_message}"
            raise NbdTlsError(msg) from exc
        except (ssl.SSLError, ConnectionError) as exc:
            raise NbdTlsError(f"{server}: TLS handshake failed: {exc}") from exc


class SslSocketStream:
    """The part of trio's ``Stream`` that ``nbd._Connection`` uses, over a
    non-blocking ``ssl.SSLSocket`` whose TLS handshake the blocking NBD handshake
    already did (trio's ``SSLStream`` cannot adopt an established session)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        sock.setblocking(False)
        self.socket = sock

    async def _wait(self, exc: ssl.SSLError) -> None:
        try:
            if isinstance(exc, ssl.SSLWantWriteError):
                await trio.lowlevel.wait_writable(self.socket)
            else:
                await trio.lowlevel.wait_readable(self.socket)
        except trio.BusyResourceError:  # a send that needs to read while a task receives
            await trio.lowlevel.checkpoint()  # (TLS renegotiation only): retry after it

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        await trio.lowlevel.checkpoint_if_cancelled()
        while len(view):
            try:
                n = self.socket.send(view)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                await self._wait(exc)
                continue
            except (OSError, ssl.SSLError) as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            view = view[n:]

    async def receive_some(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                return self.socket.recv(max_bytes)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                await self._wait(exc)
            except (OSError, ssl.SSLError) as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        self.socket.close()
        await trio.lowlevel.checkpoint()


def native_tls_available() -> bool:
    """Whether the native module was built with GnuTLS (``build.py``)."""
    from virtio.native import lib

    return bool(lib.nbd_tls_available())


class NativeTls:
    """A GnuTLS session (``nbd_tls.c``) on a blocking socket: ``sendall`` / ``recv``
    for the rest of the NBD handshake, then ``detach`` hands socket and session to
    the native data plane."""

    def __init__(self, sock: socket.socket, handle: Any, server: str) -> None:
        self.sock: socket.socket | None = sock
        self.handle = handle
        self.server = server

    def _io(self, fn: Any, buf: Any, n: int) -> int:
        from virtio.native import ffi

        if self.sock is None:
            raise NbdTlsError(f"{self.server}: TLS session closed")
        err = ffi.new("char[]", 256)
        got = fn(self.handle, buf, n, err, len(err))
        if got < 0:
            raise NbdTlsError(f"{self.server}: {ffi.string(err).decode(errors='replace')}")
        return int(got)

    def sendall(self, data: bytes) -> None:
        from virtio.native import ffi, lib

        view = memoryview(data)
        while len(view):
            n = self._io(lib.nbd_tls_send, ffi.from_buffer(view), len(view))
            view = view[n:]

    def recv(self, n: int) -> bytes:
        from virtio.native import ffi, lib

        buf = bytearray(n)
        got = self._io(lib.nbd_tls_recv, ffi.from_buffer(buf), n)
        return bytes(buf[:got])

    def detach(self) -> tuple[int, Any]:
        """The non-blocking socket's fd and the session, now the caller's to free."""
        assert self.sock is not None, "detached or closed"
        self.sock.setblocking(False)
        fd, handle = self.sock.detach(), self.handle
        self.sock = self.handle = None
        return fd, handle

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # (interpreter shutdown)
            self.close()  # a connection a cancelled reconnect dropped

    def close(self) -> None:
        from virtio.native import lib

        if self.sock is not None:
            lib.nbd_tls_free(self.handle)
            self.sock.close()
            self.sock = self.handle = None
