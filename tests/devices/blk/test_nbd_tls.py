"""NBD over TLS (``nbds://``, ``nbds+unix://``, NBD_OPT_STARTTLS) against real
servers: ``nbdkit --tls=require`` and ``qemu-nbd`` with a ``tls-creds-x509`` server
object (which verifies our client certificate too), with X.509 certificates the
test makes with the ``openssl`` CLI, laid out as libnbd's ``tls-certificates=DIR``
names them."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import trio
from test_nbd_client import MiB, nbd_server

from virtio.devices.blk.nbd import NbdAddress, NbdBackend, NbdError, NbdTlsError
from virtio.testing.nbd_pki import OPENSSL, make_pki, tls_server_args

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki") / "good")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki") / "other")


def tls_server(kind: str, tmp: Path, pki: Path, *, tcp: bool = False):
    if kind == "nbdkit":
        return nbd_server(
            "nbdkit", tmp, tcp=tcp, args=(*tls_server_args(kind, pki), "memory", "size=8M")
        )
    return nbd_server("qemu-nbd", tmp, tcp=tcp, qemu_args=tuple(tls_server_args(kind, pki)))


def nbds(uri: str, **params: str) -> str:
    """The TLS form of a test server's ``nbd://`` / ``nbd+unix://`` URI."""
    uri = uri.replace("nbd://", "nbds://", 1).replace("nbd+unix://", "nbds+unix://", 1)
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return uri + ("&" if "?" in uri else "?") + query if query else uri


def test_tls_uris_as_libnbd_writes_them():
    a = NbdAddress.parse("nbds://example.org:10900/e?tls-certificates=/c&tls-verify-peer=false")
    assert a.tls is not None and (a.host, a.port, a.export) == ("example.org", 10900, "e")
    assert (a.tls.certificates, a.tls.verify_peer, a.tls.hostname) == ("/c", False, "example.org")
    u = NbdAddress.parse("nbds+unix://alice@/x?socket=/s.sock&tls-hostname=srv")
    assert u.tls is not None and (u.socket_path, u.tls.verify_peer, u.tls.hostname) == (
        "/s.sock",
        True,
        "srv",
    )
    assert NbdAddress.parse("nbds+unix:///?socket=/s").tls.hostname is None  # chain only
    assert NbdAddress.parse("nbd://h/e").tls is None
    for bad, why in [
        ("nbds://h/e?tls-psk-file=/k", "TLS-PSK"),
        ("nbds://h/e?tls-verify-peer=maybe", "not a boolean"),
        ("nbds://h/e?tls-bogus=1", "unknown URI parameter"),
        ("nbds+unix:///e", "socket=PATH"),
    ]:
        with pytest.raises(NbdError, match=why):
            NbdAddress.parse(bad)


@pytest.mark.parametrize(
    ("kind", "tcp"),
    [("nbdkit", False), ("nbdkit", True), ("qemu-nbd", False), ("qemu-nbd", True)],
    ids=["nbdkit", "nbdkit-tcp", "qemu-nbd", "qemu-nbd-tcp"],
)
async def test_read_write_flush_over_tls(tmp_path, pki, kind, tcp):
    with tls_server(kind, tmp_path, pki, tcp=tcp) as server:
        backend = NbdBackend(nbds(server.uri, **{"tls-certificates": str(pki)}))
        try:
            assert backend.tls and backend.size == 8 * MiB and backend.has_block_status
            with pytest.raises(NbdError, match="not handed to native code"):
                backend.transmission_socket()
            model = bytearray(backend.size)
            rng = random.Random(kind)

            async def worker(i: int) -> None:  # requests in flight on the TLS stream
                for _ in range(10):
                    off, n = i * MiB + rng.randrange(0, 512) * 512, rng.randrange(1, 512) * 512
                    data = rng.randbytes(n)
                    await backend.write(off, [memoryview(data)], sync=rng.random() < 0.3)
                    model[off : off + n] = data
                    got = bytearray(n)
                    await backend.read(off, [memoryview(got)])
                    assert got == model[off : off + n]

            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(worker, i)
            await backend.write_zeroes([(0, 4096)], unmap=True)
            model[:4096] = bytes(4096)
            await backend.flush()
            whole = bytearray(backend.size)
            await backend.read(0, [memoryview(whole)])
            assert whole == model
            assert backend.reconnects == 0  # the constructor's idle connection was kept
        finally:
            backend.close()
        # A new connection reads what the first one wrote and flushed.
        again = NbdBackend(nbds(server.uri, **{"tls-certificates": str(pki)}))
        try:
            got = bytearray(MiB)
            await again.read(MiB, [memoryview(got)])
            assert got == model[MiB : 2 * MiB]
        finally:
            again.close()


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd"])
def test_a_server_certificate_from_another_ca_is_refused(tmp_path, pki, other_pki, kind):
    with tls_server(kind, tmp_path, pki, tcp=True) as server:
        with pytest.raises(NbdTlsError, match="did not verify: unable to get local issuer"):
            NbdBackend(nbds(server.uri, **{"tls-certificates": str(other_pki)}))
        with pytest.raises(NbdTlsError, match="did not verify: Hostname mismatch"):
            NbdBackend(nbds(server.uri, **{"tls-certificates": str(pki),
                                           "tls-hostname": "elsewhere.test"}))  # fmt: skip
        if kind == "nbdkit":  # does not check clients: not verifying it goes through
            uri = nbds(server.uri, **{"tls-certificates": str(other_pki)})
            NbdBackend(uri + "&tls-verify-peer=false").close()


async def test_qemu_nbd_refuses_a_client_without_a_certificate(tmp_path, pki):
    cas = tmp_path / "ca-only"
    cas.mkdir()
    shutil.copy(pki / "ca-cert.pem", cas)
    refused = pytest.raises(NbdTlsError, match="did the server refuse our certificate")
    with tls_server("qemu-nbd", tmp_path, pki) as server, refused:
        NbdBackend(nbds(server.uri, **{"tls-certificates": str(cas)}))


def test_tls_refused_or_required(tmp_path, pki):
    plain = nbd_server("nbdkit", tmp_path)  # no TLS configured
    with plain as server, pytest.raises(NbdTlsError, match="does not offer TLS"):
        NbdBackend(nbds(server.uri, **{"tls-certificates": str(pki)}))
    for kind in ["nbdkit", "qemu-nbd"]:
        required = pytest.raises(NbdTlsError, match="requires TLS: use an nbds://")
        with tls_server(kind, tmp_path, pki) as server, required:
            NbdBackend(server.uri)


def test_blk_device_on_a_tls_export(tmp_path, pki):
    from virtio.devices.blk import BlkOptions, VirtioBlk

    with tls_server("nbdkit", tmp_path, pki) as server:
        uri = nbds(server.uri, **{"tls-certificates": str(pki)})
        dev = VirtioBlk.from_options(BlkOptions(path=uri))
        try:  # served, but never by the native NBD data plane (plain sockets only)
            assert dev.capacity == 8 * MiB // 512 and dev.backend.tls
        finally:
            dev.close()


async def test_tls_reconnects_after_a_server_restart(tmp_path, pki):
    with tls_server("nbdkit", tmp_path, pki) as server:
        backend = NbdBackend(nbds(server.uri, **{"tls-certificates": str(pki)}))
        await backend.write(0, [memoryview(b"a" * 4096)])
        server.proc.kill()  # (nbdkit does not end on SIGTERM while a TLS client is on)
        server.proc.wait()
        with pytest.raises(NbdError):  # the server is gone: the request fails
            await backend.read(0, [memoryview(bytearray(4096))])
        with pytest.raises(NbdError, match="cannot reconnect"):
            await backend.flush()
    with tls_server("nbdkit", tmp_path, pki) as again:  # back: a new TLS handshake
        assert again.uri == server.uri
        await backend.write(0, [memoryview(b"b" * 4096)])
        got = bytearray(4096)
        await backend.read(0, [memoryview(got)])
        assert got == b"b" * 4096 and backend.reconnects == 1
        backend.close()


def test_unusable_certificate_files_fail_before_connecting(tmp_path, pki):
    nobody = f"socket={tmp_path}/nobody.sock"  # never connected to: the files fail first
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(pki / "ca-cert.pem", half)
    shutil.copy(pki / "client-cert.pem", half)  # without its key
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "ca-cert.pem").write_text("not a certificate\n")
    for certs, why in [
        (tmp_path / "none", "not a directory"),
        (tmp_path, "ca-cert.pem is missing"),
        (half, "client-cert.pem and client-key.pem go together"),
        (junk, "TLS certificates in"),
    ]:
        with pytest.raises(NbdTlsError, match=why):
            NbdBackend(f"nbds+unix:///?{nobody}&tls-certificates={certs}")


async def test_idle_tls_connection_to_a_restarted_server_is_replaced(tmp_path, pki):
    """The connection made by the constructor waits idle for the first request; if
    the server went away meanwhile, that request opens a new one instead of failing
    (session tickets the server sent after the TLS handshake are not taken for that)."""
    with tls_server("qemu-nbd", tmp_path, pki) as server:
        backend = NbdBackend(nbds(server.uri, **{"tls-certificates": str(pki)}))
        server.proc.kill()
        server.proc.wait()
    with tls_server("qemu-nbd", tmp_path, pki) as again:
        assert again.uri == server.uri
        try:
            await backend.write(0, [memoryview(b"c" * 4096)])
            assert backend.reconnects == 1
            await backend.flush()
            assert backend.reconnects == 1  # the new TLS connection serves on
        finally:
            backend.close()


def test_session_tickets_on_an_idle_tls_socket_are_not_end_of_file(pki):
    """OpenSSL servers send TLS 1.3 session tickets after the handshake: they make
    the idle socket readable, but ``_peer_gone`` must see that no data (and no end
    of file) came -- while a real end of file is one."""
    import select
    import socket
    import ssl
    import threading

    from virtio.devices.blk.nbd import _peer_gone
    from virtio.devices.blk.nbd_tls import TlsConfig

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki / "server-cert.pem", pki / "server-key.pem")
    a, b = socket.socketpair()
    close_now = threading.Event()

    def serve() -> None:
        with server_ctx.wrap_socket(b, server_side=True):
            close_now.wait(10)  # then closed as a dying server would: no close_notify

    t = threading.Thread(target=serve)
    t.start()
    config = TlsConfig(str(pki), hostname="localhost")
    with config.context().wrap_socket(a, server_hostname="localhost") as client:
        assert client.version() == "TLSv1.3"
        poll = select.poll()
        poll.register(client, select.POLLIN)
        assert poll.poll(10_000), "no session ticket came"
        assert not _peer_gone(client)
        close_now.set()
        t.join(10)
        assert poll.poll(10_000)
        assert _peer_gone(client)
