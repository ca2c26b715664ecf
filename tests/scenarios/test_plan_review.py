"""Plans under review through the real mesh (issue 40, item 3 ``review``): a tenant under
``MESH_PLAN_REVIEW`` gets the model's plan as a draft; nothing runs until one of its approvers
approves it, and then exactly that draft runs (its hash on the plan and the audit chain). An edit
is a new draft with its changes, which waits again; a rejection fails the task with the reason.
The wait survives the planner's death and is not a stall; a decision from anyone else, or on a
draft that is no longer the one waiting, is refused."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from mesh_contracts.v1 import PlanCreated, PlanDrafted, PlanReviewed, TaskCompleted, TaskFailed, TaskLimits, TaskPolicy
from mesh_identity import Signer
from mesh_kit import envelope as env
from mesh_testing.chaos import ChaosMesh, started
from mesh_testing.infra import Infra, running_infra
from meshctl import approvers, audit
from meshctl.cli import main as cli_main
from meshctl.client import TenantClient

pytestmark = pytest.mark.chaos
ENV = {"MESH_ACK_WAIT_S": "2", "MESH_LOG_LEVEL": "WARNING", "MESH_PLAN_REVIEW": "acme"}
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
ALICE = "approver.acme.alice"


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex"], name="review", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        asyncio.run(approvers.add(infra.ids, "acme", "alice", infra.nats_url))
        asyncio.run(approvers.add(infra.ids, "globex", "bob", infra.nats_url))
        yield m


def ctl(infra: Infra, *args: str) -> int:
    return cli_main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])


def submit(infra: Infra, task_id: str, tenant: str = "acme", **kw: Any) -> asyncio.Task[Any]:
    async def run() -> Any:
        async with TenantClient.of(infra.ids, infra.nats_url, tenant) as c:
            return (await c.submit(GOAL, task_id=task_id, timeout=120, policy=TaskPolicy(judge=False), **kw)).outcome

    return asyncio.create_task(run())


async def draft_of(infra: Infra, task_id: str, revision: int = 1, within_s: float = 60) -> PlanDrafted:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for m in reversed(await infra.stored("TASK", f"task.v1.acme.{task_id}.drafted")):
            d = PlanDrafted.parse(m.data)
            if d.revision == revision:
                return d
        await asyncio.sleep(0.1)
    raise AssertionError(f"no draft revision {revision} of {task_id} within {within_s:g} s")


async def planned(infra: Infra, task_id: str) -> list[PlanCreated]:
    return [PlanCreated.parse(m.data) for m in await infra.stored("TASK", f"task.v1.acme.{task_id}.planned")]


async def links(infra: Infra, task_id: str) -> list[dict[str, Any]]:
    admin = await infra.admin()
    try:
        return [
            r for r in await audit.chain_opened(admin, "acme", infra.ids.auditor_key("acme")) if r["task_id"] == task_id
        ]
    finally:
        await admin.close()


async def review_behind_the_console(infra: Infra, signer: Signer, task_id: str, draft: str, decision: str) -> list[str]:
    """A decision signed by ``signer`` published with no console check in the way; the reasons it
    was dead-lettered for (empty after 15 s)."""
    msg = PlanReviewed(tenant="acme", task_id=task_id, draft=draft, decision=decision,  # type: ignore[arg-type]
                       reviewed_by=signer.principal)  # fmt: skip
    body = msg.to_bytes()
    headers = env.headers_for(signer, msg, body, env.message_id(msg.type, "acme", task_id, uuid.uuid4().hex))
    nc = await infra.admin()
    try:
        await nc.jetstream().publish(msg.subject(), body, headers=headers)
    finally:
        await nc.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        dead = [(m.headers or {}).get(env.DLQ_REASON, "") for m in await infra.stored("DLQ", f"dlq.*.{msg.subject()}")]
        if dead:
            return dead
        await asyncio.sleep(0.2)
    return []


def test_nothing_runs_before_approval_and_the_approved_draft_is_what_runs(infra, mesh, capsys):
    """Also: the wait outlasts the task's stall timeout (a person's wait is not a stall), another
    tenant's approver cannot decide, and the tenant not under review runs as before."""

    async def main() -> None:
        task = submit(infra, "rv-approve", limits=TaskLimits(stall_timeout_s=3.0))
        other = submit(infra, "rv-globex", tenant="globex")
        d = await draft_of(infra, "rv-approve")
        assert isinstance(await other, TaskCompleted), "globex is not under review: its plan runs at once"
        await asyncio.sleep(8)  # over two stall timeouts: still waiting, not cancelled
        assert not task.done() and await planned(infra, "rv-approve") == []
        assert await infra.stored("STEP", "step.v1.acme.rv-approve.requested") == [], "no step before approval"
        bob = Signer.from_file("approver.globex.bob", infra.ids.signing_key("approver.globex.bob"))
        refused = await review_behind_the_console(infra, bob, "rv-approve", d.draft, "approve")
        assert any("may speak only for tenant 'globex', not 'acme'" in r for r in refused), refused
        capsys.readouterr()
        assert await asyncio.to_thread(ctl, infra, "review", "list", "--tenant", "acme") == 0
        assert f"draft {d.draft}, revision 1, as the model planned it: waits for a reviewer" in capsys.readouterr().out
        assert (
            await asyncio.to_thread(ctl, infra, "review", "approve", "rv-approve", "--tenant", "acme", "--as", ALICE)
            == 0
        )
        assert f"approved: the plan runs as draft {d.draft} by {ALICE}" in capsys.readouterr().out
        out = await task
        assert isinstance(out, TaskCompleted), out
        (plan,) = await planned(infra, "rv-approve")
        assert plan.steps == d.steps and plan.reviewed == f"{d.draft} by {ALICE}"
        kinds = [(r["kind"], r["detail"].get("draft")) for r in await links(infra, "rv-approve")]
        assert ("plan.drafted", d.draft) in kinds and ("plan.approved", d.draft) in kinds
        assert kinds.index(("plan.drafted", d.draft)) < kinds.index(("plan.approved", d.draft))

    asyncio.run(main())


def test_an_edit_is_a_new_draft_and_a_decision_on_the_old_one_is_refused(infra, mesh, tmp_path, capsys):
    async def main() -> None:
        task = submit(infra, "rv-edit")
        first = await draft_of(infra, "rv-edit")
        assert len(first.steps) >= 2
        # The reviewer keeps the first step and an answer built on it alone.
        keep = first.steps[0]
        answer = {"step_id": "final", "kind": "answer", "instruction": "Answer from the input.",
                  "depends_on": [keep.step_id]}  # fmt: skip
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"steps": [keep.model_dump(mode="json"), answer]}))
        capsys.readouterr()
        code = await asyncio.to_thread(ctl, infra, "review", "edit", "rv-edit", "--tenant", "acme", "--as", ALICE,
                                       "--plan", f"@{plan}", "--comment", "one step is enough")  # fmt: skip
        assert code == 0, capsys.readouterr()
        second = await draft_of(infra, "rv-edit", revision=2)
        assert second.edited_by == ALICE and [s.step_id for s in second.steps] == [keep.step_id, "final"]
        assert any(c.startswith("+ final") for c in second.changes) and any(c.startswith("- ") for c in second.changes)
        alice = Signer.from_file(ALICE, infra.ids.signing_key(ALICE))
        stale = await review_behind_the_console(infra, alice, "rv-edit", first.draft, "approve")
        assert any(f"draft {first.draft} is not the one waiting (that is {second.draft}, revision 2)" in r
                   for r in stale), stale  # fmt: skip
        assert (
            await asyncio.to_thread(ctl, infra, "review", "approve", "rv-edit", "--tenant", "acme", "--as", ALICE) == 0
        )
        out = await task
        assert isinstance(out, TaskCompleted) and out.steps == 2, out
        (plan_created,) = await planned(infra, "rv-edit")
        assert plan_created.reviewed == f"{second.draft} by {ALICE}"
        kinds = [r["kind"] for r in await links(infra, "rv-edit")]
        assert kinds.count("plan.review-refused") == 1 and "plan.edited" in kinds and "plan.approved" in kinds

    asyncio.run(main())


def test_a_rejection_fails_the_task_with_the_reviewers_reason(infra, mesh, capsys):
    async def main() -> None:
        task = submit(infra, "rv-reject")
        await draft_of(infra, "rv-reject")
        code = await asyncio.to_thread(ctl, infra, "review", "reject", "rv-reject", "--tenant", "acme", "--as", ALICE,
                                       "--comment", "no external lookups on Fridays")  # fmt: skip
        assert code == 0
        out = await task
        assert isinstance(out, TaskFailed) and out.reason == f"plan rejected by {ALICE}: no external lookups on Fridays"
        assert await infra.stored("STEP", "step.v1.acme.rv-reject.requested") == []

    asyncio.run(main())


def test_a_draft_waits_through_the_planners_death(infra, mesh):
    async def main() -> None:
        task = submit(infra, "rv-crash")
        d = await draft_of(infra, "rv-crash")
        mesh.kill("planner-0")
        alice = Signer.from_file(ALICE, infra.ids.signing_key(ALICE))
        msg = PlanReviewed(tenant="acme", task_id="rv-crash", draft=d.draft, decision="approve", reviewed_by=ALICE)
        body = msg.to_bytes()
        nc = await infra.admin()
        try:  # decided while no planner runs: the decision waits in its stream
            await nc.jetstream().publish(msg.subject(), body, headers=env.headers_for(
                alice, msg, body, env.message_id(msg.type, "acme", "rv-crash", "1")))  # fmt: skip
        finally:
            await nc.close()
        await mesh.replace("planner-0")
        out = await task
        assert isinstance(out, TaskCompleted), out
        (plan,) = await planned(infra, "rv-crash")
        assert plan.reviewed == f"{d.draft} by {ALICE}" and plan.steps == d.steps

    asyncio.run(main())
