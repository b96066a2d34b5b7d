"""The native NBD data plane over TLS (``nbds://``): GnuTLS in native code
(``virtio/native/nbd_tls.c``) against ``nbdkit --tls=require`` and ``qemu-nbd``
with a ``tls-creds-x509`` object (which verifies our client certificate).

IN / OUT / FLUSH (virtio 1.4 §5.2.6) must go out from the queue's thread (its
counters), the data must be on the server (read back by Python's ``ssl`` client:
the two TLS implementations agree), the GnuTLS handshake must make the checks the
Python one makes, and a reconnect after a server restart must redo STARTTLS and
the TLS handshake and be native again."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket

import pytest
import trio
from test_blk_dataplane import FLUSH, IN, IOERR, OK, OUT, Rig, hdr
from test_nbd_client import MiB, nbd_server
from test_nbd_dataplane import read_export, serve_nbd
from test_nbd_tls import nbds, other_pki, pki, tls_server  # noqa: F401 (fixtures)

from virtio.devices.blk import BlkOptions, VirtioBlk
from virtio.devices.blk.nbd import NbdAddress, NbdTlsError, negotiate
from virtio.devices.blk.nbd_tls import NativeTls, TlsConfig, native_tls_available
from virtio.spec.status import DeviceStatus
from virtio.testing.nbd_pki import OPENSSL, tls_server_args
from virtio.testing.vhost_user_frontend import serve_device
from virtio.transport.vhost_user.messages import U64, VringState
from virtio.transport.vhost_user.messages import FrontendRequest as R

NEEDS_RESET = DeviceStatus.DEVICE_NEEDS_RESET

pytestmark = [
    pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed"),
    pytest.mark.skipif(not native_tls_available(), reason="built without GnuTLS"),
]


@pytest.mark.parametrize(
    ("kind", "tcp"), [("nbdkit", False), ("nbdkit", True), ("qemu-nbd", True)],
    ids=["nbdkit", "nbdkit-tcp", "qemu-nbd-tcp"],
)  # fmt: skip
async def test_requests_over_tls_are_served_natively(tmp_path, pki, kind, tcp):  # noqa: F811
    with tls_server(kind, tmp_path, pki, tcp=tcp) as server:
        uri = nbds(server.uri, **{"tls-certificates": str(pki)})
        rig = Rig(tmp_path, image=uri)
        size = 8 * MiB
        model = bytearray(size)
        rng = random.Random(kind)
        try:
            assert rig.device.backend.tls
            async with trio.open_nursery() as nursery:
                plane = await serve_nbd(rig, nursery)
                for _round in range(4):
                    tokens = []  # requests in flight, disjoint ranges, some > a TLS record
                    for i in range(16):
                        sector = i * 1024 + rng.randrange(0, 32)
                        n = rng.randrange(1, 160) * 512
                        if rng.random() < 0.5:
                            data = rng.randbytes(n)
                            model[sector * 512 : sector * 512 + n] = data
                            tokens.append((rig.submit([hdr(OUT, sector), data], [1]), None))
                        else:
                            want = bytes(model[sector * 512 : sector * 512 + n])
                            tokens.append((rig.submit([hdr(IN, sector)], [n, 1]), want))
                    for t, want in tokens:
                        used = await rig.wait(t)
                        assert used.data[-1] == OK
                        if want is not None:
                            assert used.data[:-1] == want
                    assert (await rig.request([hdr(FLUSH)], [1])).data == bytes([OK])
                stats = plane.statistics()
                assert stats["reads"] + stats["writes"] == 4 * 16
                assert stats["flushes"] == 4 and stats["deferred"] == 0
                assert stats["conn_failed"] == 0 and stats["bytes_out"] > 0
                nursery.cancel_scope.cancel()
            assert await read_export(uri, size) == model  # through Python's ssl
        finally:
            rig.close()


async def test_tls_server_killed_then_native_again(tmp_path, pki):  # noqa: F811
    delayed = (*tls_server_args("nbdkit", pki), "--filter=delay", "memory", "size=1M",
               "delay-read=30")  # fmt: skip
    restarted = (*tls_server_args("nbdkit", pki), "memory", "size=1M")
    with nbd_server("nbdkit", tmp_path, args=delayed) as server, contextlib.ExitStack() as later:
        uri = nbds(server.uri, **{"tls-certificates": str(pki)})
        rig = Rig(tmp_path, image=uri)
        async with trio.open_nursery() as nursery:
            plane = await serve_nbd(rig, nursery)
            tokens = [rig.submit([hdr(IN, 8 * i)], [4096, 1]) for i in range(4)]
            with trio.fail_after(20):  # until the reads are on the wire
                while plane.statistics()["async_started"] < 4:
                    await trio.sleep(0.01)
            server.proc.kill()
            for t in tokens:
                assert (await rig.wait(t)).data[-1] == IOERR
            assert plane.statistics()["conn_failed"] == 1
            again = later.enter_context(nbd_server("nbdkit", tmp_path, args=restarted))
            assert again.uri == server.uri
            data = os.urandom(4096)
            assert (await rig.request([hdr(OUT, 8), data], [1])).data == bytes([OK])
            with trio.fail_after(20):  # a new STARTTLS + TLS connection for the thread
                while plane.c.new_fd < 0 and not plane.statistics()["reconnects"]:
                    await trio.sleep(0.01)
            reads = plane.statistics()["reads"]
            used = await rig.request([hdr(IN, 8)], [4096, 1])
            assert used.data == data + bytes([OK])
            stats = plane.statistics()
            assert stats["reconnects"] == 1 and stats["reads"] == reads + 1
            nursery.cancel_scope.cancel()
        rig.close()  # before the new server stops: it waits for its clients


def _native_handshake(uri: str) -> None:
    address = NbdAddress.parse(uri)
    sock = address.connect(5)
    try:
        conn, _info = negotiate(sock, address.export, address.tls, "srv", native_timeout=5)
        assert isinstance(conn, NativeTls)
        conn.close()
    finally:
        sock.close()


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd"])
def test_gnutls_makes_the_checks_python_makes(tmp_path, pki, other_pki, kind):  # noqa: F811
    with tls_server(kind, tmp_path, pki, tcp=True) as server:
        _native_handshake(nbds(server.uri, **{"tls-certificates": str(pki)}))
        with pytest.raises(NbdTlsError, match=r"its certificate did not verify: .*issuer"):
            _native_handshake(nbds(server.uri, **{"tls-certificates": str(other_pki)}))
        with pytest.raises(
            NbdTlsError, match=r"did not verify: .*name in the certificate does not match"
        ):
            _native_handshake(nbds(server.uri, **{"tls-certificates": str(pki),
                                                  "tls-hostname": "elsewhere.test"}))  # fmt: skip
        cas = tmp_path / "ca-only"
        cas.mkdir()
        shutil.copy(pki / "ca-cert.pem", cas)
        uri = nbds(server.uri, **{"tls-certificates": str(cas)})
        if kind == "nbdkit":  # does not check clients; unverified goes through
            _native_handshake(uri)
            other = nbds(server.uri, **{"tls-certificates": str(other_pki)})
            _native_handshake(other + "&tls-verify-peer=false")
        else:  # qemu-nbd wants our certificate
            with pytest.raises(NbdTlsError, match="did the server refuse our certificate"):
                _native_handshake(uri)


def test_unusable_files_fail_in_gnutls_too(tmp_path, pki):  # noqa: F811
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "ca-cert.pem").write_text("not a certificate\n")
    a, b = socket.socketpair()
    with a, b, pytest.raises(NbdTlsError, match=r"ca-cert\.pem"):
        TlsConfig(str(junk)).native(a, "srv", 1.0)


@pytest.mark.parametrize("first_read", [True, False], ids=["used-then-broken", "broken-at-once"])
async def test_a_ring_reset_after_a_driver_error_is_served_natively_again(
    tmp_path,
    pki,  # noqa: F811
    first_read,
):
    """QEMU's order after a ring broke (NEEDS_RESET): the OS's driver resets the
    device (SET_STATUS 0, GET_VRING_BASE) and sets the ring up again; the device
    serves it, natively over TLS, with a connection of its own again."""
    with tls_server("nbdkit", tmp_path, pki) as server:
        uri = nbds(server.uri, **{"tls-certificates": str(pki)})
        dev = VirtioBlk.from_options(BlkOptions(path=uri, serial="again"))
        try:
            async with serve_device(dev, 2 * MiB) as (_server, fe, ram):

                async def read_sector(vq) -> None:
                    vq.driver.add([hdr(IN, 0)], [512 + 1])
                    vq.publish_and_kick()
                    (used,) = await vq.wait_used()
                    assert used.data == bytes(512) + bytes([OK])

                async def new_inflight_area() -> None:  # QEMU: at each start
                    fd, size = await fe.get_inflight_fd(1, 16)
                    try:
                        await fe.set_inflight_fd(fd, size, 1, 16)
                    finally:
                        os.close(fd)

                await new_inflight_area()
                vq = await fe.setup_vring(0, ram, size=16, data_size=64 * 1024)
                if first_read:
                    await read_sector(vq)
                vq.driver.set_avail_idx(vq.driver._avail_idx + 100)  # a driver error
                while not await fe.get_u64(R.GET_STATUS) & NEEDS_RESET:
                    vq.kick()
                    await trio.sleep(0.01)
                assert vq.error_signalled()
                await fe.request(R.SET_STATUS, U64(0), need_reply=True)
                await fe.request(R.SET_VRING_ENABLE, VringState(0, 0), need_reply=True)
                await fe.get_vring_base(0)
                await new_inflight_area()
                vq = await fe.setup_vring(0, ram, size=16, offset=MiB, data_size=64 * 1024)
                await fe.request(R.SET_STATUS, U64(15), need_reply=True)
                for _ in range(3):
                    await read_sector(vq)
                (plane,) = dev.dataplanes  # the ring's new one, on its own connection
                assert plane.statistics()["reads"] == 3
                assert not await fe.get_u64(R.GET_STATUS) & NEEDS_RESET
        finally:
            dev.close()
