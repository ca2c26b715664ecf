"""The trust bundle: every principal's public keys (with their history), signed by the operator;
a newer bundle is accepted only if the current one's operator signed it."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mesh_contracts.base import APPROVER
from mesh_identity.errors import IdentityError
from mesh_identity.keys import (
    CLOCK_LEEWAY_S,
    OPERATOR_ROLES,
    Key,
    Principal,
    _load_public,
    body_digest,
    public_pem,
)  # fmt: skip

if TYPE_CHECKING:
    from mesh_identity.tokens import Signer


class TrustBundle:
    """Public keys of every principal, with their role and tenant, and each tenant's auditor
    sealing key (X25519: what is sealed to it only the tenant's auditor can open). ``revision``
    grows with every change an operator publishes (rotation, revocation)."""

    def __init__(
        self, principals: dict[str, Principal], auditors: dict[str, bytes] | None = None, revision: int = 0
    ) -> None:
        self.principals = principals
        self.auditors = auditors or {}
        self.revision = revision

    def approvers(self, tenant: str) -> list[Principal]:
        """The people named to decide ``tenant``'s held tool calls (``approver.<tenant>.<person>``),
        by name. While there is one, they alone decide the tenant's calls: the console's own
        ``approver``, bound to no tenant, may not."""
        return sorted(
            (p for p in self.principals.values() if p.role == APPROVER and p.tenant == tenant), key=lambda p: p.name
        )

    def may_decide(self, name: str, tenant: str) -> str | None:
        """Why ``name`` may not decide for ``tenant`` (a held call, a draft plan) under this bundle,
        or None. A tenant that names approvers has them alone: the console's own ``approver``
        (bound to no tenant) may not decide for it; with none named, the console decides."""
        now = self.principals.get(name)
        if now is None or now.role != APPROVER:
            return f"{name} is no longer an approver (trust bundle revision {self.revision})"
        if now.tenant is None:
            named = [p.name for p in self.approvers(tenant)]
            if named:
                who = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
                return f"tenant {tenant!r} names its own approvers ({who}): {name} may not decide its calls"
        elif now.tenant != tenant:
            return f"{name} may speak only for tenant {now.tenant!r}, not {tenant!r}"
        return None

    @classmethod
    def from_json(cls, data: str | bytes) -> TrustBundle:
        raw = json.loads(data)
        out = {}
        for name, entry in raw["principals"].items():
            key = _load_public(name, entry["public_key"])
            keys = tuple(Key(_load_public(name, k["public_key"]), k.get("retired_at")) for k in entry.get("keys") or ())
            out[name] = Principal(name, entry["role"], entry.get("tenant"), key, keys)
        auditors = {}
        for tenant, b64 in (raw.get("auditors") or {}).items():
            key_bytes = base64.b64decode(b64)
            if len(key_bytes) != 32:
                raise IdentityError(f"trust bundle: auditor key of {tenant} is not a 32-byte X25519 key")
            auditors[tenant] = key_bytes
        return cls(out, auditors, int(raw.get("revision", 0)))

    @classmethod
    def from_file(cls, path: str | Path) -> TrustBundle:
        return cls.from_json(Path(path).read_bytes())

    @staticmethod
    def to_json(
        entries: dict[str, tuple[str, str | None, Ed25519PublicKey]], auditors: dict[str, bytes] | None = None
    ) -> str:
        """Serialise ``name -> (role, tenant, public key)`` and ``tenant -> auditor X25519 public key``."""
        principals = {name: Principal(name, role, tenant, pub) for name, (role, tenant, pub) in entries.items()}
        return TrustBundle(principals, auditors).dump()

    def dump(self) -> str:
        def entry(p: Principal) -> dict[str, Any]:
            out: dict[str, Any] = {"role": p.role, "tenant": p.tenant, "public_key": public_pem(p.public_key)}
            if p.keys:
                out["keys"] = [{"public_key": public_pem(k.public_key), "retired_at": k.retired_at} for k in p.keys]
            return out

        return json.dumps(
            {
                "version": 1,
                "revision": self.revision,
                "principals": {name: entry(p) for name, p in sorted(self.principals.items())},
                "auditors": {t: base64.b64encode(k).decode() for t, k in sorted(self.auditors.items())},
            },
            indent=2,
        )

    def signed(self, operator: Signer) -> bytes:
        """This bundle as an operator publishes it (the ``trust`` bucket): the bundle and a token
        over its digest and revision, signed by an operator."""
        body = self.dump().encode()
        return json.dumps({"bundle": body.decode(), "token": operator.statement("trust-bundle", {
            "dig": body_digest(body), "rev": self.revision})}).encode()  # fmt: skip

    def accept(self, document: bytes, leeway_s: float = CLOCK_LEEWAY_S) -> TrustBundle:
        """The bundle in ``document`` if one of *this* bundle's operators signed it (with a key
        still active) and it is newer than this one; ``IdentityError`` otherwise. Trust is a
        chain: each published bundle is vouched for by the one before it."""
        try:
            doc = json.loads(document)
            body, token = doc["bundle"].encode(), doc["token"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IdentityError(f"trust bundle document unreadable: {exc}") from None
        from mesh_identity.tokens import Verifier  # the bundle is read with the verifier it makes

        principal, claims = Verifier(self, leeway_s)._decode(token, ["iss", "typ", "dig", "rev", "iat"], "bundle token")
        if principal.role not in OPERATOR_ROLES:
            raise IdentityError(f"{principal.name} may not publish trust bundles (operators only)")
        if claims["typ"] != "trust-bundle" or claims["dig"] != body_digest(body):
            raise IdentityError("bundle token does not cover this bundle")
        new = TrustBundle.from_json(body)
        if new.revision != claims["rev"] or new.revision <= self.revision:
            raise IdentityError(f"trust bundle revision {new.revision} is not newer than {self.revision}")
        return new
