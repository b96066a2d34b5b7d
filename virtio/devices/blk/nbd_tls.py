"""TLS for the NBD client (``nbds://``, ``nbds+unix://``): X.509 certificates named
as libnbd's URIs name them, and a trio stream over the TLS socket the handshake made.

``?tls-certificates=DIR``: ``DIR/ca-cert.pem`` (the CA the server's certificate must
chain to), ``DIR/client-cert.pem`` + ``DIR/client-key.pem`` (optional: our
certificate, for servers that verify their peers).  Without the parameter, libnbd's
default directories ``$HOME/.pki/libnbd`` then ``/etc/pki/libnbd``, else the
system's CAs.  The server is verified by default (its chain; over TCP also its
name: the URI's host, or ``tls-hostname=``); ``tls-verify-peer=false`` skips it.
PSK (``tls-psk-file``) is refused: Python's ``ssl`` has no TLS-PSK here.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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

    def context(self) -> ssl.SSLContext:
        """The client context; raises ``NbdTlsError`` for unusable files."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certificates is not None:
            where: Path | None = Path(self.certificates)
            if not where.is_dir():
                raise NbdTlsError(f"tls-certificates={self.certificates}: not a directory")
        else:
            where = next((d for d in _default_dirs() if d.is_dir()), None)
        try:
            if where is not None and (where / "ca-cert.pem").exists():
                ctx.load_verify_locations(cafile=str(where / "ca-cert.pem"))
            elif self.verify_peer:
                if self.certificates is not None:
                    raise NbdTlsError(f"{where}/ca-cert.pem is missing")
                ctx.load_default_certs()
            if where is not None:
                cert, key = where / "client-cert.pem", where / "client-key.pem"
                if cert.exists() != key.exists():
                    raise NbdTlsError(f"{where}: client-cert.pem and client-key.pem go together")
                if cert.exists():
                    ctx.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise NbdTlsError(f"TLS certificates in {where}: {exc}") from exc
        if not self.verify_peer:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.check_hostname = self.hostname is not None
        return ctx

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
