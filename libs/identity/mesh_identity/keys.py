"""Keys, principals and digests: what an identity is made of (``mesh_identity.tokens`` signs and
verifies with them, ``mesh_identity.bundle`` lists who holds which)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesh_contracts import facts as mesh_facts
from mesh_contracts.base import CLIENT
from mesh_identity.errors import IdentityError

ALGORITHM = "EdDSA"
DEFAULT_TTL_S = 300.0
CLOCK_LEEWAY_S = 5.0
MAX_TOKEN_LIFETIME_S = 540.0
"""The longest validity a token may claim (``exp - iat``). It stays under the streams' 10-minute
deduplication window (less clock leeway): a captured message re-published under its own id
inside its token's lifetime is dropped by the server, and under any other id it fails the
token's binding to its message id, so no token can be replayed into a second effect."""
OPERATOR_ROLES = ("admin",)
"""Roles whose signed statements may re-drive a dead letter (``meshctl dlq retry``)."""
REDRIVE_TTL_S = 300.0


@dataclass(frozen=True)
class Key:
    """One signing key of a principal. A retired key (rotated out) still verifies messages the
    broker stored before it was retired (a backlog, a dead letter re-driven later), never after."""

    public_key: Ed25519PublicKey
    retired_at: float | None = None


@dataclass(frozen=True)
class Principal:
    """An entry of the trust bundle: who a key belongs to."""

    name: str  # e.g. "worker", "client.acme", "approver", "approver.acme.alice"
    role: str  # a service name, "client" or "approver"
    tenant: str | None  # set for tenant clients and a tenant's approvers: they speak only for that tenant
    public_key: Ed25519PublicKey
    """The newest key (what the principal signs with once a rotation has finished)."""
    keys: tuple[Key, ...] = ()
    """Every key that verifies, active and retired (empty: ``public_key`` alone)."""

    def keys_at(self, at: float, leeway_s: float = CLOCK_LEEWAY_S) -> list[Ed25519PublicKey]:
        """The keys that verify a message stored at ``at``."""
        keys = self.keys or (Key(self.public_key),)
        return [k.public_key for k in keys if k.retired_at is None or at <= k.retired_at + leeway_s]

    def active(self) -> list[Ed25519PublicKey]:
        return [k.public_key for k in (self.keys or (Key(self.public_key),)) if k.retired_at is None]


def principal_name(role: str, tenant: str | None = None) -> str:
    return f"{role}.{tenant}" if role == CLIENT and tenant else role


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


facts_digest = mesh_facts.digest_of
"""What a token's ``fct`` claim says of the ``Mesh-Facts`` header it covers."""


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path}: not an Ed25519 private key")
    return key


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _load_public(name: str, pem: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"trust bundle: {name} does not hold an Ed25519 key")
    return key
