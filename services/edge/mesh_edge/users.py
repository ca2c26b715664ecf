"""Who is calling: the person's JWT from the organisation's identity provider, verified, and the
tenant it names mapped to a tenant identity the edge holds."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from mesh_contracts.base import ID_PATTERN
from mesh_edge.errors import EdgeError
from mesh_edge.settings import EdgeSettings

ALGORITHMS = ["EdDSA", "ES256", "RS256", "PS256"]
"""Asymmetric only: a shared secret (HS256) would let whoever holds it mint any user."""
TENANT = re.compile(ID_PATTERN)
PEM = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


class Unauthorized(EdgeError):
    """No valid user token: HTTP 401, with why in one line."""


class Forbidden(EdgeError):
    """A valid user the edge will not speak for: HTTP 403."""


@dataclass(frozen=True)
class User:
    subject: str
    tenant: str
    expires: float


def _keys_of(path: Path) -> list[Any]:
    raw = path.read_bytes()
    if raw.lstrip().startswith(b"{"):
        return [k.key for k in jwt.PyJWKSet.from_dict(json.loads(raw)).keys]
    keys = [load_pem_public_key(block) for block in PEM.findall(raw)]
    if not keys:
        raise ValueError(f"{path}: no public key (a PEM file or a JWKS JSON file)")
    return keys


class Users:
    """Verifies user tokens: signature (the provider's keys), ``exp``, ``aud``, ``iss`` and the
    tenant claim."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self._keys = _keys_of(settings.issuer_keys_file) if settings.issuer_keys_file else []
        self._jwks = jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300) if settings.jwks_url else None
        if not self._keys and self._jwks is None:
            raise ValueError(
                "the edge trusts no identity provider: set MESH_EDGE_ISSUER_KEYS_FILE or MESH_EDGE_JWKS_URL"
            )

    def _candidates(self, token: str) -> list[Any]:
        if self._jwks is None:
            return self._keys
        try:
            return [self._jwks.get_signing_key_from_jwt(token).key]
        except jwt.PyJWKClientError as exc:
            raise Unauthorized(f"the token's key is not the identity provider's: {exc}") from None

    def verify(self, authorization: str | None) -> User:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("sign in: an Authorization: Bearer <token> header is required")
        last: Exception | None = None
        for key in self._candidates(token.strip()):
            try:
                claims = jwt.decode(
                    token.strip(), key, algorithms=ALGORITHMS, audience=self.settings.audience,
                    issuer=self.settings.issuer or None, leeway=self.settings.leeway_s, options={"require": ["exp", "sub"]},
                )  # fmt: skip
                break
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError, TypeError) as exc:
                last = exc  # another of the provider's keys (or a key of another kind than the token's)
            except jwt.PyJWTError as exc:
                raise Unauthorized(f"invalid token: {exc}") from None
        else:
            raise Unauthorized(f"invalid token: {last or 'no key'}")
        tenant = claims.get(self.settings.tenant_claim)
        if not isinstance(tenant, str) or not TENANT.match(tenant):
            raise Forbidden(f"the token names no tenant (claim {self.settings.tenant_claim!r})")
        return User(str(claims["sub"]), tenant, float(claims["exp"]))
