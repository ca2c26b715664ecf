"""TLS for the NATS client and cluster ports of a local mesh: a private CA and a server
certificate for the loopback names, minted by ``meshctl init`` (Kubernetes uses cert-manager).

Layout under the mesh home::

    secrets/tls/ca.key      the CA's private key (0600; only init and a re-issue need it)
    tls/ca.pem              the CA certificate: what every client trusts (MESH_TLS_CA_FILE)
    nats/tls/server.pem     the servers' certificate (127.0.0.1, ::1, localhost), for clients and routes
    nats/tls/server.key     its key (0600), beside the server config so a container mounting the
                            config's directory finds it at the same path
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 397
SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def mint(
    ca_key_path: Path,
    ca_cert_path: Path,
    server_cert_path: Path,
    server_key_path: Path,
    write_secret: Callable[[Path, bytes], None],
) -> None:
    """Create the CA (once) and a server certificate signed by it (when missing or expiring
    within 30 days). ``write_secret`` writes a 0600 file."""
    now = dt.datetime.now(dt.UTC)
    if ca_key_path.exists() and ca_cert_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AgentMesh local CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        write_secret(ca_key_path, _pem_key(ca_key))
        ca_cert_path.parent.mkdir(parents=True, exist_ok=True)
        ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        server_cert_path.unlink(missing_ok=True)  # a new CA: the old server certificate is worthless
    if server_cert_path.exists() and server_key_path.exists():
        current = x509.load_pem_x509_certificate(server_cert_path.read_bytes())
        if current.not_valid_after_utc - now > dt.timedelta(days=30):
            return
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in SERVER_NAMES] + [x509.IPAddress(ipaddress.ip_address(i)) for i in SERVER_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentmesh-nats")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    server_cert_path.parent.mkdir(parents=True, exist_ok=True)
    write_secret(server_key_path, _pem_key(key))
    server_cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
