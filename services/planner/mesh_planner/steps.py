"""What a task does next, decided on its record: dispatching the steps that are ready (a plan's
or a workflow's), asking the checker, ending. Each function changes the record and writes the
messages it decides into the record's outbox (``out``, ``event``); the planner stores the record
and then flushes the outbox (``Planner.transition``), so a decision and its messages are one write.
"""

from __future__ import annotations

import re
import time
from typing import Any

from mesh_contracts.v1 import (
    CheckRequested,
    CheckVerdict,
    Citation,
    FixedCall,
    PlanStep,
    Replay,
    StepRequested,
    StepResult,
    TaskFailed,
)
from mesh_contracts.v1.records import (
    TaskRecord,
    WaitState,
)
from mesh_contracts.v1.workflow import (
    WAITS,
    AgentNode,
    ApprovalNode,
    CheckNode,
    RetrieveNode,
    SignalNode,
    TimerNode,
    ToolNode,
    WorkflowDefinition,
)
from mesh_contracts.v1.workflow_runs import advance, output_value, render
from mesh_planner import waits
from mesh_planner.outbox import event, out

RETRIEVAL = "search_docs"
"""The tool a step retrieves with (the worker sends it to rag)."""
REFERENCE = re.compile(r"\[[^\[\]#\s]+#[^\[\]\s]+\]")


def replaying(r: Replay) -> str:
    """A replay's progress line: what it replays and how."""
    recorded = ", ".join(r.recorded) if r.recorded else "none"
    prompts = ", ".join(f"{k}@{v}" for k, v in sorted(r.prompts.items()))
    return (
        f"replay of {r.of}: recorded responses for {recorded}; other calls live"
        + (f" on route {r.route}" if r.route else "")
        + (f" with prompts {prompts}" if prompts else "")
        + "; write and external tools run dry"
    )


def _dispatch(rec: TaskRecord, sid: str, causation: str, tries: int = 1) -> None:
    """Send step ``sid`` (its next attempt) to the workers, with its completed dependencies' outputs."""
    s = rec.steps[sid]
    s.status, s.attempt = "dispatched", s.attempt + 1
    deps = [d for d in s.step.depends_on if rec.steps[d].status == "completed" and not rec.steps[d].skipped]
    request = StepRequested(
        tenant=rec.tenant,
        task_id=rec.task_id,
        step=s.step,
        attempt=s.attempt,
        inputs={d: rec.steps[d].output for d in deps},
        # what each input's step read travels with its output (undeclared: untrusted)
        input_taint={d: t for d in deps if (t := rec.steps[d].taint) is not None},
        feedback=rec.feedback.get(sid, ""),
        on_held=rec.policy.on_held,
        replay=rec.replay,
        tries=tries,
    )
    out(rec, request, key=f"{sid}:{s.attempt}", causation=causation)
    event(rec, "step.dispatched", f"{sid} ({s.step.kind}): {s.step.instruction[:80]}", sid, str(s.attempt))


def dispatch_ready(rec: TaskRecord, causation: str = "") -> None:
    """Move every pending step whose dependencies completed to dispatched (attempt + 1)."""
    for sid, s in rec.steps.items():
        if s.status == "pending" and all(rec.steps[d].status == "completed" for d in s.step.depends_on):
            _dispatch(rec, sid, causation)


def workflow_steps(wf: WorkflowDefinition) -> list[PlanStep]:
    """A fixed workflow's nodes as the task's steps, in an order where each comes after the nodes
    it runs after (their instructions still hold their templates: filled in at dispatch)."""
    steps = []
    for i in wf.order():
        n = wf.node(i)
        after = tuple(e.node for e in n.edges())
        if isinstance(n, AgentNode):
            steps.append(PlanStep(step_id=n.id, kind=n.role, instruction=n.instruction, tools=n.tools, depends_on=after,
                                  difficulty=n.tier, output_schema=n.output_schema))  # fmt: skip
        elif isinstance(n, ToolNode):
            steps.append(PlanStep(step_id=n.id, kind="compute", instruction=f"call {n.tool}", tools=(n.tool,),
                                  depends_on=after, call=FixedCall(tool=n.tool, arguments=n.arguments)))  # fmt: skip
        elif isinstance(n, TimerNode):
            what = f"wait {n.after_s:g} s" if n.after_s is not None else f"wait until {n.until}"
            steps.append(PlanStep(step_id=n.id, kind="compute", instruction=what, depends_on=after))
        elif isinstance(n, SignalNode):
            steps.append(PlanStep(step_id=n.id, kind="compute", instruction=f"wait for signal {n.name}",
                                  depends_on=after))  # fmt: skip
        elif isinstance(n, ApprovalNode):
            steps.append(PlanStep(step_id=n.id, kind="compute", instruction=f"wait for an approver: {n.request}"[:4000],
                                  depends_on=after))  # fmt: skip
        elif isinstance(n, CheckNode):
            steps.append(PlanStep(step_id=n.id, kind="compute", instruction=f"check {n.of}: {', '.join(n.checks)}",
                                  depends_on=after))  # fmt: skip
        else:
            assert isinstance(n, RetrieveNode)  # what ``not_runnable`` lets through
            query = {"query": n.query, "top_k": n.top_k}
            steps.append(PlanStep(step_id=n.id, kind="research", instruction=f"retrieve: {n.query}"[:4000],
                                  tools=(RETRIEVAL,), depends_on=after, call=FixedCall(tool=RETRIEVAL, arguments=query)))  # fmt: skip
    return steps


def _filled(value: Any, inputs: dict[str, Any], outputs: dict[str, str]) -> Any:
    """A fixed call's arguments with the templates in their strings filled in."""
    if isinstance(value, str):
        return render(value, inputs, outputs)
    if isinstance(value, dict):
        return {k: _filled(v, inputs, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [_filled(v, inputs, outputs) for v in value]
    return value


def dispatch_workflow(rec: TaskRecord, wf: WorkflowDefinition, causation: str = "") -> None:
    """A workflow task's next nodes (``advance``): each node whose edges are all decided now runs
    (its templates filled in from the inputs and the outputs so far) or is skipped, and a skip
    decides the edges after it in turn."""
    ended: dict[str, tuple[str, Any]] = {}
    started: set[str] = set()
    for sid, s in rec.steps.items():
        if s.skipped:
            ended[sid] = ("skipped", None)
        elif s.status in ("completed", "failed"):
            approval = s.wait == "approval" and s.status == "completed"  # conditions see approved / denied
            ended[sid] = (waits.approval_status(s.output) if approval else s.status, output_value(s.output))
        elif s.status in ("dispatched", "halted") or waits.held_back(rec, sid):
            started.add(sid)
    ready, skipped = advance(wf, ended, started)
    for sid in skipped:
        s = rec.steps[sid]
        s.status, s.output, s.skipped = "completed", "", True
        s.reason = "a condition on a node before it does not hold, or nothing it needs ran"
        event(rec, "step.skipped", f"{sid}: {s.reason}", sid)
    outputs = {sid: s.output for sid, s in rec.steps.items() if s.status == "completed" and not s.skipped}
    now = time.time()
    for sid in ready:
        s = rec.steps[sid]
        if s.status != "pending":
            continue
        node = wf.node(sid)
        if node.kind in WAITS:
            problem = waits.reach_wait(rec, wf, sid, outputs, now)
            if problem is not None:
                s.status, s.reason = "failed", problem
                fail(rec, f"step {sid} failed: {problem}", sid)
                return
            if rec.steps[sid].status == "completed":  # reach_wait took a signal kept from before at once
                outputs[sid] = s.output
                dispatch_workflow(rec, wf, causation)
                return
            continue
        if isinstance(node, CheckNode):
            _request_check(rec, node, causation)
        elif isinstance(node, AgentNode):
            text = render(s.template or node.instruction, rec.inputs, outputs)
            s.step = s.step.model_copy(update={"instruction": text[:4000] or node.id})
        elif s.step.call is not None:  # a tool or retrieve node: its arguments, filled in
            arguments = _filled(dict(s.step.call.arguments), rec.inputs, outputs)
            s.step = s.step.model_copy(update={"call": s.step.call.model_copy(update={"arguments": arguments})})
        if not isinstance(node, CheckNode):
            _dispatch(rec, sid, causation, tries(wf, sid))
        if node.timeout_s is not None:  # the try fails if it has not ended by then
            waits.start(rec, waits.wait_id("timeout", s.attempt, sid),
                        WaitState(step_id=sid, kind="timeout", attempt=s.attempt, due_at=now + node.timeout_s),
                        told=False)  # fmt: skip


def tries(wf: WorkflowDefinition, sid: str) -> int:
    """How often node ``sid`` may be dispatched by design: its own tries, times the checks of each
    check node that runs it again when it fails (it, or a node between it and the check)."""
    n = wf.node(sid).retry.attempts
    for c in wf.nodes:
        if isinstance(c, CheckNode) and sid in wf.between(c.of, c.id):
            n *= c.retry.attempts
    return n


def _request_check(rec: TaskRecord, node: CheckNode, causation: str) -> None:
    """Ask the checker for check node ``node``'s verdict (its next try) on the output of ``node.of``."""
    s = rec.steps[node.id]
    s.status, s.attempt = "dispatched", s.attempt + 1
    of = rec.steps[node.of]
    # Its own checks decide (``only``: the checker runs the judge when they name it), the judge's
    # threshold its own, the schema the checked node's.
    policy = rec.policy.model_copy(update={"output_schema": of.step.output_schema})
    if node.min_score is not None:
        policy = policy.model_copy(update={"judge_min_score": node.min_score})
    task = check_request(rec, answer_of=node.of, attempt=s.attempt)
    request = task.model_copy(update={"policy": policy, "node": node.id, "only": tuple(node.checks)})
    out(rec, request, key=f"{node.id}:{s.attempt}", causation=causation)
    event(rec, "check.requested", f"{node.id}: {', '.join(node.checks)} on {node.of}", node.id, str(s.attempt))


def answer_step_id(rec: TaskRecord) -> str:
    """The workflow's output node, or else the last step of kind ``answer`` (or the last step):
    its output is the task's answer."""
    if rec.answer_step:
        return rec.answer_step
    order = list(rec.steps)
    return next((s for s in reversed(order) if rec.steps[s].step.kind == "answer"), order[-1])


def final_answer(rec: TaskRecord) -> tuple[str, list[Citation]]:
    answer_step = rec.steps[answer_step_id(rec)]
    seen: dict[str, Citation] = {}
    for s in rec.steps.values():
        for c in s.citations:
            seen.setdefault(c.chunk_hash, c)
    return answer_step.output, list(seen.values())


def outcome_fields(rec: TaskRecord) -> dict[str, Any]:
    """What every outcome reports besides its answer or reason: the last verdict, the prompt
    versions and the tools used (an eval report is built from these)."""
    return {
        "usage": rec.total_usage(),
        "checks": tuple(rec.checks),
        "judge_score": rec.judge_score,
        "prompt_versions": dict(rec.prompt_versions),
        "tools": tuple(t for s in rec.steps.values() for t in s.tools),
        "revisions": max(0, rec.check_attempt - 1),
        "held": tuple(h for s in rec.steps.values() for h in s.held),
        "workflow": rec.workflow,
    }


def fail(rec: TaskRecord, reason: str, failed_step: str | None = None, status: str = "failed") -> None:
    rec.status, rec.reason, rec.finished_at = status, reason, time.time()  # type: ignore[assignment]
    out(
        rec,
        TaskFailed(
            tenant=rec.tenant, task_id=rec.task_id, reason=reason, failed_step=failed_step, **outcome_fields(rec)
        ),
        key="failed",
    )
    event(rec, "task.failed", reason)


def check_request(rec: TaskRecord, answer_of: str = "", attempt: int = 0) -> CheckRequested:
    """Every step result and the final answer, with the task's policy. Citations are owed when
    the policy says so, or by default when some other step's output cites retrieved passages
    (the answer then builds on documents and must carry their citations forward). A step that
    searched but answered from a note or a web page leaves nothing to cite. ``answer_of``: the
    output of that step is the answer (a check node's), the steps completed so far its evidence."""
    if answer_of:
        sid = answer_of
        answer, citations = rec.steps[sid].output, list(rec.steps[sid].citations)
    else:
        answer, citations = final_answer(rec)
        sid = answer_step_id(rec)
    require = rec.policy.require_citations
    if require is None:  # owed when the answer builds on a step that cited documents
        require = any(REFERENCE.search(s.output) for k, s in rec.steps.items() if k != sid and s.citations)
    versions = dict(rec.prompt_versions)
    if rec.steps[sid].prompt_version:
        versions["worker"] = rec.steps[sid].prompt_version
    return CheckRequested(
        tenant=rec.tenant,
        task_id=rec.task_id,
        attempt=attempt or rec.check_attempt,
        started_at=rec.created_at,
        goal=rec.goal,
        answer=answer,
        citations=tuple(citations),
        require_citations=require,
        max_length=rec.policy.max_length,
        policy=rec.policy,
        answer_step=sid,
        prompt_versions=versions,
        steps=tuple(
            StepResult(
                step_id=k,
                kind=s.step.kind,
                output=s.output,
                citations=tuple(s.citations),
                output_schema=s.step.output_schema,
                tools=tuple(s.tools),
                models=tuple(s.models),
                prompt_version=s.prompt_version,
            )
            for k, s in rec.steps.items()
            if not s.skipped and not s.wait and s.status == "completed"  # a branch not taken, a wait: no work to check
        ),
        replay=rec.replay,
    )


def redo_after(rec: TaskRecord, verdict: CheckVerdict) -> list[str]:
    """Steps to run again after a failed verdict: each step whose own result failed a check and
    every step that depends on it (in plan order), or the answer step alone."""
    bad = {s for s in verdict.failed_steps if s in rec.steps}
    if not bad:
        return [answer_step_id(rec)]
    redo: list[str] = []
    for sid, s in rec.steps.items():  # plan order is dependency order
        if s.wait:
            continue  # a timer that fired, a signal received: waited for once
        if sid in bad or bad & set(s.step.depends_on) or set(redo) & set(s.step.depends_on):
            redo.append(sid)
    return redo
