"""Tenant quotas on a real nats-server: the DLQ's per-tenant share, and replicas sharing one book."""

from __future__ import annotations

import asyncio

from integration_helpers import connect, eventually, running, settings_for

from mesh_contracts.v1 import StepCompleted
from mesh_host import Mesh
from mesh_kit import envelope as env
from mesh_kit import telemetry as tel
from mesh_tenancy import tenancy
from mesh_tenancy.quota import Limit, Quotas
from meshctl.dlq import entries

MIB = 1 << 20


async def _dead_letters(infra, tenant: str) -> list[dict[str, str]]:
    async with connect(infra, "admin") as nc:
        return [
            dict(m.headers or {})
            async for _, m in entries(nc.jetstream())
            if (m.subject or "").startswith(f"dlq.planner.step.v1.{tenant}.")
        ]


async def test_a_tenants_dead_letters_stop_at_its_share_of_the_dlq_and_another_tenants_are_kept(
    integration_infra, unique
):
    """Every undecodable message is still terminated (none comes back); the noisy tenant's dead
    letters are kept until its DLQ quota (8 KiB at this service here) and then counted and dropped,
    while another tenant's are all kept: one tenant's failing messages cannot fill the DLQ."""
    noisy, other = unique("noisy"), unique("other")
    per_service = 8 * 1024
    settings = settings_for(
        integration_infra, "planner", quota_tenants={noisy: {"DLQ": {"mib": 6 * per_service / MIB}}}
    )
    planner = Mesh(settings)
    tenancy.install(planner)  # its dead letters charged to their tenant, as in the service

    async def never(m, d) -> None:
        raise AssertionError("an undecodable message reached the handler")

    planner.consume(StepCompleted, never)
    async with running(planner):
        async with connect(integration_infra, "worker") as nc:  # a principal that may publish step.completed
            js = nc.jetstream()
            for tenant in (noisy, other):
                for i in range(12):
                    body = b'{"type": "step.completed", "output": "' + b"x" * 2000  # cut short: not JSON
                    await js.publish(f"step.v1.{tenant}.t{i}.completed", body, headers={env.MSG_ID: f"{tenant}-{i}"})
        kept_other = await eventually(
            lambda: _all(_dead_letters(integration_infra, other), 12), what="the other tenant's 12 dead letters"
        )
        dropped = await eventually(
            lambda: planner.stats.counters[tel.M_DLQ_DROPPED] or None, what="a dead letter over the quota dropped"
        )
        await eventually(
            lambda: _settled(integration_infra, noisy, planner), what="every noisy message dead-lettered or dropped"
        )
        kept_noisy = await _dead_letters(integration_infra, noisy)
    assert len(kept_other) == 12 and all(h[env.DLQ_REASON].startswith("decode:") for h in kept_other)
    assert 1 <= len(kept_noisy) <= 4, len(kept_noisy)  # 8 KiB of ~2.6 KB dead letters
    assert len(kept_noisy) + planner.stats.counters[tel.M_DLQ_DROPPED] == 12 and dropped
    async with connect(integration_infra, "admin") as nc:
        info = await nc.jetstream().consumer_info("STEP", "planner--step-completed")
    assert info.num_ack_pending == 0, "every message was terminated, kept or not"


async def _all(letters, n: int):
    got = await letters
    return got if len(got) >= n else None


async def _settled(infra, tenant: str, planner: Mesh) -> bool:
    return len(await _dead_letters(infra, tenant)) + planner.stats.counters[tel.M_DLQ_DROPPED] >= 12


async def test_two_replicas_charging_one_tenant_at_once_never_pass_its_quota(integration_infra, unique):
    """The quota book is a compare-and-set record shared by a service's replicas: two books
    charging the same tenant concurrently accept, together, no more than its quota."""
    tenant, limit = unique("shared"), Limit(bytes=50_000)
    books = []
    for _ in range(2):
        mesh = Mesh(settings_for(integration_infra, "planner"))
        await mesh.connection.connect()
        books.append((mesh, Quotas(lambda m=mesh: m.nc, await mesh.kv("quotas"), "planner", lambda *_: limit)))
    try:
        results = await asyncio.gather(*(book.charge(tenant, "TASK", 1000) for _ in range(60) for _, book in books))
    finally:
        for mesh, _ in books:
            await mesh.connection.close()
    accepted = sum(1 for refusal, _ in results if refusal is None)
    assert accepted == 50, accepted  # exactly the quota: 50 of the 120 charges of 1,000 bytes


async def test_a_tenant_keeps_at_most_its_notes_and_another_tenant_is_untouched(integration_infra, unique):
    """KV notes holds every tenant's notes: a new note past the tenant's limit is refused with the
    reason (the agent sees a tool error), a note it already has may still be replaced, and a
    deleted one makes room."""
    import pytest

    from mesh_tool_executor.notes import KVNotes
    from mesh_tool_executor.tools import ToolError

    tenant, other = unique("notes"), unique("calm")
    async with integration_infra.connected_as("tool-executor") as mesh:
        notes = KVNotes(await mesh.kv("notes"), mesh.nc, max_per_tenant=3)
        for i in range(3):
            await notes.put(tenant, f"n{i}", "text")
        with pytest.raises(ToolError, match=f"quota: tenant {tenant} keeps 3 notes, its limit of 3"):
            await notes.put(tenant, "n3", "text")
        await notes.put(tenant, "n1", "replaced")  # not a new note
        await notes.put(other, "n0", "another tenant's room is its own")
        await notes.delete(tenant, "n0")
        await notes.put(tenant, "n3", "text")
        assert await notes.list(tenant) == ["n1", "n2", "n3"] and await notes.get(tenant, "n1") == "replaced"
