"""Durable timers, signals and node retries through the real mesh (issue 40, item 4).

A timer's wake-up is a message schedule on the broker (``topology.TIMERS``): the planner can be
killed, and the broker restarted, while it is pending, and it fires when due, not before. A
signal reaches a waiting node through the tenant's door (``meshctl signal``), is checked against
the node's payload schema, and another tenant's signal cannot reach the task. A node's retry
policy is obeyed: its tries and the time between them are read back from the streams."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_contracts.v1 import (
    CheckRequested,
    CheckVerdict,
    PlanCreated,
    PlanDrafted,
    StepFailed,
    StepRequested,
    TaskCompleted,
    TaskFailed,
    TaskPolicy,
    TaskRejected,
    WaitEnded,
    WaitStarted,
)
from mesh_contracts.v1.records import AdmissionRecord
from mesh_kit import state as st
from mesh_testing.chaos import ChaosMesh, report, started
from mesh_testing.infra import Infra, running_infra
from meshctl.cli import main as cli_main
from meshctl.client import TenantClient

pytestmark = pytest.mark.chaos
# One run slot, even for a tenant alone: a task that holds one while it waits on the world stops every other.
ENV = {"MESH_ACK_WAIT_S": "2", "MESH_LOG_LEVEL": "WARNING", "MESH_PLAN_FIXED": "globex", "MESH_RUN_SLOTS": "1",
       "MESH_RUN_SLOTS_ALONE": "1"}  # fmt: skip
NO_JUDGE = TaskPolicy(judge=False)
ALICE = "author.acme.alice"


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    # binaries: the timer test kill -9s the broker, which only a process this fixture started allows
    with running_infra(["acme", "globex"], mode="binaries", name="waits", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


@pytest.fixture(scope="module")
def author(infra, mesh) -> str:
    assert ctl(infra, "authors", "add", "alice", "--tenant", "acme") == 0
    assert ctl(infra, "approvers", "add", "dana", "--tenant", "acme") == 0
    assert ctl(infra, "approvers", "add", "bob", "--tenant", "globex") == 0
    return ALICE


def ctl(infra: Infra, *args: str) -> int:
    return cli_main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])


def publish(infra: Infra, tmp: Path, definition: dict[str, Any]) -> None:
    path = tmp / f"{definition['name']}.yaml"
    path.write_text(yaml.safe_dump(definition))
    assert ctl(infra, "workflow", "publish", str(path), "--as", ALICE, "--reason", "test") == 0


async def submit(infra: Infra, task_id: str, workflow: str, inputs: dict[str, Any] | None = None) -> Any:
    async with TenantClient.of(infra.ids, infra.nats_url, "acme") as client:
        return await client.submit(f"run {workflow}", task_id=task_id, workflow=workflow, inputs=inputs or {},
                                   policy=NO_JUDGE, timeout=120)  # fmt: skip


async def stored(infra: Infra, stream: str, subject: str, cls: Any) -> list[tuple[float, Any]]:
    """(broker's stored time, message) of everything ``stream`` holds on ``subject``."""
    return [(m.metadata.timestamp.timestamp(), cls.parse(m.data))
            for m in await infra.stored(stream, subject)]  # fmt: skip


async def until_stored(infra: Infra, stream: str, subject: str, timeout_s: float = 60) -> None:
    for _ in range(int(timeout_s * 10)):
        if await infra.stored(stream, subject):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing stored on {subject} within {timeout_s} s")


TIMER = {
    "name": "cool-off",
    "nodes": [
        {"id": "note", "kind": "agent", "role": "compute", "instruction": "#say: noted"},
        {"id": "cool", "kind": "timer", "after_s": 6, "after": ["note"]},
        {"id": "reply", "kind": "agent", "role": "answer", "after": ["cool"],
         "instruction": "#say: replied after the cool-off"},
    ],
}  # fmt: skip


def test_a_timer_fires_when_due_through_the_planners_death_and_a_broker_restart(infra, mesh, author, tmp_path):
    publish(infra, tmp_path, TIMER)

    async def main() -> None:
        task = asyncio.create_task(submit(infra, "wt-timer", "cool-off"))
        await until_stored(infra, "TASK", "task.v1.acme.wt-timer.waiting")
        mesh.kill("planner-0")
        await infra.restart_nats()
        await mesh.replace("planner-0")
        seen = await task
        assert isinstance(seen.outcome, TaskCompleted), seen.outcome
        assert seen.outcome.answer == "replied after the cool-off"
        [(started_at, began)] = await stored(infra, "TASK", "task.v1.acme.wt-timer.waiting", WaitStarted)
        [(_, ended)] = await stored(infra, "TASK", "task.v1.acme.wt-timer.waited", WaitEnded)
        assert (began.kind, began.step_id, ended.outcome) == ("timer", "cool", "fired")
        assert began.until is not None and began.until >= started_at + 6 - 1  # 6 s from when it was reached
        requested = await stored(infra, "STEP", "step.v1.acme.wt-timer.requested", StepRequested)
        [reply_at] = [at for at, m in requested if m.step.step_id == "reply"]
        # Not before its time (the broker's clock stamps both): the next node waited it out.
        assert reply_at >= began.until - 0.05 and ended.late_s is not None and ended.late_s >= 0
        report("timer through a planner kill and a broker restart", after_s=6, late_s=ended.late_s,
               planner_restarts=1, broker_restarts=1)  # fmt: skip

    asyncio.run(main())


SIGNAL = {
    "name": "legal-review",
    "nodes": [
        {"id": "draft", "kind": "agent", "role": "compute", "instruction": "#say: the draft"},
        {"id": "legal", "kind": "signal", "name": "legal_ok", "after": ["draft"], "timeout_s": 300,
         "payload_schema": {"type": "object", "properties": {"by": {"type": "string"}}, "required": ["by"]}},
        {"id": "send", "kind": "agent", "role": "answer", "after": ["legal"],
         "instruction": "#say: sent, cleared by {{nodes.legal.output.by}}"},
    ],
}  # fmt: skip


def test_a_signal_reaches_its_node_checked_and_only_from_the_tasks_tenant(infra, mesh, author, tmp_path, capsys):
    publish(infra, tmp_path, SIGNAL)

    async def main() -> None:
        task = asyncio.create_task(submit(infra, "wt-signal", "legal-review"))
        await until_stored(infra, "TASK", "task.v1.acme.wt-signal.waiting")
        capsys.readouterr()
        # A payload that does not fit: refused, saying why; the node waits on.
        assert await asyncio.to_thread(ctl, infra, "signal", "wt-signal", "legal_ok", "--tenant", "acme",
                                       "--payload", '{"who": "x"}') == 1  # fmt: skip
        assert "payload does not fit node legal: 'by' is a required property" in capsys.readouterr().out
        # Another tenant's client, naming the same task id, reaches only its own tenant: no such task.
        assert await asyncio.to_thread(ctl, infra, "signal", "wt-signal", "legal_ok", "--tenant", "globex",
                                       "--payload", '{"by": "mallory"}') == 1  # fmt: skip
        assert "tenant globex has no task wt-signal" in capsys.readouterr().out
        # A bad payload argument is one line, not a traceback, and sends nothing.
        assert await asyncio.to_thread(ctl, infra, "signal", "wt-signal", "legal_ok", "--payload", "{by") == 1
        assert "the payload is not JSON" in capsys.readouterr().err
        assert await asyncio.to_thread(ctl, infra, "signal", "wt-signal", "legal_ok", "--tenant", "acme",
                                       "--payload", '{"by": "dana"}') == 0  # fmt: skip
        assert "signal legal_ok from client.acme" in capsys.readouterr().out
        seen = await task
        assert isinstance(seen.outcome, TaskCompleted), seen.outcome
        assert seen.outcome.answer == "sent, cleared by dana"
        [(_, ended)] = await stored(infra, "TASK", "task.v1.acme.wt-signal.waited", WaitEnded)
        assert ended.outcome == "signalled"
        signals = await infra.stored("TASK", "task.v1.*.wt-signal.signal")
        assert {m.subject for m in signals} == {"task.v1.acme.wt-signal.signal", "task.v1.globex.wt-signal.signal"}

    asyncio.run(main())


def test_tasks_waiting_for_the_world_hold_no_run_slot_and_take_it_back_when_woken(
    infra, mesh, author, tmp_path, capsys
):
    """One run slot (ENV). Three workflow tasks each wait for a signal: each gives its slot back
    while it waits (``idle`` in the tenant's admission record, still in flight), so the next one
    starts, and a plain task completes meanwhile. Signalled, each takes a slot again and
    completes; nothing is left counted."""
    publish(infra, tmp_path, SIGNAL)
    ids = [f"wt-idle-{i}" for i in range(3)]

    async def main() -> None:
        tasks = [asyncio.create_task(submit(infra, t, "legal-review")) for t in ids]
        for t in ids:
            await until_stored(infra, "TASK", f"task.v1.acme.{t}.waiting")
        t0 = time.monotonic()
        async with TenantClient.of(infra.ids, infra.nats_url, "acme") as client:
            plain = await client.submit("What is 17 * 23?", task_id="wt-idle-plain", policy=NO_JUDGE, timeout=60)
        assert isinstance(plain.outcome, TaskCompleted) and "391" in plain.outcome.answer, plain.outcome
        report("a task beside three waiting for signals, one run slot", plain_task_s=round(time.monotonic() - t0, 3),
               waiting=len(ids), slots=1)  # fmt: skip
        rec = await admission(infra, "acme")
        assert set(rec.idle) == set(ids) and set(ids) <= set(rec.in_flight) and not set(ids) & set(rec.running), rec
        for t in ids:
            assert await asyncio.to_thread(ctl, infra, "signal", t, "legal_ok", "--tenant", "acme",
                                           "--payload", '{"by": "dana"}') == 0  # fmt: skip
        for seen in await asyncio.gather(*tasks):
            assert isinstance(seen.outcome, TaskCompleted) and seen.outcome.answer == "sent, cleared by dana", seen
        rec = await admission(infra, "acme")
        assert not set(ids) & (set(rec.idle) | set(rec.running) | set(rec.in_flight)), rec

    asyncio.run(main())


async def admission(infra: Infra, tenant: str) -> AdmissionRecord:
    nc = await infra.admin()
    try:
        rec, _ = await st.load(st.bind(nc, AdmissionRecord.bucket), tenant, AdmissionRecord)
    finally:
        await nc.close()
    assert rec is not None
    return rec


def test_the_examples_follow_up_goes_draft_review_approve_run_as_its_comment_says(infra, mesh, author, capsys):
    """examples/workflows/follow-up.yaml (mode review), published and run with the commands in its
    comment: its nodes wait as a draft (not a stall) until the tenant's approver approves them;
    an edit that adds a tool is refused; the manager's signal is taken by its node while the
    cool-off still runs, and the reply waits for both. The plan that runs is the approved draft."""
    path = Path(__file__).parents[2] / "examples" / "workflows" / "follow-up.yaml"
    assert ctl(infra, "workflow", "publish", str(path), "--as", ALICE) == 0

    async def main() -> None:
        task = asyncio.create_task(submit(infra, "fu-1", "follow-up", {"topic": "the late delivery of order 1042"}))
        await until_stored(infra, "TASK", "task.v1.acme.fu-1.drafted")
        [(_, drafted)] = await stored(infra, "TASK", "task.v1.acme.fu-1.drafted", PlanDrafted)
        assert drafted.workflow.startswith("follow-up@") and [s.step_id for s in drafted.steps] == [
            "draft", "cool", "ok", "send"]  # fmt: skip
        assert not await infra.stored("STEP", "step.v1.acme.fu-1.requested")  # nothing runs before approval
        capsys.readouterr()
        # A reviewer may change what an agent node is told, not the workflow: a tool added is refused.
        steps = [s.model_dump(mode="json") for s in drafted.steps]
        steps[0]["tools"] = ["http_get"]
        assert await asyncio.to_thread(ctl, infra, "review", "edit", "fu-1", "--tenant", "acme", "--as",
                                       "approver.acme.dana", "--plan", json.dumps({"steps": steps}), "--timeout", "60") != 0  # fmt: skip
        assert "node draft: tools are fixed by the workflow" in capsys.readouterr().err
        assert await asyncio.to_thread(ctl, infra, "review", "approve", "fu-1", "--tenant", "acme", "--as",
                                       "approver.acme.dana", "--timeout", "60") == 0  # fmt: skip
        await until_stored(infra, "TASK", "task.v1.acme.fu-1.waiting")
        capsys.readouterr()
        assert await asyncio.to_thread(ctl, infra, "signal", "fu-1", "manager_ok", "--tenant", "acme",
                                       "--payload", '{"approved": true}') == 0  # fmt: skip
        seen = await task
        assert isinstance(seen.outcome, TaskCompleted), (seen.outcome, [e.message for e in seen.events])
        kinds = sorted(m.kind for _, m in await stored(infra, "TASK", "task.v1.acme.fu-1.waiting", WaitStarted))
        assert kinds == ["signal", "timer"]
        [(_, plan)] = await stored(infra, "TASK", "task.v1.acme.fu-1.planned", PlanCreated)
        assert plan.reviewed == f"{drafted.draft} by approver.acme.dana" and plan.steps == drafted.steps

    asyncio.run(main())


GATE = {
    "name": "refund-gate",
    "nodes": [
        {"id": "decide", "kind": "agent", "role": "compute", "instruction": '#say: {"amount": 120}',
         "output_schema": {"type": "object", "required": ["amount"]}},
        {"id": "approve", "kind": "approval", "after": ["decide"], "on_denied": "continue",
         "request": "Refund {{nodes.decide.output.amount}} to the customer?"},
        {"id": "pay", "kind": "agent", "role": "answer", "instruction": "#say: refunded",
         "after": [{"node": "approve", "when": {"status": "approved"}}]},
        {"id": "sorry", "kind": "agent", "role": "answer", "instruction": "#say: not refunded",
         "after": [{"node": "approve", "when": {"status": "denied"}}]},
        {"id": "reply", "kind": "agent", "role": "answer", "after": ["pay", "sorry"], "instruction": "#say: {inputs}"},
    ],
}  # fmt: skip


def test_an_approval_node_waits_for_the_tenants_approver_and_the_decision_picks_the_branch(
    infra, mesh, author, tmp_path, capsys
):  # fmt: skip
    publish(infra, tmp_path, GATE)

    async def main() -> None:
        task = asyncio.create_task(submit(infra, "wt-gate", "refund-gate"))
        await until_stored(infra, "TASK", "task.v1.acme.wt-gate.waiting")
        capsys.readouterr()
        assert await asyncio.to_thread(ctl, infra, "review", "show", "wt-gate", "--tenant", "acme") == 0
        assert "approval node approve" in (shown := capsys.readouterr().out) and "Refund 120 to the customer?" in shown
        # Another tenant's approver may not decide it (judged by the planner under the newest bundle).
        assert await asyncio.to_thread(ctl, infra, "review", "approve", "wt-gate", "--tenant", "acme", "--as",
                                       "approver.globex.bob", "--timeout", "60") != 0  # fmt: skip
        assert await asyncio.to_thread(ctl, infra, "review", "approve", "wt-gate", "--tenant", "acme", "--as",
                                       "approver.acme.dana", "--comment", "within policy", "--timeout", "60") == 0  # fmt: skip
        seen = await task
        assert isinstance(seen.outcome, TaskCompleted), seen.outcome
        assert seen.outcome.answer == "refunded"
        [(_, ended)] = await stored(infra, "TASK", "task.v1.acme.wt-gate.waited", WaitEnded)
        assert ended.outcome == "approved"
        stages = [(e.stage, e.step_id) for e in seen.events]
        assert ("step.skipped", "sorry") in stages

    asyncio.run(main())


def test_a_tenant_that_runs_workflows_only_is_refused_a_goal_and_others_plan_as_before(infra, mesh):
    """Plan governance per tenant: globex is ``fixed`` (MESH_PLAN_FIXED), acme ``auto``."""

    async def main() -> None:
        async with TenantClient.of(infra.ids, infra.nats_url, "globex") as client:
            refused = await client.submit("What is 17 * 23?", task_id="wt-goal", timeout=60)
        assert isinstance(refused.outcome, TaskRejected), refused.outcome
        assert "tenant globex runs registered workflows only (MESH_PLAN_FIXED)" in refused.outcome.reason
        assert await infra.stored("STEP", "step.v1.globex.wt-goal.requested") == []
        async with TenantClient.of(infra.ids, infra.nats_url, "acme") as client:
            done = await client.submit("What is 17 * 23?", task_id="wt-goal", timeout=60)
        assert isinstance(done.outcome, TaskCompleted) and "391" in done.outcome.answer, done.outcome

    asyncio.run(main())


CHECKED = {
    "name": "checked-mail",
    "nodes": [
        {"id": "draft", "kind": "agent", "role": "write",
         "instruction": "#say: Write to ops@example.com about the outage || Write to the ops team about the outage"},
        {"id": "gate", "kind": "check", "of": "draft", "checks": ["non_empty", "no_pii"], "after": ["draft"],
         "retry": {"attempts": 2, "backoff_s": 1}},
        {"id": "send", "kind": "agent", "role": "answer", "after": ["gate"],
         "instruction": "#say: sent after check {{nodes.gate.output.passed}}: {{nodes.draft.output}}"},
    ],
}  # fmt: skip


def test_a_check_node_has_the_checker_judge_a_node_mid_run_and_its_node_redone_told_why(infra, mesh, author, tmp_path):
    """The checker's verdict on one node, mid-run: the draft leaks an address, the check node's
    ``no_pii`` fails it, the draft runs again after the backoff with the checker's reason (the
    scripted model, told, leaves the address out), passes, and only then does the reply run."""
    publish(infra, tmp_path, CHECKED)

    async def main() -> None:
        seen = await submit(infra, "wt-check", "checked-mail")
        assert isinstance(seen.outcome, TaskCompleted), seen.outcome
        assert seen.outcome.answer == "sent after check true: Write to the ops team about the outage"
        asked = await stored(infra, "CHECK", "check.v1.acme.wt-check.requested", CheckRequested)
        nodes = [(m.node, m.attempt, m.answer_step, m.only) for _, m in asked]
        assert nodes[:2] == [
            ("gate", 1, "draft", ("non_empty", "no_pii")),
            ("gate", 2, "draft", ("non_empty", "no_pii")),
        ]
        verdicts = [(m.node, m.attempt, m.passed) for _, m in await stored(infra, "CHECK", "check.v1.acme.wt-check.verdict", CheckVerdict)]  # fmt: skip
        assert verdicts[:2] == [("gate", 1, False), ("gate", 2, True)], verdicts
        assert [n for n, *_ in nodes[2:]] == [""] and [v[0] for v in verdicts[2:]] == [""], "then the task's own check"
        requested = [m for _, m in await stored(infra, "STEP", "step.v1.acme.wt-check.requested", StepRequested)]
        drafts = [m for m in requested if m.step.step_id == "draft"]
        assert [m.attempt for m in drafts] == [1, 2] and "no_pii" in drafts[1].feedback and not drafts[0].feedback
        [(failed_at, _)] = [(at, m) for at, m in await stored(infra, "CHECK", "check.v1.acme.wt-check.verdict",
                                                               CheckVerdict) if not m.passed]  # fmt: skip
        [redo_at] = [at for at, m in await stored(infra, "STEP", "step.v1.acme.wt-check.requested", StepRequested)
                     if m.step.step_id == "draft" and m.attempt == 2]  # fmt: skip
        assert redo_at - failed_at >= 1 - 0.05, "the draft ran again after the check node's backoff"
        # The reply ran once, after the check passed.
        assert [m.attempt for m in requested if m.step.step_id == "send"] == [1]

    asyncio.run(main())


RETRY = {
    "name": "flaky",
    "nodes": [
        {"id": "call", "kind": "agent", "role": "compute", "instruction": "#provider-down ask the provider",
         "retry": {"attempts": 3, "backoff_s": 1, "multiplier": 2}},
    ],
}  # fmt: skip


def test_a_nodes_retry_policy_is_obeyed_as_the_streams_show(infra, mesh, author, tmp_path):
    """Last in the module: the provider it fails opens the worker's circuit breaker for a while."""
    publish(infra, tmp_path, RETRY)

    async def main() -> None:
        seen = await submit(infra, "wt-retry", "flaky")
        assert isinstance(seen.outcome, TaskFailed), seen.outcome
        assert "step call failed (try 3 of 3)" in seen.outcome.reason
        requested = await stored(infra, "STEP", "step.v1.acme.wt-retry.requested", StepRequested)
        failed = await stored(infra, "STEP", "step.v1.acme.wt-retry.failed", StepFailed)
        assert [m.attempt for _, m in requested] == [1, 2, 3]
        assert [m.attempt for _, m in failed] == [1, 2, 3]
        # Each try after the first waited its backoff from the failure before it: 1 s, then 2 s.
        gaps = [requested[i + 1][0] - failed[i][0] for i in range(2)]
        assert gaps[0] >= 1 - 0.05 and gaps[1] >= 2 - 0.05, gaps
        began = await stored(infra, "TASK", "task.v1.acme.wt-retry.waiting", WaitStarted)
        assert [(m.kind, m.step_id) for _, m in began] == [("retry", "call"), ("retry", "call")]
        report("node retry policy", attempts=3, backoff_s=[1, 2], gaps_s=[round(g, 3) for g in gaps])

    asyncio.run(main())


def test_every_link_this_modules_tasks_put_on_the_chain_verifies(infra, mesh):
    """Workflow publications, pinned versions, signals, drafts, reviews and approvals: the planner's
    records of each are kinds its role may write, and the chain verifies whole (they did not,
    until issue 41 found ``meshctl audit verify`` calling every such chain broken)."""
    assert ctl(infra, "audit", "verify", "--tenant", "acme") == 0
