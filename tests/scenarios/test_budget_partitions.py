"""The budget split into two partitions of the tenants (``MESH_BUDGET_PARTITIONS=2``), through the
real mesh: each replica follows only its own tenants' tasks, and together they still stop every
failure, account every call once and answer the operator as one budget.

Tenants ``acme`` and ``globex`` hash to partition 0, ``soylent`` and ``wayne`` to partition 1
(``test_the_tenants_fall_where_this_module_expects`` checks it). Replica ``budget-0`` follows
partition 0 and ``budget-1`` partition 1; a reservation reaches either of them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from mesh_budget.ledger import DayUsage, today
from mesh_budget.partition import Partition
from mesh_contracts.v1 import (
    BudgetDenied,
    BudgetReserve,
    BudgetStatusReport,
    BudgetStatusRequested,
    TaskCompleted,
    TaskFailed,
    UsageRecorded,
)
from mesh_contracts.v1.audit import MESH_WIDE
from mesh_identity import Signer, TrustBundle, Verifier
from mesh_testing.chaos import ChaosMesh, report
from mesh_testing.infra import Infra, running_infra
from meshctl.ask import AskError, ask_all, budget_status

pytestmark = pytest.mark.chaos
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
DEADLOCK = "Deadlock drill. PLAN: " + json.dumps({"steps": [
    {"step_id": "s1", "kind": "research", "tools": ["await_step"], "instruction": "#await:s2 Summarise s2"},
    {"step_id": "s2", "kind": "answer", "tools": [], "depends_on": ["s1"], "instruction": "Write the answer"},
]})  # fmt: skip
PARTS = {"acme": 0, "globex": 0, "soylent": 1, "wayne": 1}
ENV = {
    "MESH_ACK_WAIT_S": "2",
    "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]",
    "MESH_LOG_LEVEL": "WARNING",
    "MESH_TOOL_POLICY": '{"send_email": {"rate_per_min": 0}}',
    "MESH_BUDGET_PARTITIONS": "2",
    "MESH_BUDGET_PROVIDER_COOLDOWN_S": "60",
}


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(list(PARTS), name="partitions", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    m = ChaosMesh(infra, env=ENV, replicas={"budget": 0})
    m.start()
    for i in range(2):  # replaced (after a kill) with the same partition
        asyncio.run(m.add("budget", f"budget-{i}", env={"MESH_BUDGET_PARTITION": str(i)}))
    asyncio.run(m.ready())
    yield m
    asyncio.run(m.stop())


def admin_asker(infra: Infra) -> tuple[Signer, Verifier]:
    return Signer.from_file("admin", infra.ids.signing_key("admin")), Verifier(
        TrustBundle.from_file(infra.ids.trust_bundle)
    )


async def reports(infra: Infra) -> list[BudgetStatusReport]:
    """Every budget replica's own answer to ``budget.status``."""
    signer, verifier = admin_asker(infra)
    nc = await infra.admin()
    try:
        answers = await ask_all(nc, signer, verifier, BudgetStatusRequested(tenant=MESH_WIDE, task_id="status"),
                                lambda a: len(a) >= 2, timeout=3.0)  # fmt: skip
    finally:
        await nc.close()
    return [a for a in answers if isinstance(a, BudgetStatusReport)]


async def merged(infra: Infra, timeout: float = 2.0) -> BudgetStatusReport | None:
    signer, verifier = admin_asker(infra)
    nc = await infra.admin()
    try:
        return await budget_status(nc, signer, verifier, timeout=timeout)
    finally:
        await nc.close()


async def usage_count(infra: Infra, tenant: str, task: str = "*") -> int:
    return len(await infra.stored("USAGE", f"usage.*.{tenant}.{task}.*"))


def test_the_tenants_fall_where_this_module_expects():
    for tenant, part in PARTS.items():
        assert Partition(part, 2).owns(tenant) and not Partition(1 - part, 2).owns(tenant), tenant


async def test_each_partition_breaks_its_own_tenants_deadlocks_and_accounts_their_calls(infra, mesh):
    async with (
        infra.client("acme") as acme, infra.client("globex") as globex,
        infra.client("soylent") as soylent, infra.client("wayne") as wayne,
    ):  # fmt: skip
        outcomes = await asyncio.gather(
            acme.submit(DEADLOCK, task_id="dl-acme", timeout=60),
            soylent.submit(DEADLOCK, task_id="dl-soylent", timeout=60),
            globex.submit(GOAL, task_id="ok-globex", timeout=60),
            wayne.submit(GOAL, task_id="ok-wayne", timeout=60),
        )
    for seen in outcomes[:2]:
        assert isinstance(seen.outcome, TaskFailed) and "deadlock" in seen.outcome.reason, seen.outcome
        found = next(e for e in seen.events if e.stage == "budget.deadlock")
        assert found.detail["detected_after_s"] < 1.0, found.detail
    for seen in outcomes[2:]:
        assert isinstance(seen.outcome, TaskCompleted), seen.outcome

    # Each task's record holds every call the usage stream has of it, once; each tenant's day too.
    for tenant, task in (("acme", "dl-acme"), ("soylent", "dl-soylent"), ("globex", "ok-globex"),
                         ("wayne", "ok-wayne")):  # fmt: skip
        spent = await infra.spent(tenant, task, partitions=2)
        assert spent["total"]["calls"] == await usage_count(infra, tenant, task) > 0, (tenant, task)
    nc = await infra.admin()
    try:
        kv = await nc.jetstream().key_value("budget")
        for tenant in PARTS:
            day = json.loads((await kv.get(DayUsage.key(tenant, today()))).value)
            assert day["total"]["calls"] == await usage_count(infra, tenant), tenant
    finally:
        await nc.close()

    # Each replica followed only its own tenants (its monitor holds no other tenant's task), and
    # acted on its own tenant's deadlock.
    async with httpx.AsyncClient(timeout=2) as http:
        for i in range(2):
            proc = mesh.procs[f"budget-{i}"][1]
            seen = (await http.get(f"http://127.0.0.1:{proc.http_port}/status")).json()["partition"]
            assert (seen["index"], seen["count"]) == (i, 2)
            assert seen["tenants"] == sorted(t for t, p in PARTS.items() if p == i), (i, seen)
    by_part = {r.partition: r for r in await reports(infra)}
    assert set(by_part) == {0, 1} and all(r.partitions == 2 for r in by_part.values())
    for part, r in by_part.items():
        assert set(r.tenants) <= {t for t, p in PARTS.items() if p == part}, (part, r.tenants)
        assert r.trips.get("deadlock") == 1, (part, r.trips)
    together = await merged(infra)
    assert together is not None and together.partitions == 2
    assert together.trips["deadlock"] == 2, "the operator sees both partitions' trips, added up"
    report("budget partitions", deadlocks=2, detected_after_s=[
        next(e for e in s.events if e.stage == "budget.deadlock").detail["detected_after_s"] for s in outcomes[:2]
    ])  # fmt: skip


async def test_a_failing_provider_seen_in_one_partition_opens_the_circuit_in_every_replica(infra, mesh):
    """The provider breakers are mesh-wide: calls failing for acme's task (partition 0) refuse
    wayne's reservations (partition 1) whichever replica answers them."""
    await infra.running_task("flaky-acme", 100_000, tenant="acme")
    await infra.running_task("flaky-wayne", 100_000, tenant="wayne")
    async with infra.connected_as("worker") as worker:
        for i in range(6):
            await worker.publish(UsageRecorded(
                tenant="acme", task_id="flaky-acme", agent="worker", call_id=f"f{i}", provider="scripted",
                model="flaky-1", input_tokens=10, output_tokens=0, error="server_error: 503",
            ), key=f"f{i}")  # fmt: skip
        answers = []
        deadline = time.monotonic() + 10
        while len(answers) < 16 and time.monotonic() < deadline:
            ask = BudgetReserve(tenant="wayne", task_id="flaky-wayne", agent="worker", call_id=f"w{len(answers)}",
                                tokens=10, provider="scripted", model="flaky-1")  # fmt: skip
            answer = await worker.request(ask, timeout=2.0)
            if isinstance(answer, BudgetDenied) and answer.code == "provider_breaker":
                answers.append(answer)
            elif answers:
                pytest.fail(f"a replica still grants after another refused: {answer!r}")
            else:
                await asyncio.sleep(0.1)  # the failures are still reaching the replicas
    # 16 requests in a queue group of two: all on one replica has a chance of 2**-15.
    assert len(answers) == 16 and "provider scripted/flaky-1 circuit open" in answers[0].reason


async def test_a_partition_without_a_replica_is_named_and_catches_up_when_one_returns(infra, mesh):
    mesh.kill("budget-1")
    try:
        with pytest.raises(AskError, match=r"budget partition\(s\) 1 of 2 did not answer"):
            await merged(infra, timeout=1.0)
        # Reservations go on (any replica answers them): wayne's task completes meanwhile.
        async with infra.client("wayne") as wayne:
            seen = await wayne.submit(GOAL, task_id="ok-wayne-2", timeout=60)
        assert isinstance(seen.outcome, TaskCompleted), seen.outcome
    finally:
        await mesh.replace("budget-1")
    # Back: partition 1's records are complete again, from its mark on.
    spent = await infra.spent("wayne", "ok-wayne-2", partitions=2)
    assert spent["total"]["calls"] == await usage_count(infra, "wayne", "ok-wayne-2") > 0
    together = await merged(infra)
    assert together is not None and together.partitions == 2
