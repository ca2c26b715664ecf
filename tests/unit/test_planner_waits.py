"""A workflow's timers, signals, retries and timeouts, in memory: the planner's transitions on a
task record (``mesh_planner.waits``, ``Planner.on_wake``, ``Planner.on_signal``,
``Flow.try_failed``) with the broker's part (schedules, delivery) played by fakes. The same
through the real mesh and a real broker's schedules: tests/scenarios/test_workflow_waits.py."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from mesh_contracts.v1 import CheckResult, CheckVerdict, PlanReviewed, StepCompleted, StepFailed, TaskSignal
from mesh_contracts.v1.records import StepState, TaskRecord
from mesh_contracts.v1.workflow import WorkflowDefinition
from mesh_contracts.v1.workflow_runs import not_runnable
from mesh_durable import chain
from mesh_kit import state as st
from mesh_kit.delivery import Reject
from mesh_planner import waits
from mesh_planner.service import Planner
from mesh_planner.steps import tries, workflow_steps
from mesh_planner.timers import Early, parse_due, schedule_headers
from mesh_planner.workflows import Registry
from mesh_testing.memkv import MemoryKV

pytestmark = pytest.mark.unit


class FakeMesh:
    settings = SimpleNamespace(inbox_prefix="_INBOX.planner", ack_wait_s=30.0, graceful_timeout_s=5.0, max_workers=4)

    def __init__(self) -> None:
        self.published: list[Any] = []
        self.audits: list[dict[str, Any]] = []
        chain.install(self, self)  # the planner's audit chain appends here

    async def append(self, tenant: str, task_id: str, kind: str, key: str, **kw: Any) -> int:
        self.audits.append({"kind": kind, **kw})
        return len(self.audits)

    async def publish(self, msg: Any, key: str = "", **_: Any) -> None:
        self.published.append(msg)

    async def newest_trust(self) -> Any:  # every approver of the test's tenant may decide
        return SimpleNamespace(may_decide=lambda who, tenant: None if who.startswith(f"approver.{tenant}.") else "no")


class FakeTimers:
    def __init__(self) -> None:
        self.scheduled: list[tuple[str, float]] = []

    async def schedule(self, tenant: str, task_id: str, wait_id: str, due_at: float) -> None:
        self.scheduled.append((wait_id, due_at))


def delivery(msg_id: str = "m1", sender: str = "client.acme") -> Any:
    return SimpleNamespace(msg_id=msg_id, sender=SimpleNamespace(name=sender))


async def started(nodes: list[dict[str, Any]], **over: Any) -> tuple[Planner, WorkflowDefinition]:
    wf = WorkflowDefinition.model_validate({"name": "w", "nodes": nodes, **over})
    planner = Planner(FakeMesh(), model=None)  # type: ignore[arg-type]
    planner.kv = MemoryKV()
    planner.workflows = Registry(MemoryKV())
    planner.workflows._parsed[wf.digest()] = wf
    planner.timers = FakeTimers()  # type: ignore[assignment]
    rec = TaskRecord(
        tenant="acme", task_id="t1", goal="g", workflow=wf.ref(), status="running", answer_step=wf.answer_node()
    )
    rec.steps = {s.step_id: StepState(step=s, wait=wf.node(s.step_id).kind if wf.node(s.step_id).kind in ("timer", "signal", "approval", "check") else "")
                 for s in workflow_steps(wf)}  # fmt: skip
    await put(planner, rec)
    await planner.transition("acme", "t1", lambda r: planner.flow.settle(r, "c0") is None)
    return planner, wf


async def put(planner: Planner, rec: TaskRecord) -> None:
    await st.update(planner.kv, TaskRecord.key("acme", "t1"), TaskRecord, lambda _: rec)


async def record(planner: Planner) -> TaskRecord:
    rec, _ = await st.load(planner.kv, TaskRecord.key("acme", "t1"), TaskRecord)
    assert rec is not None
    return rec


def said(planner: Planner, kind: str) -> list[Any]:
    return [m for m in planner.mesh.published if m.type == kind]  # type: ignore[attr-defined]


async def come_due(planner: Planner, wid: str) -> None:
    """Its time has come: the wait is due now (what the broker's firing at its time means)."""
    rec = await record(planner)
    if wid in rec.waits:
        rec.waits[wid].due_at = time.time() - 0.001
        await put(planner, rec)


async def wake_all_due(planner: Planner) -> None:
    """Deliver every wake-up scheduled so far, as the broker does at its time."""
    for wid, due in list(planner.timers.scheduled):  # type: ignore[union-attr]
        planner.timers.scheduled.remove((wid, due))  # type: ignore[union-attr]
        await come_due(planner, wid)
        await planner.on_wake("acme", "t1", wid)


def test_what_this_planner_cannot_honour_is_named_not_ignored():
    wf = WorkflowDefinition.model_validate({"name": "w", "mode": "auto", "nodes": [
        {"id": "w", "kind": "timer", "after_s": 5, "retry": {"attempts": 2}, "timeout_s": 3},
        {"id": "a", "kind": "approval", "request": "ok?", "after": ["w"]},
        {"id": "b", "kind": "agent", "instruction": "x", "after": ["a"], "budget_share": 0.5,
         "retry": {"attempts": 3}, "timeout_s": 30}]})  # fmt: skip
    assert not_runnable(wf) == [
        "mode 'auto' (a workflow the model may replan is no workflow: submit the goal without one)",
        "timer node 'w' sets retries (a wait is not retried)",
        "timer node 'w' sets a timeout (a timer's time is its own)",
    ]


async def test_a_timer_waits_on_the_broker_and_fires_once_when_due():
    before = time.time()
    planner, _ = await started([
        {"id": "cool", "kind": "timer", "after_s": 30},
        {"id": "say", "kind": "agent", "instruction": "say it", "after": ["cool"]}])  # fmt: skip
    rec = await record(planner)
    assert rec.steps["cool"].status == "dispatched" and rec.steps["cool"].wait == "timer"
    assert rec.steps["say"].status == "pending" and not said(planner, "step.requested")
    [(wid, due)] = planner.timers.scheduled  # type: ignore[union-attr]
    assert before + 30 <= due <= time.time() + 30
    [w] = said(planner, "wait.started")
    assert (w.wait_id, w.kind, w.until) == (wid, "timer", due)
    # Early (the broker's clock ahead): nothing changes, look again when due.
    with pytest.raises(Early) as early:
        await planner.on_wake("acme", "t1", wid)
    assert 29 < early.value.delay_s <= 30
    assert (await record(planner)).steps["cool"].status == "dispatched"
    # Due: the timer completes, the next node runs, the wait is over (and says how late it was).
    rec = await record(planner)
    rec.waits[wid].due_at = time.time() - 0.25
    await put(planner, rec)
    await planner.on_wake("acme", "t1", wid)
    rec = await record(planner)
    assert rec.steps["cool"].status == "completed" and not rec.waits
    assert [m.step.step_id for m in said(planner, "step.requested")] == ["say"]
    [ended] = said(planner, "wait.ended")
    assert ended.outcome == "fired" and ended.late_s is not None and ended.late_s >= 0.25
    # A second copy of the wake-up changes nothing.
    await planner.on_wake("acme", "t1", wid)
    assert len(said(planner, "step.requested")) == 1 and len(said(planner, "wait.ended")) == 1


async def test_until_is_a_time_with_its_offset_or_the_task_fails_saying_why():
    planner, _ = await started([{"id": "t", "kind": "timer", "until": "next tuesday"}])
    rec = await record(planner)
    assert rec.status == "failed" and "until 'next tuesday' is not an ISO 8601 time" in rec.reason
    planner, _ = await started([{"id": "t", "kind": "timer", "until": "2020-01-01T00:00:00"}])
    assert "has no offset" in (await record(planner)).reason
    planner, _ = await started([{"id": "t", "kind": "timer", "until": "2020-01-01T00:00:00Z"}])
    [(_, due)] = planner.timers.scheduled  # type: ignore[union-attr]
    assert due == 1577836800.0  # in the past: the broker fires it at once


async def test_a_failed_try_is_retried_after_its_backoff_then_the_task_fails_with_the_count():
    planner, _ = await started([{"id": "order", "kind": "tool", "tool": "http_get", "arguments": {"url": "u"},
                                 "retry": {"attempts": 3, "backoff_s": 2, "multiplier": 3}}])  # fmt: skip
    delays = []
    for attempt in (1, 2):
        await planner.on_step_failed(StepFailed(tenant="acme", task_id="t1", step_id="order", attempt=attempt,
                                                reason="503"), delivery(f"f{attempt}"))  # fmt: skip
        rec = await record(planner)
        s = rec.steps["order"]
        assert s.status == "pending" and rec.status == "running"
        [(wid, due)] = planner.timers.scheduled  # type: ignore[union-attr]
        w = rec.waits[wid]
        assert w.kind == "retry" and w.attempt == attempt
        delays.append(due - w.started_at)
        # Not dispatched again before its backoff fires, whatever else happens meanwhile.
        await planner.transition("acme", "t1", lambda r: planner.flow.settle(r, "x") is None)
        assert len(said(planner, "step.requested")) == attempt
        await wake_all_due(planner)
        assert [m.attempt for m in said(planner, "step.requested")][-1] == attempt + 1
    assert [round(d, 1) for d in delays] == [2.0, 6.0]
    await planner.on_step_failed(StepFailed(tenant="acme", task_id="t1", step_id="order", attempt=3, reason="503"),
                                 delivery("f3"))  # fmt: skip
    rec = await record(planner)
    assert rec.status == "failed" and "(try 3 of 3): 503" in rec.reason
    assert not planner.timers.scheduled  # type: ignore[union-attr]
    assert [m.kind for m in said(planner, "wait.started")] == ["retry", "retry"]


async def test_a_try_still_running_at_its_timeout_fails_and_a_late_result_is_ignored():
    planner, _ = await started([{"id": "slow", "kind": "agent", "instruction": "x", "timeout_s": 10,
                                 "retry": {"attempts": 2, "backoff_s": 0}}])  # fmt: skip
    [(wid, _)] = planner.timers.scheduled  # type: ignore[union-attr]
    assert wid.startswith("timeout-1-") and not said(planner, "wait.started")  # a try's time is not a wait
    planner.timers.scheduled.clear()  # type: ignore[union-attr]
    rec = await record(planner)
    rec.waits[wid].due_at = time.time() - 1
    await put(planner, rec)
    await planner.on_wake("acme", "t1", wid)  # try 1 timed out: its retry waits 0 s
    await wake_all_due(planner)
    assert [m.attempt for m in said(planner, "step.requested")] == [1, 2]
    # Try 1's worker answers late: ignored (attempt 2 runs); try 2 completes in time.
    await planner.on_step_completed(StepCompleted(tenant="acme", task_id="t1", step_id="slow", attempt=1,
                                                  output="late"), delivery("c1"))  # fmt: skip
    assert (await record(planner)).steps["slow"].status == "dispatched"
    await planner.on_step_completed(StepCompleted(tenant="acme", task_id="t1", step_id="slow", attempt=2,
                                                  output="done"), delivery("c2"))  # fmt: skip
    rec = await record(planner)
    assert rec.status == "checking" and rec.steps["slow"].output == "done"
    assert not rec.waits  # try 2's timeout closed with it: its wake-up will find nothing
    for wid, _ in list(planner.timers.scheduled):  # type: ignore[union-attr]
        await planner.on_wake("acme", "t1", wid)
    assert (await record(planner)).status == "checking"


SIGNALS = [
    {"id": "draft", "kind": "agent", "instruction": "draft"},
    {
        "id": "ok",
        "kind": "signal",
        "name": "approved_by_legal",
        "after": ["draft"],
        "timeout_s": 3600,
        "payload_schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    },
    {"id": "send", "kind": "agent", "instruction": "send {{nodes.ok.output.ok}}", "after": ["ok"]},
]


async def signal(planner: Planner, name: str, payload: Any, msg_id: str) -> None:
    await planner.on_signal(TaskSignal(tenant="acme", task_id="t1", name=name, payload=payload), delivery(msg_id))


async def test_a_signal_is_kept_until_its_node_is_reached_then_taken_and_checked():
    planner, _ = await started(SIGNALS)
    await signal(planner, "approved_by_legal", {"ok": True}, "s1")  # before its node: kept
    rec = await record(planner)
    assert rec.signals["approved_by_legal"].taken_by == "" and rec.steps["ok"].status == "pending"
    await planner.on_step_completed(StepCompleted(tenant="acme", task_id="t1", step_id="draft", attempt=1,
                                                  output="text"), delivery("c1"))  # fmt: skip
    rec = await record(planner)
    assert rec.steps["ok"].status == "completed" and rec.steps["ok"].output == '{"ok": true}'
    assert [m.step.instruction for m in said(planner, "step.requested")] == ["draft", "send true"]
    assert not planner.timers.scheduled  # taken at once: no timeout was ever scheduled  # type: ignore[union-attr]
    stages = [m.stage for m in said(planner, "event.progress")]
    assert "signal.kept" in stages and "signal.taken" in stages
    # The same signal delivered again, and a second one of its name: nothing changes.
    await signal(planner, "approved_by_legal", {"ok": True}, "s1")
    await signal(planner, "approved_by_legal", {"ok": False}, "s2")
    refused = [m.message for m in said(planner, "event.progress") if m.stage == "signal.refused"]
    assert len(refused) == 1 and "was received already (taken by ok" in refused[0]
    assert [a["detail"]["outcome"] for a in planner.mesh.audits] == ["kept", "taken", "refused"]  # type: ignore[attr-defined]


async def test_a_waiting_signal_node_refuses_what_does_not_fit_and_times_out():
    planner, _ = await started(SIGNALS)
    await planner.on_step_completed(StepCompleted(tenant="acme", task_id="t1", step_id="draft", attempt=1,
                                                  output="text"), delivery("c1"))  # fmt: skip
    rec = await record(planner)
    [(wid, due)] = planner.timers.scheduled  # type: ignore[union-attr]
    assert rec.waits[wid].kind == "signal" and due > time.time() + 3500
    await signal(planner, "approved_by_legal", {"ok": "yes"}, "s1")
    await signal(planner, "shipped", {}, "s2")
    refused = [m.message for m in said(planner, "event.progress") if m.stage == "signal.refused"]
    assert "payload does not fit node ok: ok: 'yes' is not of type 'boolean'" in refused[0]
    assert "waits for no signal named 'shipped' (its signals: approved_by_legal)" in refused[1]
    assert (await record(planner)).steps["ok"].status == "dispatched"  # still waiting
    rec.waits[wid].due_at = time.time() - 1
    await put(planner, rec)
    await planner.on_wake("acme", "t1", wid)
    rec = await record(planner)
    assert rec.status == "failed" and "no signal approved_by_legal within its timeout" in rec.reason
    assert [m.outcome for m in said(planner, "wait.ended")] == ["timed_out"]


async def test_a_signal_to_a_task_of_no_signal_or_to_no_task_is_refused_not_kept():
    planner, _ = await started([{"id": "a", "kind": "agent", "instruction": "x"}])
    await signal(planner, "go", None, "s1")
    await planner.on_signal(TaskSignal(tenant="acme", task_id="nope", name="go"), delivery("s2"))
    refused = [m.message for m in said(planner, "event.progress") if m.stage == "signal.refused"]
    assert "waits for no signal named 'go' (its signals: none)" in refused[0]
    assert "tenant acme has no task nope" in refused[1]
    assert not (await record(planner)).signals


async def test_a_cancelled_task_abandons_its_waits_and_their_wake_ups_change_nothing():
    planner, _ = await started([{"id": "cool", "kind": "timer", "after_s": 60}])
    [(wid, _)] = planner.timers.scheduled  # type: ignore[union-attr]

    def cancel(rec: TaskRecord) -> bool:
        rec.status = "cancelled"
        return True

    await planner.transition("acme", "t1", cancel)
    rec = await record(planner)
    assert not rec.waits and [m.outcome for m in said(planner, "wait.ended")] == ["abandoned"]
    await planner.on_wake("acme", "t1", wid)
    assert (await record(planner)).steps["cool"].status == "dispatched"


def test_the_schedule_names_its_wake_up_and_a_fired_one_is_read_back():
    headers = schedule_headers("acme", "t1", "fire-1-cool", 1767225600.25)
    assert headers == {"Nats-Schedule": "@at 2026-01-01T00:00:00.250Z",
                       "Nats-Schedule-Target": "timer.v1.acme.t1.fire-1-cool.due"}  # fmt: skip
    assert parse_due("timer.v1.acme.t1.fire-1-cool.due") == ("acme", "t1", "fire-1-cool")
    assert parse_due("timer.v1.acme.t1.fire-1-cool.at") is None
    assert len(waits.wait_id("timeout", 3, "x" * 64)) <= 64


GATE = [
    {"id": "decide", "kind": "agent", "instruction": "decide", "output_schema": {"type": "object"}},
    {"id": "approve", "kind": "approval", "request": "Refund {{nodes.decide.output.amount}}?", "after": ["decide"],
     "on_denied": "continue", "timeout_s": 86400},
    {"id": "pay", "kind": "agent", "instruction": "pay", "after": [{"node": "approve", "when": {"status": "approved"}}]},
    {"id": "sorry", "kind": "agent", "instruction": "apologise",
     "after": [{"node": "approve", "when": {"status": "denied"}}]},
    {"id": "reply", "kind": "agent", "role": "answer", "instruction": "reply", "after": ["pay", "sorry"]},
]  # fmt: skip


async def at_the_gate(nodes: list[dict[str, Any]]) -> tuple[Planner, Any]:
    planner, _ = await started(nodes)
    await planner.on_step_completed(StepCompleted(tenant="acme", task_id="t1", step_id="decide", attempt=1,
                                                  output='{"amount": 120}'), delivery("c1"))  # fmt: skip
    [w] = [w for w in (await record(planner)).waits.values() if w.kind == "approval"]
    return planner, w


async def review(planner: Planner, w: Any, decision: str, who: str = "approver.acme.dana", msg: str = "r1") -> None:
    await planner.on_reviewed(PlanReviewed(tenant="acme", task_id="t1", draft=w.decision, decision=decision,
                                           reviewed_by=who, comment="ok by me"), delivery(msg, who))  # fmt: skip


@pytest.mark.parametrize(("decision", "ran", "skipped"), [("approve", "pay", "sorry"), ("reject", "sorry", "pay")])
async def test_an_approval_node_waits_for_an_approver_whose_decision_chooses_the_branch(decision, ran, skipped):
    planner, w = await at_the_gate(GATE)
    assert w.request == "Refund 120?" and len(w.decision) == 16
    [started_] = said(planner, "wait.started")
    assert (started_.kind, started_.decision, started_.request) == ("approval", w.decision, "Refund 120?")
    assert [m.step.step_id for m in said(planner, "step.requested")] == ["decide"]  # nothing after it yet
    await review(planner, w, decision)
    rec = await record(planner)
    assert rec.steps["approve"].status == "completed" and not rec.waits
    assert rec.steps[skipped].skipped and not rec.steps[ran].skipped
    assert [m.step.step_id for m in said(planner, "step.requested")] == ["decide", ran]
    assert [m.outcome for m in said(planner, "wait.ended")] == ["approved" if decision == "approve" else "denied"]
    assert planner.mesh.audits[-1]["kind"] == ("approval.approved" if decision == "approve" else "approval.denied")  # type: ignore[attr-defined]


async def test_a_denied_approval_fails_the_task_by_default_and_is_not_edited_nor_decided_twice():
    nodes = [dict(n) for n in GATE[:3]]
    nodes[1].pop("on_denied")
    planner, w = await at_the_gate(nodes)
    with pytest.raises(Reject, match="approved or rejected, not edited"):
        await review(planner, w, "edit")
    await review(planner, w, "reject", msg="r2")
    rec = await record(planner)
    assert rec.status == "failed" and rec.reason == "approval approve denied by approver.acme.dana: ok by me"
    with pytest.raises(Reject, match="no draft plan waits"):  # decided already: nothing waits for it
        await review(planner, w, "approve", msg="r3")


async def test_an_approval_nobody_decides_in_time_fails_its_node():
    planner, w = await at_the_gate(GATE)
    [(wid, due)] = planner.timers.scheduled  # type: ignore[union-attr]
    assert wid == "approval-1-approve" and due == w.due_at
    await come_due(planner, wid)
    await planner.on_wake("acme", "t1", wid)
    rec = await record(planner)
    assert rec.status == "failed" and "no approver decided within its timeout" in rec.reason


class FakeAdmission:
    """The tenant's admission record as far as idle tasks go (``Admission.mark_idle``)."""

    def __init__(self) -> None:
        self.idle: set[str] = set()
        self.calls: list[bool] = []

    def idle_as_seen(self, tenant: str, task_id: str) -> bool:
        return task_id in self.idle

    def mark_idle(self, tenant: str, task_id: str, idle: bool) -> None:
        self.calls.append(idle)
        (self.idle.add if idle else self.idle.discard)(task_id)

    async def release(self, tenant: str, task_id: str, took_s: float | None) -> None:
        self.idle.discard(task_id)


async def test_a_task_waiting_only_for_the_world_gives_its_run_slot_back_and_takes_it_when_woken():
    planner, _ = await started([*SIGNALS, {"id": "retry", "kind": "agent", "instruction": "x", "after": ["send"],
                                           "retry": {"attempts": 2, "backoff_s": 5}, "timeout_s": 60}])  # fmt: skip
    adm = planner.admission = FakeAdmission()  # type: ignore[assignment]
    done = StepCompleted(tenant="acme", task_id="t1", step_id="draft", attempt=1, output="text")
    await planner.on_step_completed(done, delivery("c1"))  # its signal node waits, nothing else runs
    assert adm.calls == [True] and waits.idle(await record(planner))
    await signal(planner, "approved_by_legal", {"ok": True}, "s1")  # 'send' is dispatched: back at work
    assert adm.calls == [True, False]
    await planner.on_step_completed(StepCompleted(tenant="acme", task_id="t1", step_id="send", attempt=1,
                                                  output="sent"), delivery("c2"))  # fmt: skip
    rec = await record(planner)
    assert not waits.idle(rec) and any(w.kind == "timeout" for w in rec.waits.values()), "a try's time is work"
    assert adm.calls == [True, False]
    await planner.on_step_failed(StepFailed(tenant="acme", task_id="t1", step_id="retry", attempt=1, reason="503"),
                                 delivery("f1"))  # its backoff: idle  # fmt: skip
    assert adm.calls == [True, False, True]
    adm.idle.clear()  # the tenant's record lost it (a crash between the two writes): the next transition repairs it
    await planner.transition("acme", "t1", lambda r: planner.flow.settle(r, "x") is None)
    assert adm.calls == [True, False, True, True] and adm.idle == {"t1"}
    await wake_all_due(planner)  # the retry runs
    assert adm.calls[-1] is False and not adm.idle


def test_a_draft_waiting_for_its_reviewer_is_idle_a_task_planning_is_not():
    rec = TaskRecord(tenant="acme", task_id="t1", goal="g", status="planning")
    assert not waits.idle(rec)
    rec.draft_hash = "0123456789abcdef"
    assert waits.idle(rec)
    rec.status = "checking"
    assert not waits.idle(rec)


CHECKED = [
    {"id": "draft", "kind": "agent", "role": "write", "instruction": "draft the reply"},
    {"id": "polish", "kind": "agent", "role": "write", "instruction": "polish it", "after": ["draft"]},
    {"id": "gate", "kind": "check", "of": "draft", "checks": ["no_pii", "judge"], "min_score": 0.8,
     "after": ["polish"], "retry": {"attempts": 2, "backoff_s": 3}},
    {"id": "send", "kind": "agent", "role": "answer", "instruction": "send {{nodes.gate.output.passed}}",
     "after": ["gate"]},
]  # fmt: skip


def completed(sid: str, attempt: int, output: str) -> StepCompleted:
    return StepCompleted(tenant="acme", task_id="t1", step_id=sid, attempt=attempt, output=output)


def node_verdict(attempt: int, passed: bool) -> CheckVerdict:
    checks = (CheckResult(name="no_pii", passed=passed, reason="ok" if passed else "an e-mail address"),)
    return CheckVerdict(tenant="acme", task_id="t1", attempt=attempt, passed=passed, checks=checks, node="gate",
                        judge_score=0.9 if passed else None)  # fmt: skip


async def test_a_check_node_asks_the_checker_mid_run_and_a_failed_verdict_runs_its_node_again_told_why():
    planner, wf = await started(CHECKED)
    assert tries(wf, "draft") == 2 and tries(wf, "polish") == 2 and tries(wf, "send") == 1
    await planner.on_step_completed(completed("draft", 1, "mail ops@example.com"), delivery("c1"))
    await planner.on_step_completed(completed("polish", 1, "polished"), delivery("c2"))
    [asked] = said(planner, "check.requested")
    assert (asked.node, asked.attempt, asked.answer, asked.answer_step) == ("gate", 1, "mail ops@example.com", "draft")
    assert asked.only == ("no_pii", "judge") and asked.policy.judge_min_score == 0.8
    assert [s.step_id for s in asked.steps] == ["draft", "polish"], "the steps run so far: the check node is none"
    assert not waits.idle(await record(planner)), "the checker works on it: not a wait for the world"
    await planner.on_verdict(node_verdict(1, False), delivery("v1"))
    rec = await record(planner)
    assert [rec.steps[s].status for s in ("draft", "polish", "gate")] == ["pending", "pending", "pending"]
    [(wid, due)] = planner.timers.scheduled  # type: ignore[union-attr]
    assert rec.waits[wid].kind == "retry" and rec.waits[wid].step_id == "draft" and due - time.time() > 2
    assert len(said(planner, "step.requested")) == 2, "not before its backoff"
    await planner.on_verdict(node_verdict(1, False), delivery("v1"))  # a second copy: nothing more
    await wake_all_due(planner)
    again = said(planner, "step.requested")[-1]
    assert (again.step.step_id, again.attempt) == ("draft", 2) and "no_pii: an e-mail address" in again.feedback
    await planner.on_step_completed(completed("draft", 2, "mail the ops team"), delivery("c3"))
    await planner.on_step_completed(completed("polish", 2, "polished"), delivery("c4"))
    assert [m.attempt for m in said(planner, "check.requested")] == [1, 2]
    await planner.on_verdict(node_verdict(2, True), delivery("v2"))
    rec = await record(planner)
    assert json.loads(rec.steps["gate"].output)["passed"] is True and rec.steps["send"].status == "dispatched"
    assert said(planner, "step.requested")[-1].step.instruction == "send true"  # JSON, as templates render it
    await planner.on_step_completed(completed("send", 1, "sent"), delivery("c5"))
    rec = await record(planner)
    assert rec.status == "checking" and [s.step_id for s in said(planner, "check.requested")[-1].steps] == [
        "draft", "polish", "send"], "the task's own check: the check node's output is no work to judge"  # fmt: skip


async def test_a_check_node_failed_on_its_last_try_fails_the_task_saying_why():
    planner, _ = await started([{**n, "retry": {"attempts": 1}} if n["id"] == "gate" else n for n in CHECKED])
    await planner.on_step_completed(completed("draft", 1, "mail ops@example.com"), delivery("c1"))
    await planner.on_step_completed(completed("polish", 1, "polished"), delivery("c2"))
    await planner.on_verdict(node_verdict(1, False), delivery("v1"))
    rec = await record(planner)
    assert rec.status == "failed" and "step gate failed" in rec.reason
    assert (
        "the checker rejected draft: no_pii: an e-mail address" in rec.reason and rec.steps["send"].status == "failed"
    )
