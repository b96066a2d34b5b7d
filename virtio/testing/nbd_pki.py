"""X.509 certificates for NBD-over-TLS tests, made with the ``openssl`` CLI and laid
out as nbdkit's ``--tls-certificates=DIR``, qemu's ``tls-creds-x509,dir=DIR`` and
libnbd's ``tls-certificates=DIR`` expect them: ca-cert.pem, server-cert.pem +
server-key.pem, client-cert.pem + client-key.pem."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

OPENSSL = shutil.which("openssl")


def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None, "the openssl CLI is needed"
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> Path:
    """A CA and, signed by it, a server certificate (for localhost and 127.0.0.1)
    and a client certificate (P-256 keys, valid 30 days) in the new directory ``d``."""
    d.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "30",
             "-subj", "/CN=pyvirtio test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    for who, usage in [("server", "serverAuth"), ("client", "clientAuth")]:
        _openssl("req", *ec, "-keyout", f"{who}-key.pem", "-out", f"{who}.csr",
                 "-subj", f"/CN={who}.test", cwd=d)  # fmt: skip
        (d / f"{who}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        )
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey",
                 "ca-key.pem", "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "30",
                 "-extfile", f"{who}.ext", cwd=d)  # fmt: skip
    return d


def tls_server_args(kind: str, pki: Path) -> list[str]:
    """Options making ``kind`` (``qemu-nbd`` or ``nbdkit``) require TLS with ``pki``
    (qemu-nbd's tls-creds-x509 also verifies the client's certificate)."""
    if kind == "nbdkit":
        return ["--tls=require", f"--tls-certificates={pki}"]
    creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={pki}"
    return ["--object", creds, "--tls-creds", "tls0"]
