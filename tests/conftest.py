"""Shared test helpers. Real infrastructure fixtures come from the mesh_testing plugin.

A test that fails on a running mesh prints the tail of every service log with it: a chaos or
scenario failure is only useful with the services' own account of it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_contracts import CLIENT, SERVICES
from mesh_identity import Signer, TrustBundle, Verifier, new_signing_key


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
    principals["approver.acme.alice"] = ("approver", "acme")  # a person who approves for acme
    private = {name: new_signing_key() for name in principals}
    entries = {name: (role, tenant, private[name].public_key()) for name, (role, tenant) in principals.items()}
    return Keys(private, TrustBundle.from_json(TrustBundle.to_json(entries)))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(autouse=True)
def logs_on_failure(request):
    """A chaos failure is only useful with the services' own account of it."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is None or not rep.failed:
        return
    for name in ("infra", "cluster"):
        if name in request.fixturenames:
            home = request.getfixturevalue(name).home
            for log in sorted((home / "logs").glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"\n--- {log.name} (last {len(tail)} lines)\n" + "\n".join(line[:240] for line in tail))
