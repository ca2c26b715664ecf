"""Who sent a message, provably: Ed25519 keys, EdDSA identity tokens bound to a message's body and
id, and the operator-signed trust bundle they are judged by. The bus runtime (``mesh_kit``)
signs and verifies every message with it; clients and the CLI sign with it, without the runtime."""

from mesh_identity.bundle import TrustBundle
from mesh_identity.errors import IdentityError, UnknownKey
from mesh_identity.keys import (
    ALGORITHM,
    CLOCK_LEEWAY_S,
    DEFAULT_TTL_S,
    MAX_TOKEN_LIFETIME_S,
    OPERATOR_ROLES,
    REDRIVE_TTL_S,
    Key,
    Principal,
    body_digest,
    facts_digest,
    load_private_key,
    new_signing_key,
    principal_name,
    private_pem,
    public_pem,
)  # fmt: skip
from mesh_identity.tokens import VERIFIED_KEPT, Redrive, Signer, Verifier, accepted_bundle, signed_bundle

__all__ = [
    "ALGORITHM",
    "CLOCK_LEEWAY_S",
    "DEFAULT_TTL_S",
    "MAX_TOKEN_LIFETIME_S",
    "OPERATOR_ROLES",
    "REDRIVE_TTL_S",
    "VERIFIED_KEPT",
    "IdentityError",
    "Key",
    "Principal",
    "Redrive",
    "Signer",
    "TrustBundle",
    "UnknownKey",
    "Verifier",
    "accepted_bundle",
    "body_digest",
    "facts_digest",
    "load_private_key",
    "new_signing_key",
    "principal_name",
    "private_pem",
    "public_pem",
    "signed_bundle",
]  # fmt: skip
