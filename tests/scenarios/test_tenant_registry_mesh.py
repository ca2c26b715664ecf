"""Tenants as a runtime resource, through the real mesh (issue 47).

A running mesh (one tenant minted with it) is given a tenant it has never heard of; the new
tenant's first task completes with no restart anywhere; suspending it refuses its new work at the
door while the other tenant is untouched; its own admission limit applies live; resuming takes
work again; every change is a verified link of its audit chain; a record an operator did not sign
is believed by no service, whoever wrote it; and removing the tenant erases it and shuts its
client out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from mesh_contracts.v1 import TaskCompleted, TaskRejected
from mesh_contracts.v1.tenants import TenantRecord
from mesh_identity import Signer
from mesh_identity.registry import signed_record
from mesh_testing.chaos import ChaosMesh, started
from mesh_testing.infra import Infra, running_infra
from meshctl.cli import main as cli_main
from meshctl.identity import Identities
from meshctl.registry import Minter

pytestmark = pytest.mark.chaos
ENV = {"MESH_LOG_LEVEL": "WARNING", "MESH_RAG_SEED_TENANTS": ""}


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme"], name="registry") as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


def ctl(infra: Infra, *args: str) -> int:
    return cli_main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])


def submit(infra: Infra, tenant: str, goal: str, task_id: str):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with infra.client(tenant) as c:
            return await c.submit(goal, task_id=task_id, timeout=90)

    return asyncio.run(main()).outcome


def pids(mesh: ChaosMesh) -> dict[str, int]:
    return {name: proc.pid for name, (_, proc) in mesh.procs.items()}


def test_a_tenant_added_to_a_running_mesh_works_at_once_and_can_be_suspended(infra, mesh, capsys):
    before = pids(mesh)
    assert ctl(infra, "tenant", "add", "newco", "--limit", "max_in_flight=4") == 0
    out = submit(infra, "newco", "What is 17 * 23?", "reg-1")
    assert isinstance(out, TaskCompleted), out
    assert "391" in out.answer

    assert ctl(infra, "tenant", "suspend", "newco") == 0
    refused = submit(infra, "newco", "What is 2 + 2?", "reg-2")
    assert isinstance(refused, TaskRejected) and refused.code == "suspended", refused
    assert refused.retry_after_s is None, "waiting does not help: an operator resumes it"
    assert isinstance(submit(infra, "acme", "What is 3 + 4?", "reg-3"), TaskCompleted), "the other tenant is untouched"

    assert ctl(infra, "tenant", "resume", "newco") == 0
    assert isinstance(submit(infra, "newco", "What is 5 + 6?", "reg-4"), TaskCompleted)
    assert pids(mesh) == before, "nothing restarted"

    capsys.readouterr()
    assert ctl(infra, "tenant", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["newco"]["status"] == "active" and listed["newco"]["admission"] == {"max_in_flight": 4.0}
    assert listed["acme"].get("minted_with_mesh") is True

    assert ctl(infra, "history", "reg-1", "--tenant", "newco", "--json") == 0
    story = json.loads(capsys.readouterr().out)["messages"]
    assert story and not [m for m in story if m["sender"].startswith("?")], "every message verified, its own too"
    assert any(m["type"] == "task.submitted" and m["sender"] == "client.newco" for m in story)

    assert ctl(infra, "audit", "verify", "--tenant", "newco", "--json") == 0
    chain = capsys.readouterr().out
    for kind in ("tenant.added", "tenant.suspended", "tenant.resumed"):
        assert kind in chain, f"{kind} is not on newco's audit chain"


def test_the_tenants_own_admission_limit_is_applied_live(infra, mesh):
    assert ctl(infra, "tenant", "add", "slowco") == 0
    assert isinstance(submit(infra, "slowco", "What is 1 + 1?", "lim-1"), TaskCompleted)
    assert ctl(infra, "tenant", "limits", "slowco", "rate_per_s=0.001", "burst=1") == 0
    outcomes = [submit(infra, "slowco", f"What is {i} + 1?", f"lim-{i}") for i in (2, 3)]
    codes = [getattr(o, "code", "completed") for o in outcomes]
    assert "rate_limited" in codes, f"a burst of 1 at one task per 1000 s admits one task at most: {codes}"
    assert ctl(infra, "tenant", "limits", "slowco", "rate_per_s=default", "burst=default") == 0
    assert isinstance(submit(infra, "slowco", "What is 9 + 1?", "lim-9"), TaskCompleted), "back to the defaults"

    # Its tenant-day spend ceiling (the budget service, at the next reservation).
    assert ctl(infra, "tenant", "limits", "slowco", "daily_cost_usd=0.0000001") == 0
    out = submit(infra, "slowco", "What is 8 + 1?", "lim-10")
    assert not isinstance(out, TaskCompleted) and "ceiling" in (out.reason or "").lower(), out
    assert ctl(infra, "tenant", "limits", "slowco", "daily_cost_usd=default") == 0

    # Its quota in the TASK stream (every door keeper, at the next charge): it holds more than one.
    assert ctl(infra, "tenant", "limits", "slowco", "quota.TASK.msgs=1") == 0
    out = submit(infra, "slowco", "What is 7 + 1?", "lim-11")
    assert isinstance(out, TaskRejected) and out.code == "quota_exceeded", out
    assert ctl(infra, "tenant", "limits", "slowco", "quota.TASK.msgs=default") == 0
    assert isinstance(submit(infra, "slowco", "What is 6 + 1?", "lim-12"), TaskCompleted)


def test_a_bad_limit_is_one_line(infra, mesh, capsys):
    with pytest.raises(SystemExit):
        ctl(infra, "tenant", "limits", "slowco", "quota.NOPE.mib=3")
    assert "want NAME=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ctl(infra, "tenant", "limits", "slowco", "burst=lots")
    assert "is not a number" in capsys.readouterr().err
    assert ctl(infra, "tenant", "suspend", "nobody-here") == 2
    assert "unknown tenant 'nobody-here'" in capsys.readouterr().err


def test_a_record_no_operator_signed_is_believed_by_no_service(infra, mesh):
    """Whoever can write the registry bucket still cannot add a tenant: the record must carry an
    operator's signature (here it is signed with the planner's key, and written as the admin)."""
    ids = Identities(infra.home)
    ident = Minter(ids).mint("evil")  # real credentials: the broker lets the client in
    planner = Signer.from_file("planner", ids.signing_key("planner"))
    body = signed_record(TenantRecord(tenant="evil", identity=ident), planner)

    async def write() -> None:
        nc = await infra.admin()
        try:
            kv = await nc.jetstream().key_value("tenants")
            await kv.put("evil", body)
        finally:
            await nc.close()

    asyncio.run(write())
    out = submit(infra, "evil", "What is 1 + 1?", "evil-1")
    assert isinstance(out, TaskRejected), out
    assert "unknown principal" in out.reason or "data key" in out.reason, out.reason


def test_an_erased_tenant_added_at_runtime_goes_on_with_a_new_data_key(infra, mesh, capsys):
    """Erasure is of a tenant's data, not of its access: as for a tenant minted with the mesh."""
    assert ctl(infra, "tenant", "add", "eraseco") == 0
    assert isinstance(submit(infra, "eraseco", "What is 3 * 14?", "era-1"), TaskCompleted)
    ids = Identities(infra.home)
    old_key = ids.tenant_data_key("eraseco").read_text()

    def wrapped() -> list[str]:
        held = asyncio.run(infra.stored("KV_tenants", "$KV.tenants.eraseco"))
        return [TenantRecord.model_validate_json(m.data).identity.data_key for m in held if m.data]  # type: ignore[union-attr]

    before = wrapped()
    capsys.readouterr()
    assert ctl(infra, "tenant", "erase", "eraseco", "--confirm", "eraseco") == 0
    assert "data key destroyed (a new one took its place)" in capsys.readouterr().out
    assert ids.tenant_data_key("eraseco").read_text() != old_key and not ids.auditor_key("eraseco").exists()
    assert isinstance(submit(infra, "eraseco", "What is 4 * 14?", "era-2"), TaskCompleted), "it goes on"
    after = wrapped()
    assert len(after) == 1 and after[0] not in before, "only the re-keyed record is kept: no revision holds the old key"


def test_a_removed_tenant_is_erased_and_shut_out(infra, mesh, capsys):
    assert ctl(infra, "tenant", "add", "goneco") == 0
    assert isinstance(submit(infra, "goneco", "What is 2 * 21?", "gone-1"), TaskCompleted)
    ids = Identities(infra.home)
    user = ids.user_of("client.goneco").public_key.decode()
    capsys.readouterr()
    assert ctl(infra, "tenant", "remove", "goneco", "--confirm", "goneco") == 0
    said = capsys.readouterr().out
    assert "erased goneco" in said and "removed tenant goneco" in said
    assert not ids.creds("client.goneco").exists() and not ids.tenant_data_key("goneco").exists()
    assert not ids.signing_key("client.goneco").exists(), "its signing key is destroyed"
    assert user in ids.revocations(), "its NATS user is revoked in the account the server configs carry"

    kept = [m.data for m in asyncio.run(infra.stored("KV_tenants", "$KV.tenants.goneco")) if m.data]
    assert kept == [], "no revision of its record (each held its wrapped data key) is kept"
    assert ctl(infra, "tenant", "list", "--json") == 0
    assert "goneco" not in json.loads(capsys.readouterr().out)
    assert ctl(infra, "tenant", "remove", "acme", "--confirm", "acme") == 2
    assert "was not added at runtime" in capsys.readouterr().err, "a bundle tenant is erased, not removed"
