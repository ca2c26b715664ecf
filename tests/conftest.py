"""Shared test helpers. Real infrastructure fixtures come from the mesh_testing plugin."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_contracts import CLIENT, SERVICES
from mesh_kit.identity import Signer, TrustBundle, Verifier, new_signing_key


@dataclass
class Keys:
    """An in-memory trust bundle: every service, one client per tenant, and the approver."""

    private: dict[str, Ed25519PrivateKey]
    bundle: TrustBundle

    def signer(self, principal: str) -> Signer:
        return Signer(principal, self.private[principal])

    def verifier(self) -> Verifier:
        return Verifier(self.bundle)


@pytest.fixture(scope="session")
def keys() -> Keys:
    principals = {s: (s, None) for s in SERVICES}
    principals |= {f"{CLIENT}.{t}": (CLIENT, t) for t in ("acme", "globex")}
    principals["approver"] = ("approver", None)
    private = {name: new_signing_key() for name in principals}
    entries = {name: (role, tenant, private[name].public_key()) for name, (role, tenant) in principals.items()}
    return Keys(private, TrustBundle.from_json(TrustBundle.to_json(entries)))
