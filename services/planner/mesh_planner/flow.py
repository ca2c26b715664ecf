"""How a task's record moves: the planner's state machine, one method per thing that happened.

Each method is handed the record as stored and what happened (a step's result, a verdict, a
wake-up, a reviewer's decision, a control action); it changes the record, writes the messages it
decides into the record's outbox (``out``, ``event``) and returns whether it changed anything. It
reads nothing and writes nothing itself: ``Planner.transition`` loads the record, calls it, stores
the record with compare-and-set (calling it again on a conflict) and then flushes the outbox. So
a decision and its messages are one write, and every method here can be tested on a record alone.

The one thing it needs besides the record is the definition of the workflow a task runs; a
definition not read yet raises ``NeedWorkflow``, and the transition reads it and runs again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from pydantic import ValidationError

from mesh_contracts.v1 import (
    CheckVerdict,
    ControlCancel,
    ControlHalt,
    ControlResume,
    PlanCreated,
    PlanReviewed,
    PlanStep,
    StepCompleted,
    StepFailed,
    TaskCompleted,
    TokenUsage,
)
from mesh_contracts.v1.records import TERMINAL, SignalState, StepState, TaskRecord, WaitState
from mesh_contracts.v1.workflow import WAITS, AgentNode, ApprovalNode, CheckNode, WorkflowDefinition
from mesh_planner import waits
from mesh_planner.drafts import checked_plan, draft, workflow_edit_problem
from mesh_planner.errors import NeedWorkflow
from mesh_planner.outbox import event, out
from mesh_planner.steps import (
    answer_step_id,
    check_request,
    dispatch_ready,
    dispatch_workflow,
    fail,
    final_answer,
    outcome_fields,
    redo_after,
    workflow_steps,
)
from mesh_planner.workflows import Registry


class Flow:
    """The transitions of a task record. ``workflows``: the registry whose definitions it has
    read; ``reviewed(tenant)``: whether the tenant's model-made plans wait for a reviewer."""

    def __init__(self, workflows: Callable[[], Registry | None], reviewed: Callable[[str], bool]) -> None:
        self._workflows, self.reviewed = workflows, reviewed

    def definition(self, rec: TaskRecord) -> WorkflowDefinition | None:
        """The workflow a task runs (None: its plan is the model's); ``NeedWorkflow`` if its
        definition has not been read yet."""
        if not rec.workflow:
            return None
        registry = self._workflows()
        wf = registry.cached(rec.workflow) if registry is not None else None
        if wf is None:
            raise NeedWorkflow(rec.workflow)
        return wf

    # --- planned -----------------------------------------------------------------------------

    def planned(self, rec: TaskRecord, steps: list[PlanStep], usage: TokenUsage | None, error: str, cause: str) -> bool:
        """The model's plan (or why there is none) for a task still planning: it runs, or waits
        for a reviewer as a draft, or the task fails."""
        if rec.status != "planning" or rec.draft:
            return False  # planned already (a draft waiting for review is planned too)
        if usage is not None:
            rec.planner_usage = rec.planner_usage + usage
        if error:
            fail(rec, error)
            return True
        if self.reviewed(rec.tenant):
            draft(rec, steps, causation=cause)
            return True
        rec.status = "running"
        rec.steps = {s.step_id: StepState(step=s) for s in steps}
        out(rec, PlanCreated(tenant=rec.tenant, task_id=rec.task_id, steps=tuple(steps)), key="r1", causation=cause)
        event(rec, "plan.created", f"{len(steps)} steps: " + ", ".join(f"{s.step_id}:{s.kind}" for s in steps))
        self.dispatch(rec, cause)
        return True

    def workflow_planned(
        self, rec: TaskRecord, cause: str, fit: Callable[[list[PlanStep]], list[PlanStep]] | None = None
    ) -> bool:
        """A fixed workflow's plan: its nodes, as they are (the model adds and removes nothing),
        its agent nodes pinned to their profiles by ``fit`` (``mesh_planner.agents``)."""
        if rec.status != "planning" or rec.draft:
            return False
        wf = self.definition(rec)
        assert wf is not None
        steps = workflow_steps(wf)
        if fit is not None:
            steps = fit(steps)
        if wf.mode == "review":  # its nodes wait for one of the tenant's reviewers
            draft(rec, steps, causation=cause)
            return True
        self.start_workflow(rec, wf, steps, cause)
        return True

    def start_workflow(
        self, rec: TaskRecord, wf: WorkflowDefinition, steps: list[PlanStep], causation: str, reviewed: str = ""
    ) -> None:
        """Run the workflow's nodes (``steps``: as defined, or as a reviewer approved them)."""
        rec.status, rec.answer_step = "running", wf.answer_node()
        rec.steps = {}
        for s in steps:
            node = wf.node(s.step_id)
            state = StepState(step=s, wait=node.kind if node.kind in (*WAITS, "check") else "")
            if isinstance(node, AgentNode) and s.instruction != node.instruction:
                state.template = s.instruction  # as the reviewer edited it
            rec.steps[s.step_id] = state
        out(rec, PlanCreated(tenant=rec.tenant, task_id=rec.task_id, steps=tuple(steps), workflow=rec.workflow,
                              reviewed=reviewed), key="r1", causation=causation)  # fmt: skip
        how = f", as approved by {reviewed}" if reviewed else ""
        event(rec, "plan.created", f"{rec.workflow}: {len(steps)} nodes{how}: " + ", ".join(s.step_id for s in steps))
        self.settle(rec, causation)

    # --- running -----------------------------------------------------------------------------

    def dispatch(self, rec: TaskRecord, causation: str = "") -> None:
        wf = self.definition(rec)
        if wf is None:
            dispatch_ready(rec, causation)
        else:
            dispatch_workflow(rec, wf, causation)

    def settle(self, rec: TaskRecord, causation: str) -> None:
        """A step ended: dispatch what may run now (a running task), and once every step has
        completed, hand the answer to the checker."""
        if rec.status == "running":
            self.dispatch(rec, causation)
        if rec.status not in ("running", "halted") or not all(x.status == "completed" for x in rec.steps.values()):
            return
        if rec.steps[answer_step_id(rec)].skipped:
            fail(rec, f"the workflow's output node {answer_step_id(rec)} was skipped: no answer")
            return
        rec.status, rec.check_attempt = "checking", rec.check_attempt + 1
        out(rec, check_request(rec), key=str(rec.check_attempt), causation=causation)
        event(rec, "check.requested", f"{len(rec.steps)} step result(s) and the answer", key=str(rec.check_attempt))

    def step_completed(self, rec: TaskRecord, m: StepCompleted, cause: str) -> bool:
        s = rec.steps.get(m.step_id)
        if rec.status not in ("running", "halted") or s is None or s.status != "dispatched" or s.attempt != m.attempt:
            return False  # duplicate, stale attempt, or the task already ended
        s.status, s.output, s.citations = "completed", m.output, list(m.citations)
        s.usage = s.usage + m.usage  # a redone step's earlier attempts were paid for too
        s.tools, s.models, s.prompt_version = list(m.tools), list(m.models), m.prompt_version
        s.tool_denials = m.tool_denials
        s.taint = m.taint
        # held calls stay pending across a redo: the outcome names every one still waiting
        s.held += [h for h in m.held if h.approval_id not in {x.approval_id for x in s.held}]
        event(rec, "step.completed", f"{m.step_id}: {m.output[:100]}", m.step_id, str(m.attempt))
        waits.drop(rec, m.step_id)  # its try ended in time
        self.settle(rec, cause)
        return True

    def step_failed(self, rec: TaskRecord, m: StepFailed) -> bool:
        s = rec.steps.get(m.step_id)
        if rec.status in TERMINAL or s is None or s.status != "dispatched" or s.attempt != m.attempt:
            return False
        s.usage = s.usage + m.usage
        waits.drop(rec, m.step_id)  # its try ended in time (if it had a timeout)
        if m.halted:
            s.status, s.reason = "halted", m.reason
            event(rec, "step.halted", f"{m.step_id}: {m.reason}", m.step_id, str(m.attempt))
            return True
        self.try_failed(rec, m.step_id, m.reason)
        return True

    def try_failed(self, rec: TaskRecord, sid: str, reason: str) -> None:
        """A try of step ``sid`` failed: a workflow node with tries left waits its backoff and
        runs again (its ``retry``); otherwise the step fails, and the task with it."""
        s = rec.steps[sid]
        wf = self.definition(rec)
        node = wf.node(sid) if wf is not None and sid in {n.id for n in wf.nodes} else None
        if node is not None and node.kind not in WAITS and s.attempt < node.retry.attempts:
            delay = node.retry.delays()[s.attempt - 1]
            s.status, s.reason = "pending", f"try {s.attempt} of {node.retry.attempts} failed: {reason}"
            waits.start(rec, waits.wait_id("retry", s.attempt, sid),
                        WaitState(step_id=sid, kind="retry", attempt=s.attempt, due_at=time.time() + delay))  # fmt: skip
            event(rec, "step.retrying", f"{sid}: {s.reason}; try {s.attempt + 1} in {delay:g} s", sid, str(s.attempt))
            return
        s.status, s.reason = "failed", reason
        cascade = dependents(rec, sid)
        for dep in cascade:
            rec.steps[dep].status, rec.steps[dep].reason = "failed", f"dependency {sid} failed"
        tail = f"; dependents not run: {', '.join(cascade)}" if cascade else ""
        tries = f" (try {s.attempt} of {node.retry.attempts})" if node is not None and node.retry.attempts > 1 else ""
        fail(rec, f"step {sid} failed{tries}: {reason}{tail}", sid)

    def wake(self, rec: TaskRecord, wid: str, now: float) -> tuple[bool, float]:
        """A wake-up the broker fired: the wait it names ends, if the task still has it open and it
        is due. Returns (changed, how early it came: 0 if due)."""
        w = rec.waits.get(wid)
        if w is None or rec.status in TERMINAL:
            return False, 0.0  # over already (its step ended, the task ended, a second copy)
        if w.due_at is not None and w.due_at - now > waits.EARLY_S:
            return False, w.due_at - now
        s = rec.steps.get(w.step_id)
        if s is None:
            rec.waits.pop(wid)
            return True, 0.0
        if w.kind == "timer":
            waits.end(rec, wid, "fired", now)
            due = w.due_at or now
            waits.complete(rec, s, json.dumps({"due_at": round(due, 3), "fired_at": round(now, 3)}))
            self.settle(rec, wid)
        elif w.kind == "retry":
            waits.end(rec, wid, "fired", now)
            if rec.status == "running":
                self.dispatch(rec, wid)
        elif w.kind == "signal":
            waits.end(rec, wid, "timed_out", now)
            self.try_failed(rec, w.step_id, f"no signal {w.signal} within its timeout")
        elif w.kind == "approval":
            waits.end(rec, wid, "timed_out", now)
            self.try_failed(rec, w.step_id, "no approver decided within its timeout")
        else:  # timeout of a try
            waits.end(rec, wid, "timed_out", now)
            if s.status != "dispatched" or s.attempt != w.attempt:
                return True, 0.0  # that try ended meanwhile
            event(rec, "step.timed_out", f"{w.step_id}: try {w.attempt} still running at its timeout",
                   w.step_id, str(w.attempt))  # fmt: skip
            self.try_failed(rec, w.step_id, f"try {w.attempt} timed out")
        return True, 0.0

    def signal(self, rec: TaskRecord, name: str, sig: SignalState, cause: str) -> tuple[bool, str, str]:
        """A signal for the task: taken by the node waiting for it, kept until that node is
        reached, or refused. Returns (changed, outcome, why or the node that took it)."""
        earlier = rec.signals.get(name)
        if earlier is not None and earlier.msg_id == sig.msg_id:
            outcome, why = ("taken", earlier.taken_by) if earlier.taken_by else ("kept", "")
            return False, outcome, why  # this very signal, delivered again
        outcome, why = waits.signal_outcome(rec, self.definition(rec), name, sig)
        if outcome == "taken":
            self.settle(rec, cause)
        return outcome != "refused", outcome, why

    # --- checked -----------------------------------------------------------------------------

    def verdict(self, rec: TaskRecord, m: CheckVerdict, cause: str) -> bool:
        """The checker's verdict on the task's answer: it completes, or what failed is redone
        (bounded by ``max_revisions``), or the task fails."""
        if rec.status != "checking" or m.attempt != rec.check_attempt:
            return False
        rec.checks, rec.judge_score = list(m.checks), m.judge_score
        rec.check_usage = rec.check_usage + m.usage
        rec.prompt_versions = {**rec.prompt_versions, **m.prompt_versions}
        if m.passed:
            answer, citations = final_answer(rec)
            rec.status, rec.finished_at = "completed", time.time()
            done = TaskCompleted(
                tenant=rec.tenant, task_id=rec.task_id, answer=answer, citations=tuple(citations),
                steps=sum(1 for s in rec.steps.values() if not s.skipped),
                elapsed_s=round(rec.finished_at - rec.created_at, 3), **outcome_fields(rec),
            )  # fmt: skip
            out(rec, done, key="completed", causation=cause)
            event(rec, "task.completed", f"{len(rec.steps)} steps, {rec.total_usage().total_tokens} tokens")
            return True
        failed = "; ".join(
            f"{c.step_id + '.' if c.step_id else ''}{c.name}: {c.reason}" for c in m.checks if not c.passed
        )
        if rec.check_attempt > rec.limits.max_revisions:
            fail(rec, f"checker rejected the answer: {failed}")
            return True
        # Redo what failed, with the checker's reasons as an input (bounded by max_revisions):
        # the steps whose own results failed and everything built on them, or else the answer.
        redo = redo_after(rec, m)
        for sid in redo:
            s = rec.steps[sid]
            s.status, s.output, s.citations, s.skipped = "pending", "", [], False
            own = "; ".join(f"{c.name}: {c.reason}" for c in m.checks if not c.passed and c.step_id == sid)
            rec.feedback = {
                **rec.feedback,
                sid: f"the checker rejected {'this step' if own else 'the answer'}: {own or failed}",
            }
        rec.status = "running"
        event(rec, "check.revise", f"{', '.join(redo)} redone: {failed}", redo[0], str(rec.check_attempt))
        self.dispatch(rec, cause)
        return True

    def node_verdict(self, rec: TaskRecord, m: CheckVerdict, cause: str) -> bool:
        """The checker's verdict for a workflow's check node (``CheckNode``): passed, the node
        completes; failed with tries left, the node it checks (and what lies between) runs again
        after the backoff, told why, and is checked again; failed on its last try, the node fails."""
        s = rec.steps.get(m.node)
        if rec.status in TERMINAL or s is None or s.status != "dispatched" or s.attempt != m.attempt:
            return False  # a verdict for an earlier try (timed out), or a second copy
        wf = self.definition(rec)
        assert wf is not None
        node = wf.node(m.node)
        assert isinstance(node, CheckNode)
        rec.check_usage = rec.check_usage + m.usage
        rec.prompt_versions = {**rec.prompt_versions, **m.prompt_versions}
        waits.drop(rec, m.node)  # its try's timeout
        names = [c.name for c in m.checks]
        if m.passed:
            waits.complete(rec, s, json.dumps({"passed": True, "score": m.judge_score, "checks": names}))
            self.settle(rec, cause)
            return True
        failed = "; ".join(f"{c.name}: {c.reason}" for c in m.checks if not c.passed) or "no check passed"
        if s.attempt >= node.retry.attempts:
            self.try_failed(rec, m.node, f"the checker rejected {node.of}: {failed}")
            return True
        delay = node.retry.delays()[s.attempt - 1]
        between = wf.between(node.of, m.node)
        redo = [sid for sid in rec.steps if sid in between]  # in plan order
        for sid in redo:
            r = rec.steps[sid]
            r.status, r.output, r.citations, r.skipped = "pending", "", [], False
        rec.feedback = {**rec.feedback, node.of: f"the checker rejected this step: {failed}"}
        s.status, s.reason = "pending", f"check {s.attempt} of {node.retry.attempts} failed: {failed}"
        waits.start(rec, waits.wait_id("retry", rec.steps[node.of].attempt, node.of),
                    WaitState(step_id=node.of, kind="retry", attempt=rec.steps[node.of].attempt,
                              due_at=time.time() + delay))  # fmt: skip
        event(rec, "check.revise", f"{m.node}: {', '.join(redo)} run again in {delay:g} s: {failed}",
               m.node, str(s.attempt))  # fmt: skip
        return True

    # --- decided by people -------------------------------------------------------------------

    def review(self, rec: TaskRecord, m: PlanReviewed, who: str, cause: str, outcome: dict[str, str]) -> bool:
        """A reviewer's decision on the task's waiting draft (or a workflow's approval node):
        approved, it runs exactly as drafted; edited, the edit is the new draft (and waits again);
        rejected, the task fails with why. ``outcome`` says why it was refused ("why"), the new
        draft ("draft") or the approval node decided ("node")."""
        opened = waits.open_approval(rec, m.draft)
        if opened is not None:  # a workflow's approval node, not a draft plan
            return self.decide_approval(rec, opened, m, who, cause, outcome)
        if rec.status != "planning" or not rec.draft:
            outcome["why"] = f"no draft plan waits for review in task {m.tenant}/{m.task_id} (it is {rec.status})"
            return False
        if m.draft != rec.draft_hash:
            outcome["why"] = (f"draft {m.draft} is not the one waiting (that is {rec.draft_hash}, "
                              f"revision {rec.draft_revision})")  # fmt: skip
            return False
        if m.decision == "reject":
            fail(rec, f"plan rejected by {who}: {m.comment or 'no reason given'}")
            return True
        if m.decision == "edit":
            return self._edited(rec, m, who, cause, outcome)
        steps = list(rec.draft)
        if rec.workflow:
            wf = self.definition(rec)
            assert wf is not None
            rec.reviewed_by, rec.draft = who, []
            self.start_workflow(rec, wf, steps, cause, reviewed=f"{rec.draft_hash} by {who}")
            return True
        rec.status, rec.reviewed_by = "running", who
        rec.steps = {s.step_id: StepState(step=s) for s in steps}
        rec.draft = []
        out(rec, PlanCreated(tenant=rec.tenant, task_id=rec.task_id, steps=tuple(steps),
                              reviewed=f"{rec.draft_hash} by {who}"), key="r1", causation=cause)  # fmt: skip
        event(rec, "plan.created", f"{len(steps)} steps, as approved by {who}: "
               + ", ".join(f"{s.step_id}:{s.kind}" for s in steps))  # fmt: skip
        self.dispatch(rec, cause)
        return True

    def _edited(self, rec: TaskRecord, m: PlanReviewed, who: str, cause: str, outcome: dict[str, str]) -> bool:
        """A reviewer's edit of the draft: checked like a plan (a workflow's, against its
        definition), then the new draft, waiting again."""
        try:
            if rec.workflow:
                steps = [PlanStep.model_validate(s.model_dump()) for s in m.steps]
                wf = self.definition(rec)
                assert wf is not None
                problem = workflow_edit_problem(wf, list(rec.draft), steps)
                if problem is not None:
                    raise ValueError(f"a draft of workflow {rec.workflow}: {problem}")
            else:
                steps = checked_plan([s.model_dump() for s in m.steps], rec.limits.max_steps)
        except (ValueError, ValidationError) as exc:
            outcome["why"] = f"the edited plan: {exc}"[:500]
            return False
        draft(rec, steps, causation=cause, editor=who)
        outcome["draft"] = rec.draft_hash
        return True

    def decide_approval(
        self, rec: TaskRecord, opened: tuple[str, WaitState], m: PlanReviewed, who: str, cause: str,
        outcome: dict[str, str],
    ) -> bool:  # fmt: skip
        """A reviewer decides a workflow's approval node: approved, the node completes (status
        ``approved`` for conditions); rejected, the task fails (``on_denied: fail``) or the node
        completes ``denied`` and conditions choose what runs (``continue``)."""
        wid, w = opened
        if m.decision == "edit":
            outcome["why"] = f"approval node {w.step_id} is approved or rejected, not edited"
            return False
        wf = self.definition(rec)
        assert wf is not None
        node = wf.node(w.step_id)
        assert isinstance(node, ApprovalNode)
        approved, s = m.decision == "approve", rec.steps[w.step_id]
        waits.end(rec, wid, "approved" if approved else "denied", time.time())
        output = json.dumps({"approved": approved, "by": who, "comment": m.comment})
        outcome["node"] = w.step_id
        if not approved and node.on_denied == "fail":
            s.status, s.output, s.reason = "failed", output, f"denied by {who}"
            fail(rec, f"approval {w.step_id} denied by {who}: {m.comment or 'no reason given'}", w.step_id)
            return True
        waits.complete(rec, s, output)
        self.settle(rec, cause)
        return True

    def control(self, rec: TaskRecord, m: ControlCancel | ControlHalt | ControlResume, who: str, cause: str) -> bool:
        """An operator's or the client's cancel, halt or resume."""
        if rec.status in TERMINAL:
            return False
        if isinstance(m, ControlCancel):
            fail(rec, f"cancelled by {who}: {m.reason}", status="cancelled")
        elif isinstance(m, ControlHalt):
            if rec.status == "halted":
                return False
            rec.status, rec.reason = "halted", f"halted by {who}: {m.reason}"
            event(rec, "task.halted", rec.reason, key=cause)  # a task may be halted more than once
        else:
            if rec.status != "halted":
                return False
            rec.status, rec.reason = "running", ""
            for s in rec.steps.values():
                if s.status == "halted":
                    s.status = "pending"
            event(rec, "task.resumed", f"resumed by {who}", key=cause)
            self.dispatch(rec, cause)
        return True


def dependents(rec: TaskRecord, step_id: str) -> list[str]:
    """The steps not ended yet that depend on ``step_id``, directly or not, in plan order."""
    found: list[str] = []
    frontier = {step_id}
    for sid, s in rec.steps.items():  # steps are in dependency order
        if frontier & set(s.step.depends_on) and s.status in ("pending", "dispatched"):
            found.append(sid)
            frontier.add(sid)
    return found
