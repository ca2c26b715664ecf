"""The tenant registry as a service judges it (issue 47): a record is believed only if an operator
signed it, a replayed older record does not undo a newer one, and the bundle's readers see a
registered tenant's client, auditor and data key through it."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from nacl.public import PrivateKey

from mesh_contracts.v1 import TaskSubmitted
from mesh_contracts.v1.tenants import TenantIdentity, TenantRecord
from mesh_identity import IdentityError, Signer, TrustBundle, Verifier, new_signing_key, public_pem
from mesh_identity.datakeys import Keyring, new_data_key, wrap
from mesh_identity.registry import Directory, Layered, accepted_record, signed_record

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def world():
    """A bundle with an operator (admin) and a service, and a tenant ``newco`` added at runtime."""
    admin, planner, client = new_signing_key(), new_signing_key(), new_signing_key()
    bundle = TrustBundle.from_json(TrustBundle.to_json({
        "admin": ("admin", None, admin.public_key()), "planner": ("planner", None, planner.public_key()),
    }))  # fmt: skip
    kek, data_key = new_data_key(), new_data_key()
    auditor = PrivateKey.generate()
    ident = TenantIdentity(
        client_key=public_pem(client.public_key()),
        auditor_key=base64.b64encode(bytes(auditor.public_key)).decode(),
        data_key=wrap(kek, "newco", data_key),
    )
    return {"bundle": bundle, "admin": Signer("admin", admin), "planner": Signer("planner", planner),
            "client": Signer("client.newco", client), "ident": ident, "kek": kek, "data_key": data_key,
            "auditor": bytes(auditor.public_key)}  # fmt: skip


def _record(w, **kw):
    return TenantRecord(tenant="newco", identity=w["ident"], **kw)


def test_a_record_the_operator_signed_is_believed(world):
    data = signed_record(_record(world, admission={"max_in_flight": 3}), world["admin"])
    entry = accepted_record(world["bundle"], data, "newco", 5.0)
    assert entry.record.status == "active" and entry.record.admission == {"max_in_flight": 3}
    assert entry.client is not None and entry.client.name == "client.newco" and entry.client.tenant == "newco"
    assert entry.auditor == world["auditor"]


def test_a_record_signed_by_a_service_or_by_nobody_is_refused(world):
    with pytest.raises(IdentityError, match="may not sign"):
        accepted_record(world["bundle"], signed_record(_record(world), world["planner"]), "newco", 5.0)
    with pytest.raises(IdentityError, match="not signed"):
        accepted_record(world["bundle"], _record(world).to_bytes(), "newco", 5.0)
    forger = Signer("admin", new_signing_key())  # the operator's name, another key
    with pytest.raises(IdentityError, match="signature invalid"):
        accepted_record(world["bundle"], signed_record(_record(world), forger), "newco", 5.0)


def test_an_altered_or_moved_record_is_refused(world):
    data = json.loads(signed_record(_record(world), world["admin"]))
    data["status"] = "suspended"  # changed after signing
    with pytest.raises(IdentityError, match="does not cover"):
        accepted_record(world["bundle"], json.dumps(data).encode(), "newco", 5.0)
    other = signed_record(TenantRecord(tenant="globex", identity=world["ident"]), world["admin"])
    with pytest.raises(IdentityError, match="globex"):
        accepted_record(world["bundle"], other, "newco", 5.0)  # another tenant's record under this key
    with pytest.raises(IdentityError, match="unreadable"):
        accepted_record(world["bundle"], b"{not json", "newco", 5.0)


def test_an_older_record_does_not_undo_a_newer_one(world):
    d = Directory(lambda: world["bundle"], 5.0)
    active = signed_record(_record(world), world["admin"], now=1000.0)
    suspended = signed_record(_record(world, status="suspended"), world["admin"], now=2000.0)
    assert d.put("newco", suspended).record.status == "suspended"
    assert d.put("newco", active).record.status == "suspended"  # the replay is refused
    assert d.refused == 1 and d.status("newco") == "suspended"
    assert d.status("never-met") == "active"  # no record: nothing to hold it to


def test_the_bundle_falls_back_to_the_registered_tenants(world):
    bundle = TrustBundle.from_json(world["bundle"].dump())
    verifier = Verifier(bundle)
    d = verifier.tenants  # every verifier has one, its bundle's lookups falling back to it
    assert bundle.directory is d
    m = TaskSubmitted(tenant="newco", task_id="t1", goal="hello")
    token = world["client"].token(tenant="newco", msg_type=m.type, body=m.to_bytes())
    with pytest.raises(IdentityError, match="unknown principal"):
        verifier.verify(token, m.to_bytes(), m)
    d.put("newco", signed_record(_record(world), world["admin"]))
    assert verifier.verify(token, m.to_bytes(), m).name == "client.newco"
    assert bundle.auditors.get("newco") == world["auditor"] and "newco" in bundle.data_keys
    ring = Keyring(world["kek"], lambda: bundle.data_keys)
    assert ring.open("newco", b"aad", ring.seal("newco", b"aad", b"secret")) == b"secret"
    assert "newco" not in bundle.dump()  # a dump is the bundle's own: the registry is not copied into it
    d.drop("newco")
    with pytest.raises(IdentityError):
        verifier.verify(token, m.to_bytes(), m)
    assert ring.key("newco") is None


def test_know_reads_a_tenant_once_and_reattaches_a_replaced_bundle(world):
    verifier = Verifier(TrustBundle.from_json(world["bundle"].dump()))
    reads: list[str] = []

    async def reader(tenant: str) -> None:
        reads.append(tenant)
        verifier.tenants.put(tenant, signed_record(_record(world), world["admin"]))

    async def main() -> None:
        verifier.tenants.reader = reader
        verifier.bundle = TrustBundle.from_json(world["bundle"].dump())  # replaced, not attached
        await verifier.tenants.know("newco")
        await verifier.tenants.know("newco")  # held: not read again
        await verifier.tenants.know("")  # no tenant: nothing to read

    asyncio.run(main())
    assert reads == ["newco"] and verifier.bundle.directory is verifier.tenants
    assert verifier.bundle.principals.get("client.newco") is not None


def test_a_tenant_found_missing_is_not_read_again_at_once():
    d = Directory(lambda: TrustBundle({}), 5.0)
    assert d.should_read("ghost")
    d.not_registered("ghost")
    assert not d.should_read("ghost")
    for i in range(5000):  # a flood of made-up names is remembered up to a bound
        d.not_registered(f"x{i}")
    assert len(d.absent) == 4096 and d.should_read("ghost")


def test_layered_lookups_fall_back_but_iteration_is_the_bundles_own():
    layered = Layered({"a": 1}, lambda k: 2 if k == "b" else None)
    assert layered.get("a") == 1 and layered["b"] == 2 and "b" in layered and "c" not in layered
    assert layered.get("c", "none") == "none" and list(layered) == ["a"]
    with pytest.raises(KeyError):
        layered["c"]
