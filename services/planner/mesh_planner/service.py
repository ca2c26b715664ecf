"""Planner handlers: plan a submitted task, dispatch ready steps, decide the outcome.

Every handler is a state transition on the task record (compare-and-set in KV). The
messages a transition decides are written into the record's outbox in the same write,
then published with deterministic ids, then removed from the outbox. A crash anywhere
leaves either nothing done or an outbox that the next delivery flushes: no decision is
lost and the server's dedup window absorbs republishing.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from mesh_agent import prompts
from mesh_agent import releases as bundles
from mesh_agent.metered import BudgetExceeded, Models, call_model_once, configured
from mesh_contracts import Contract
from mesh_contracts import topology as topo
from mesh_contracts.registry import BY_TYPE
from mesh_contracts.v1 import (
    CheckRequested,
    CheckVerdict,
    Citation,
    ControlCancel,
    ControlHalt,
    ControlResume,
    FixedCall,
    PlanCreated,
    PlanDrafted,
    PlanReviewed,
    PlanStep,
    ProgressEvent,
    ReleaseChange,
    ReleaseChanged,
    ReleaseDecided,
    Replay,
    SignedRecord,
    StepCompleted,
    StepFailed,
    StepRequested,
    StepResult,
    TaskCompleted,
    TaskFailed,
    TaskRejected,
    TaskSignal,
    TaskSubmitted,
    WorkflowChange,
    WorkflowChanged,
)
from mesh_contracts.v1.records import (
    GUARDED,
    TERMINAL,
    AdmissionRecord,
    Evidence,
    OutboxItem,
    SignalState,
    StatusRecord,
    StepState,
    TaskRecord,
    WaitState,
)
from mesh_contracts.v1.task import draft_hash
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
    advance,
    not_runnable,
    output_value,
    render,
)
from mesh_durable import chain, guard
from mesh_durable.ledger import BUCKET as LEDGER
from mesh_durable.ledger import Ledger
from mesh_kit import Delivery, Mesh, Park
from mesh_kit import envelope as env
from mesh_kit import state as st
from mesh_kit import telemetry as tel
from mesh_kit.delivery import Reject
from mesh_kit.state import Bundles
from mesh_kit.view import KeyView
from mesh_llm import ChatModel, ContextOverflow, Message, ModelRequest, UnknownRoute
from mesh_planner import releases as rel
from mesh_planner import waits
from mesh_planner.admission import Admission, Limits, StoreLevel, Wait, parse_tenants
from mesh_planner.planning import PlanningSlots
from mesh_planner.releases import Releases
from mesh_planner.settings import PlannerSettings
from mesh_planner.timers import Early, Timers
from mesh_planner.workflows import Refused, Registry, may_change

log = logging.getLogger("mesh.planner")
RETRIEVAL = "search_docs"
"""The tool a step retrieves with (the worker sends it to rag)."""
REFERENCE = re.compile(r"\[[^\[\]#\s]+#[^\[\]\s]+\]")
PLAN_PROMPT = prompts.load("mesh_planner", "plan")
"""The packaged planning prompt; a planner plans with it or with its ``MESH_PROMPTS_DIR``
override (``Planner.plan_prompt``)."""


def _out(rec: TaskRecord, msg: Contract, key: str, causation: str = "") -> None:
    rec.outbox.append(OutboxItem(type=msg.type, key=key, body=msg.model_dump(mode="json"), causation=causation))


def _event(rec: TaskRecord, stage: str, message: str, step_id: str = "", key: str = "") -> None:
    _out(
        rec,
        ProgressEvent(
            tenant=rec.tenant, task_id=rec.task_id, source="planner", stage=stage, message=message, step_id=step_id
        ),
        key=f"planner:{stage}:{step_id}:{key}",
    )


def _replaying(r: Replay) -> str:
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
    _out(rec, request, key=f"{sid}:{s.attempt}", causation=causation)
    _event(rec, "step.dispatched", f"{sid} ({s.step.kind}): {s.step.instruction[:80]}", sid, str(s.attempt))


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
        _event(rec, "step.skipped", f"{sid}: {s.reason}", sid)
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
    _out(rec, request, key=f"{node.id}:{s.attempt}", causation=causation)
    _event(rec, "check.requested", f"{node.id}: {', '.join(node.checks)} on {node.of}", node.id, str(s.attempt))


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
    _out(
        rec,
        TaskFailed(
            tenant=rec.tenant, task_id=rec.task_id, reason=reason, failed_step=failed_step, **outcome_fields(rec)
        ),
        key="failed",
    )
    _event(rec, "task.failed", reason)


def plan_max_tokens(max_steps: int) -> int:
    return min(1024, 128 + 96 * max_steps)


def parse_plan(text: str, max_steps: int) -> list[PlanStep]:
    try:
        raw = json.loads(text)["steps"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"planner model returned an unusable plan: {str(exc)[:200]}") from None
    try:
        return checked_plan(raw, max_steps)
    except ValidationError as exc:
        raise ValueError(f"planner model returned an unusable plan: {str(exc)[:200]}") from None


def checked_plan(raw: Any, max_steps: int) -> list[PlanStep]:
    """Steps as a plan must have them (the model's, or a reviewer's edit): unique ids, each after
    the steps it depends on, at most ``max_steps``; ValueError (ValidationError: a bad step) if not."""
    if not isinstance(raw, list):
        raise ValueError("a plan is a list of steps")
    steps = [PlanStep.model_validate(s) for s in raw]
    ids = [s.step_id for s in steps]
    if not steps or len(set(ids)) != len(ids):
        raise ValueError("plan has no steps or repeats a step id")
    if len(steps) > max_steps:
        raise ValueError(f"plan has {len(steps)} steps, over the task's limit of {max_steps}")
    for s in steps:
        unknown = [d for d in s.depends_on if d not in ids or ids.index(d) >= ids.index(s.step_id)]
        if unknown:
            raise ValueError(f"step {s.step_id} depends on {unknown}, which are not earlier steps")
    return steps


def workflow_edit_problem(wf: WorkflowDefinition, old: list[PlanStep], new: list[PlanStep]) -> str | None:
    """Why ``new`` is not an edit a workflow's draft may take (None: it is): the same nodes, in
    the same order, with the same kinds, tools, calls and edges; only what an agent node is told
    (its instruction) may change. The workflow is the contract the reviewer approves."""
    if [s.step_id for s in old] != [s.step_id for s in new]:
        return f"its nodes are {', '.join(s.step_id for s in old)}; an edit may not add, remove or reorder nodes"
    for a, b in zip(old, new, strict=True):
        for field in ("kind", "tools", "depends_on", "difficulty", "output_schema", "call"):
            if getattr(a, field) != getattr(b, field):
                verb = "are" if field.endswith("s") else "is"
                return (
                    f"node {a.step_id}: {field} {verb} fixed by the workflow; an edit may change only what it is told"
                )
        if a.instruction != b.instruction and wf.node(a.step_id).kind != "agent":
            return f"node {a.step_id} is not an agent node: its instruction is the workflow's"
    return None


def draft(rec: TaskRecord, steps: list[PlanStep], *, causation: str, editor: str = "") -> None:
    """Make ``steps`` the task's draft plan, waiting for a reviewer (the task stays ``planning``)."""
    before = list(rec.draft)
    rec.draft, rec.draft_hash = steps, draft_hash(steps)
    rec.draft_revision += 1
    changes = plan_changes(before, steps) if editor else []
    _out(
        rec,
        PlanDrafted(tenant=rec.tenant, task_id=rec.task_id, steps=tuple(steps), draft=rec.draft_hash,
                    revision=rec.draft_revision, edited_by=editor, changes=tuple(changes), workflow=rec.workflow),
        key=f"draft:{rec.draft_hash}", causation=causation,
    )  # fmt: skip
    by = f"edited by {editor} ({len(changes)} change(s)); " if editor else ""
    _event(rec, "plan.review", f"draft {rec.draft_hash} ({len(steps)} steps) {by}waits for a reviewer: meshctl review "
           f"approve {rec.task_id} --tenant {rec.tenant} --as <approver>", key=rec.draft_hash)  # fmt: skip


def plan_changes(old: list[PlanStep], new: list[PlanStep]) -> list[str]:
    """What an edit changed, step by step: ``+ s3``, ``- s2``, ``~ s1.instruction: "a" -> "b"``."""
    a, b = {s.step_id: s.model_dump(mode="json") for s in old}, {s.step_id: s.model_dump(mode="json") for s in new}
    out = [f"- {i}" for i in a if i not in b] + [f"+ {i}: {b[i]['instruction'][:80]}" for i in b if i not in a]
    for i in (i for i in b if i in a and a[i] != b[i]):
        out += [f"~ {i}.{k}: {json.dumps(a[i].get(k))[:80]} -> {json.dumps(b[i].get(k))[:80]}"
                for k in sorted(set(a[i]) | set(b[i])) if a[i].get(k) != b[i].get(k)]  # fmt: skip
    if not out and [s.step_id for s in old] != [s.step_id for s in new]:
        out.append("~ order: " + ", ".join(s.step_id for s in new))
    return out


SENDING, SENT = "sending", "sent"
SENT_KEPT = 20_000
"""Outbox items a planner remembers publishing (the oldest are forgotten first; a forgotten one
still in a record is only published again, and the stream drops the copy)."""

CHECK_RETRIEVALS_MAX_BYTES = 3 * 1024 * 1024
"""Retrieval records one check request carries at most (under the contract's 4 MB); they are
added when the request is published (``Planner.with_evidence``)."""


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


class NeedWorkflow(Exception):
    """A transition of a workflow task needs the definition of its pinned version (``ref``)."""

    def __init__(self, ref: str) -> None:
        super().__init__(ref)
        self.ref = ref


class Planner:
    def __init__(self, mesh: Mesh, model: ChatModel | Models, settings: PlannerSettings | None = None) -> None:
        self.mesh = mesh
        self.audit = chain.of(mesh)
        self.model = model
        self.settings = settings if settings is not None else PlannerSettings.defaults()
        self.plan_prompt = prompts.load("mesh_planner", "plan", self.settings.prompts_dir)
        self.kv: Any = None
        self.ledger: Ledger | None = None
        self.status: Any = None  # ``status`` bucket: what every service's guard reads
        self.evidence: Any = None  # ``evidence`` bucket: the retrieval records the checker gets
        self.admission: Admission | None = None
        self.store: StoreLevel | None = None
        self.planning: PlanningSlots | None = None
        self.workflows: Registry | None = None
        self.releases: Releases | None = None
        self.channels: KeyView | None = None
        self.bundles: Bundles | None = None
        self._release_of: OrderedDict[tuple[str, str], str] = OrderedDict()
        """The release each task this process admitted runs (its planning reads the bundle)."""
        self.timers: Timers | None = None
        self._sent: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        """Outbox items (task, type, key) this process is publishing (SENDING) or has published (SENT)."""
        self._to_plan: set[tuple[str, str]] = set()
        """Submissions this process admitted, made a record for and parked for a planning slot."""
        self._waited: set[tuple[str, str]] = set()
        """Tasks this replica set to wait for a run slot (asked again, they may have been cancelled meanwhile)."""

    async def start(self) -> None:
        self.kv = await self.mesh.kv("tasks")
        self.status = await self.mesh.kv(StatusRecord.bucket)
        self.evidence = await self.mesh.kv(Evidence.bucket)
        s = self.settings
        default = Limits(s.admission_max_in_flight, s.admission_rate_per_s, s.admission_burst)
        self.admission = Admission(
            await self.mesh.kv(AdmissionRecord.bucket),
            default,
            parse_tenants(s.admission_tenants, default),
            slots=s.run_slots,
            alone=s.run_slots_alone,
        )
        await self.admission.follow(self.mesh.nc)
        self.ledger = Ledger(await self.mesh.kv(LEDGER), self.mesh.service)
        streams = [*topo.STREAMS.values(), topo.DLQ_STREAM]
        self.store = StoreLevel(self.mesh.nc.jetstream(), streams, s.store_high_water, s.store_retry_after_s)
        self.planning = PlanningSlots(s.planning_slots or max(1, self.mesh.settings.max_workers - 1))
        self.workflows = Registry(await self.mesh.kv("workflows"))
        kv = await self.mesh.kv("releases")
        gateway = getattr(self.model, "gateway", self.model)
        routes = getattr(gateway, "routes", None)
        self.channels = KeyView(self.mesh.nc, kv, "releases", max_age_s=self.mesh.settings.guard_view_s)
        await self.channels.start()
        self.releases = Releases(kv, frozenset(routes) if isinstance(routes, dict) else None, self.channels)
        self.bundles = Bundles(kv)

    async def start_timers(self) -> None:
        """Take the wake-ups the broker fires (``register``: started and stopped with the mesh)."""
        ms = self.mesh.settings
        self.timers = Timers(self.mesh, self.on_wake, ack_wait_s=ms.ack_wait_s, graceful_s=ms.graceful_timeout_s)
        await self.timers.start()

    def register(self) -> None:
        m = self.mesh
        guard.enable(m)
        m.on_start(self.start)
        m.on_start(self.start_timers)
        m.on_stop(self.stop)
        m.on_stop(self.stop_timers, connected=True)
        m.consume(TaskSubmitted, self.on_submitted, on_reject=self.on_rejected)
        m.consume(StepCompleted, self.on_step_completed)
        m.consume(StepFailed, self.on_step_failed)
        m.consume(CheckVerdict, self.on_verdict)
        m.consume(WorkflowChange, self.on_workflow_change)
        m.consume(ReleaseChange, self.on_release_change)
        m.consume(PlanReviewed, self.on_reviewed)
        m.consume(TaskSignal, self.on_signal)
        m.consume(ControlCancel, self.on_control)
        m.consume(ControlHalt, self.on_control)
        m.consume(ControlResume, self.on_control)

    async def stop_timers(self) -> None:
        if self.timers is not None:
            await self.timers.stop()

    async def stop(self) -> None:
        if self.admission is not None:
            await self.admission.close()
        if self.channels is not None:
            await self.channels.stop()

    # --- transitions ----------------------------------------------------------------------

    async def transition(self, tenant: str, task_id: str, fn: Callable[[TaskRecord], bool]) -> TaskRecord | None:
        """Apply ``fn`` (returns whether it changed the record), then flush the outbox."""

        was, was_idle = "", False

        def mutate(rec: TaskRecord | None) -> TaskRecord | None:
            nonlocal was, was_idle
            if rec is None:
                return None
            was, was_idle = rec.status, waits.idle(rec)
            if not fn(rec):
                return None
            if rec.status in TERMINAL and rec.waits:
                waits.abandon_all(rec)  # their wake-ups, when they fire, find nothing to do
            return rec

        try:
            rec, _ = await st.update(self.kv, TaskRecord.key(tenant, task_id), TaskRecord, mutate)
        except NeedWorkflow as need:  # its definition, read once (a version never changes), then again
            assert self.workflows is not None
            await self.workflows.pinned(tenant, need.ref)
            rec, _ = await st.update(self.kv, TaskRecord.key(tenant, task_id), TaskRecord, mutate)
        if rec is not None:
            if rec.status != was:
                await self.publish_status(rec, was)
                if rec.status in TERMINAL:
                    await self.release(rec)
                    await self.observe_release(rec)
            if rec.status not in TERMINAL and self.admission is not None:
                idle = waits.idle(rec)
                # Changed now, or (a crash between the two writes) the tenant's record still says otherwise.
                if idle != was_idle or idle != self.admission.idle_as_seen(rec.tenant, rec.task_id):
                    self.admission.mark_idle(rec.tenant, rec.task_id, idle)  # written in the background
            await self.flush(rec)
        return rec

    def definition(self, rec: TaskRecord) -> WorkflowDefinition | None:
        """The workflow a task runs (None: its plan is the model's). Inside a transition: a
        definition not read yet raises ``NeedWorkflow``, and the transition reads it and runs again."""
        if not rec.workflow:
            return None
        wf = self.workflows.cached(rec.workflow) if self.workflows is not None else None
        if wf is None:
            raise NeedWorkflow(rec.workflow)
        return wf

    def dispatch(self, rec: TaskRecord, causation: str = "") -> None:
        wf = self.definition(rec)
        if wf is None:
            dispatch_ready(rec, causation)
        else:
            dispatch_workflow(rec, wf, causation)

    async def release(self, rec: TaskRecord) -> None:
        """The task ended: it no longer counts against its tenant's tasks in flight."""
        if self.admission is not None:
            await self.admission.release(rec.tenant, rec.task_id, max(0.0, time.time() - rec.created_at))

    async def publish_status(self, rec: TaskRecord, was: str, *, starts: bool = False) -> None:
        """Tell every service's guard (``status`` bucket) when a task stops or resumes: a halt, an
        end, a resume from a halt; and the budget when it starts (``starts``: before its first
        model call), with its limits and labels. Nothing of the task's content goes there, so the
        services that only need to know whether to stop, or what a task may spend, hold no right
        to read task records."""
        if self.status is None or not (starts or rec.status in GUARDED or was == "halted"):
            return
        status = StatusRecord(
            status=rec.status,
            reason=rec.reason,
            created_at=rec.created_at,
            limits=rec.limits,
            labels=rec.labels,
            step_shares=rec.step_shares,
        )
        await self.status.put(TaskRecord.key(rec.tenant, rec.task_id), status.to_bytes())

    async def flush(self, rec: TaskRecord) -> None:
        """Publish the record's outbox, then remove what was published from the stored record.

        Items this process has already published (or is publishing right now, in another
        handler) are not sent again: two transitions of one task in a row, the second written
        before the first's outbox was cleared, used to publish the first's messages twice (the
        stream dropped the copies; a client following the task saw its events twice). Items of
        unknown fate (written by a process that died) are published again: that is the repair."""
        if not rec.outbox:
            return
        task = TaskRecord.key(rec.tenant, rec.task_id)
        done = set()
        for item in rec.outbox:
            mark = (task, item.type, item.key)
            state = self._sent.get(mark)
            if state == SENT:
                done.add((item.type, item.key))
                continue
            if state == SENDING:
                continue  # another handler of this process has it: it clears it once sent
            self._sent[mark] = SENDING
            try:
                if item.type == waits.WAKE:
                    assert self.timers is not None
                    await self.timers.schedule(rec.tenant, rec.task_id, item.key, float(item.body["due_at"]))
                    self._sent[mark] = SENT
                    done.add((item.type, item.key))
                    continue
                cls = BY_TYPE[(item.type, 1)]
                msg = cls.model_validate(item.body)
                if isinstance(msg, CheckRequested):
                    msg = await self.with_evidence(msg, rec)
                with env.releasing(rec.tenant, rec.task_id, rec.release):
                    await self.mesh.publish(msg, key=item.key, causation=item.causation or None,
                                            priority=rec.priority)  # fmt: skip
            except BaseException:
                self._sent.pop(mark, None)
                raise
            self._sent[mark] = SENT
            self._sent.move_to_end(mark)
            while len(self._sent) > SENT_KEPT:
                self._sent.popitem(last=False)
            done.add((item.type, item.key))

        def clear(r: TaskRecord | None) -> TaskRecord | None:
            if r is None or not any((i.type, i.key) in done for i in r.outbox):
                return None
            r.outbox = [i for i in r.outbox if (i.type, i.key) not in done]
            return r

        await st.update(self.kv, task, TaskRecord, clear)

    async def with_evidence(self, m: CheckRequested, rec: TaskRecord) -> CheckRequested:
        """The check request with each step's retrieval records, as the worker handed them on (kept
        in the planner's own ``evidence`` bucket, not in the task record, which other services
        read). Deterministic: a re-flush sends the same body."""
        if self.evidence is None:
            return m
        room = CHECK_RETRIEVALS_MAX_BYTES
        steps = []
        for s in m.steps:
            state = rec.steps.get(s.step_id)
            records: tuple[SignedRecord, ...] = ()
            if state is not None:
                found = await st.evidence(self.evidence, m.tenant, m.task_id, s.step_id, state.attempt)
                if found is not None:
                    kept = []
                    for r in found.records:
                        room -= len(r.body) + len(r.token)
                        if room < 0:
                            break
                        kept.append(r)
                    records = tuple(kept)
            steps.append(s.model_copy(update={"retrievals": records}))
        return m.model_copy(update={"steps": tuple(steps)})

    # --- handlers -------------------------------------------------------------------------

    async def on_rejected(self, tenant: str, task_id: str, subject: str, reason: str) -> None:
        if not subject.startswith("task."):
            return
        if subject.endswith(".submitted") and self.admission is not None:
            # given up on (a poison submission): if it was admitted, it no longer counts
            await self.admission.release(tenant, task_id, None)
        await self.mesh.publish(
            TaskRejected(tenant=tenant, task_id=task_id, reason=reason, source_subject=subject), key="rejected"
        )

    async def on_submitted(self, m: TaskSubmitted, d: Delivery) -> None:
        try:
            await self._on_submitted(m, d)
        finally:
            if self.planning is not None:
                self.planning.unclaimed(m.tenant, m.task_id)

    async def _on_submitted(self, m: TaskSubmitted, d: Delivery) -> None:
        key = TaskRecord.key(m.tenant, m.task_id)
        if (m.tenant, m.task_id) in self._to_plan:
            # Back from waiting for a planning slot: admitted and its record made, by this
            # process; straight to its plan (a task cancelled meanwhile is not planned: the guard
            # refuses the call, and the plan is applied only to a record still planning).
            await self._plan_in_turn(m, d, key)
            return
        if (m.tenant, m.task_id) in self._waited:
            # Back from waiting for a run slot: it may have been cancelled meanwhile (a queue
            # limit, an operator), and then it has a record and must not count again. Released
            # again: a replica that took the submission over after the cancel admitted it anew.
            self._waited.discard((m.tenant, m.task_id))
            rec = await st.task_record(self.kv, m.tenant, m.task_id)
            if rec is not None and rec.status in TERMINAL:
                await self.release(rec)
                return
        pinned = ""
        shares: dict[str, float] = {}
        if m.workflow is None and self.fixed(m.tenant) and await st.task_record(self.kv, m.tenant, m.task_id) is None:
            await self._refuse_workflow(m, d, f"tenant {m.tenant} runs registered workflows only (MESH_PLAN_FIXED): "
                                        "name one (meshctl submit --workflow NAME)")  # fmt: skip
            return
        if m.workflow is not None:
            try:
                pinned, shares = await self._resolve(m)
            except Refused as exc:
                if await st.task_record(self.kv, m.tenant, m.task_id) is None:
                    await self._refuse_workflow(m, d, str(exc))
                    return
                # a redelivered submission of a task that started it: it runs on with its version
        refusal = await self.store.over() if self.store is not None else None
        if refusal is not None and await st.task_record(self.kv, m.tenant, m.task_id) is not None:
            refusal = None  # a redelivered submission of a task already in flight: it goes on
        elif refusal is not None and self.admission is not None:
            self.admission.refused(m.tenant, refusal.code)
        if refusal is None and self.admission is not None:
            decision = await self.admission.admit(m.tenant, m.task_id, m.limits.deadline_s, priority=m.priority)
            if isinstance(decision, Wait):
                # Admitted; its tenant is at its share of the run slots: the submission waits,
                # not taken up (queued, as the budget sees it), until one is free for it.
                if (m.tenant, m.task_id) not in self._waited:
                    self.mesh.count(tel.M_SLOT_WAITS, {"tenant": m.tenant})
                self._waited.add((m.tenant, m.task_id))
                raise Park(decision.until, f"{key} waits for a run slot")
            refusal = decision
        if refusal is not None:
            self.mesh.count(tel.M_REFUSED, {"tenant": m.tenant, "code": refusal.code})
            log.info("refused %s: %s (retry after %.2fs)", key, refusal.reason, refusal.retry_after_s)
            await self.mesh.publish(
                TaskRejected(
                    tenant=m.tenant, task_id=m.task_id, reason=refusal.reason, source_subject=d.subject,
                    code=refusal.code, retry_after_s=refusal.retry_after_s,
                ),
                key=f"refused:{d.msg_id}", causation=d.msg_id,
            )  # fmt: skip
            return

        release, how = "", ""
        if self.releases is not None:  # (a redelivery's record keeps the version it was admitted with)
            try:
                release, how = await self.releases.choose(m.tenant, m.task_id, m.release)
            except rel.Refused as exc:
                await self._refuse_workflow(m, d, str(exc))
                return
        plan_prompt, _ = await self._plan_prompt(m, release)

        def create(rec: TaskRecord | None) -> TaskRecord | None:
            if rec is not None:
                return None  # a redelivery or a duplicate submission of the same task id
            new = TaskRecord(
                tenant=m.tenant, task_id=m.task_id, goal=m.goal, limits=m.limits, policy=m.policy,
                created_at=time.time(), prompt_versions={} if pinned else {"planner": plan_prompt.ref},
                priority=m.priority, labels=m.labels, replay=m.replay, workflow=pinned, inputs=m.inputs,
                step_shares=shares, release=release,
            )  # fmt: skip
            _event(new, "task.accepted", m.goal[:120])
            if release:
                _event(new, "release.chosen", f"runs release {release} ({how})")
            if pinned:
                _event(new, "workflow.pinned", f"runs {pinned} (its nodes as defined: no plan of the model's)")
            if m.replay is not None:
                _event(new, "task.replay", _replaying(m.replay))
            return new

        rec, created = await st.update(self.kv, key, TaskRecord, create)
        assert rec is not None
        self._remember_release(m.tenant, m.task_id, rec.release)
        if created:
            self.mesh.count(tel.M_ADMITTED, {"tenant": m.tenant})
        elif rec.status in TERMINAL:
            await self.release(rec)  # a late duplicate of an ended task: admitting it again was a no-op
        if not created and rec.goal and rec.goal != m.goal:  # (no goal: cancelled before it started)
            log.warning("task id %s reused with a different goal; ignoring the new submission", key)
            return
        await self.flush(rec)
        if rec.status != "planning":
            return
        if created or d.deliveries > 1:
            # Before the plan's model call (the budget reserves it from this); again by a
            # redelivered submission, in case the planner that created the record died before it.
            await self.publish_status(rec, rec.status, starts=True)
        elif await st.task_status(self.status, m.tenant, m.task_id) is None:
            # A duplicate copy delivered for the first time (the client published again across a
            # broker restart): its creator normally wrote the record, but that write may have
            # failed (the broker going down), its own redelivery comes later, and this copy would
            # plan the task meanwhile. The broker chaos drill lost a task to that ('unknown task').
            await self.publish_status(rec, rec.status, starts=True)
        if rec.workflow:
            # On the tenant's chain: which version the task runs, whoever publishes what next.
            await self.audit.append(
                m.tenant, m.task_id, "task.workflow", f"{m.task_id}:workflow", actor=d.sender.name, source=d.msg_id,
                detail={"workflow": rec.workflow, "named": m.workflow or ""},
            )  # fmt: skip
            await self._plan_workflow(m, d)  # no model call: no planning slot
            return
        await self._plan_in_turn(m, d, key)

    async def _resolve(self, m: TaskSubmitted) -> tuple[str, dict[str, float]]:
        """``name@version`` of the workflow the submission names, and its nodes' budget shares
        (``Refused``: why it cannot run)."""
        assert self.workflows is not None and m.workflow is not None
        found = await self.workflows.resolve(m.tenant, m.workflow, m.inputs)
        gaps = not_runnable(found.definition)
        if gaps:
            raise Refused(f"workflow {found.ref} cannot run on this planner yet: {'; '.join(gaps)}")
        if len(found.definition.nodes) > m.limits.max_steps:
            raise Refused(
                f"workflow {found.ref} has {len(found.definition.nodes)} nodes, over the task's max_steps "
                f"({m.limits.max_steps}): submit it with a higher limit"
            )
        return found.ref, {n.id: n.budget_share for n in found.definition.nodes if n.budget_share is not None}

    async def _refuse_workflow(self, m: TaskSubmitted, d: Delivery, reason: str) -> None:
        """A submission whose workflow cannot run: refused, nothing ran. Usually before admission;
        but one that waited for a run slot was admitted, and its version may have been withdrawn
        meanwhile: it no longer counts in flight."""
        if self.admission is not None:
            self.admission.refused(m.tenant, "invalid")
            await self.admission.release(m.tenant, m.task_id, None)  # if it was admitted (as on_rejected)
        self.mesh.count(tel.M_REFUSED, {"tenant": m.tenant, "code": "invalid"})
        await self.mesh.publish(
            TaskRejected(tenant=m.tenant, task_id=m.task_id, reason=reason, source_subject=d.subject, code="invalid"),
            key=f"refused:{d.msg_id}", causation=d.msg_id,
        )  # fmt: skip

    async def _plan_workflow(self, m: TaskSubmitted, d: Delivery) -> None:
        """A fixed workflow's plan: its nodes, as they are (the model adds and removes nothing)."""

        def planned(rec: TaskRecord) -> bool:
            if rec.status != "planning" or rec.draft:
                return False
            wf = self.definition(rec)
            assert wf is not None
            steps = workflow_steps(wf)
            if wf.mode == "review":  # its nodes wait for one of the tenant's reviewers
                draft(rec, steps, causation=d.msg_id)
                return True
            self.start_workflow(rec, wf, steps, d.msg_id)
            return True

        await self.transition(m.tenant, m.task_id, planned)

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
        _out(rec, PlanCreated(tenant=rec.tenant, task_id=rec.task_id, steps=tuple(steps), workflow=rec.workflow,
                              reviewed=reviewed), key="r1", causation=causation)  # fmt: skip
        how = f", as approved by {reviewed}" if reviewed else ""
        _event(rec, "plan.created", f"{rec.workflow}: {len(steps)} nodes{how}: " + ", ".join(s.step_id for s in steps))
        self.settle(rec, causation)

    async def on_workflow_change(self, m: WorkflowChange, d: Delivery) -> None:
        """An author's change to the tenant's workflows (``mesh_planner.workflows``): applied or
        refused, on the tenant's audit chain either way, and answered on the change's id."""
        assert self.workflows is not None
        if m.author != d.sender.name:
            raise Reject(f"author {m.author!r} is not the signer {d.sender.name!r}")
        why = may_change(await self.mesh.newest_trust(), d.sender, m.tenant)
        answer: WorkflowChanged | None = None
        if why is None:
            try:
                answer = await self.workflows.apply(m, m.task_id)
            except Refused as exc:
                why = str(exc)
        detail: dict[str, Any] = {"action": m.action, "name": m.name, "version": m.version, "reason": m.reason}
        if answer is None:
            answer = WorkflowChanged(
                tenant=m.tenant, task_id=m.task_id, action=m.action, name=m.name, version=m.version, accepted=False,
                reason=why or "",
            )  # fmt: skip
        else:
            detail.update(version=answer.version, status=answer.status, latest=answer.latest, changed=answer.changed)
        await self._answer_change("workflow", m, d, answer, detail)

    async def _answer_change(self, what: str, m: Contract, d: Delivery, answer: Any, detail: dict[str, Any]) -> None:
        """A person's change to the tenant's workflows or releases, on its audit chain
        (``<what>.<action>``, or ``<what>.change-refused`` with why), then answered on its id."""
        action = str(getattr(m, "action", ""))
        if answer.accepted:
            kind, key = f"{what}.{action}", f"{m.task_id}:{action}"
        else:
            kind, key, detail = f"{what}.change-refused", f"{m.task_id}:refused", {**detail, "refused": answer.reason}
        await self.audit.append(m.tenant, m.task_id, kind, key, actor=d.sender.name, source=d.msg_id, detail=detail)
        await self.mesh.publish(answer, key="changed", causation=d.msg_id)

    async def _plan_prompt(self, m: TaskSubmitted, release: str) -> tuple[prompts.Prompt, str]:
        """The planning prompt for the task: its release's (a replay may name another version), and
        why it cannot be planned if that version is not here."""
        current = bundles.prompt(self.plan_prompt, await self._bundle(m.tenant, release), release)
        if m.replay is None:
            return current, ""
        try:
            return prompts.chosen(current, m.replay.prompts, self.settings.prompts_dir), ""
        except prompts.PromptError as exc:
            return current, f"prompt: {exc}"

    async def _bundle(self, tenant: str, release: str) -> Any:
        return await self.bundles.bundle(tenant, release) if self.bundles is not None and release else None

    def _remember_release(self, tenant: str, task_id: str, release: str) -> None:
        self._release_of[(tenant, task_id)] = release
        self._release_of.move_to_end((tenant, task_id))
        while len(self._release_of) > SENT_KEPT:
            self._release_of.popitem(last=False)

    async def _release_of_task(self, tenant: str, task_id: str) -> str:
        known = self._release_of.get((tenant, task_id))
        if known is not None:
            return known
        rec = await st.task_record(self.kv, tenant, task_id)
        return rec.release if rec is not None else ""

    async def on_release_change(self, m: ReleaseChange, d: Delivery) -> None:
        """A person's change to the tenant's releases (``mesh_planner.releases``): applied or
        refused, on the tenant's audit chain either way, and answered on the change's id."""
        assert self.releases is not None
        if m.by != d.sender.name:
            raise Reject(f"{m.by!r} is not the signer {d.sender.name!r}")
        why = rel.may_change(await self.mesh.newest_trust(), d.sender, m.tenant, m.action)
        answer: ReleaseChanged | None = None
        decided: list[Any] = []
        if why is None:
            try:
                answer, decided = await self.releases.apply(m, m.task_id)
            except rel.Refused as exc:
                why = str(exc)
        detail = {"action": m.action, "version": m.version, "share": m.share, "forced": m.force, "reason": m.reason}
        if m.evaluation is not None:
            detail["evaluation"] = {
                "verdict": m.evaluation.verdict,
                "cases": m.evaluation.cases,
                "passed": m.evaluation.passed,
                "regressions": list(m.evaluation.regressions),
            }
        if answer is None:
            answer = ReleaseChanged(tenant=m.tenant, task_id=m.task_id, action=m.action, version=m.version,
                                    accepted=False, reason=why or "")  # fmt: skip
        else:
            detail.update(version=answer.version, current=answer.current, canary=answer.canary, changed=answer.changed)
        await self._answer_change("release", m, d, answer, detail)
        if decided:
            await self.announce(m.tenant, decided)

    async def observe_release(self, rec: TaskRecord) -> None:
        """An ended task counts in its tenant's canary; a decision it brings is announced."""
        if self.releases is None:
            return
        try:
            decided = await self.releases.observe(rec)
        except Exception:
            log.exception("release observation of %s/%s failed", rec.tenant, rec.task_id)
            return
        if decided:
            await self.announce(rec.tenant, decided)

    async def announce(self, tenant: str, decided: list[Any]) -> None:
        """Each decision on the tenant's audit chain and as ``release.decided`` (idempotent: keyed
        by the decision), then cleared from the channel's unannounced list."""
        assert self.releases is not None
        for e in decided:
            self.mesh.count(tel.M_RELEASE_DECISIONS, {"tenant": tenant, "decision": e.action})
            log.warning("release %s of tenant %s %s by %s: %s", e.version, tenant, e.action, e.by, e.reason)
            detail = {"version": e.version, "current": e.current, "tasks": e.tasks, "bad": e.bad, "llr": e.llr,
                      "lower": e.lower, "upper": e.upper, "reason": e.reason}  # fmt: skip
            await self.audit.append(tenant, e.change_id, f"release.{e.action}", e.change_id, actor=e.by, detail=detail)
            await self.mesh.publish(
                ReleaseDecided(tenant=tenant, task_id=e.change_id, decision=e.action, version=e.version,
                               current=e.current, by=e.by, tasks=e.tasks, bad=e.bad, llr=e.llr, lower=e.lower,
                               upper=e.upper, reason=e.reason[:2000]),
                key="decided",
            )  # fmt: skip
        await self.releases.announced(tenant, decided)

    async def _plan_in_turn(self, m: TaskSubmitted, d: Delivery, key: str) -> None:
        """Plan the task in a planning slot, or wait for one parked: out of the fetch window (so
        later submissions, another tenant's too, are still fetched) for its tenant's turn."""
        planning, task = self.planning, (m.tenant, m.task_id)
        if planning is not None and not planning.take(m.tenant, m.task_id):
            if task not in self._to_plan:
                self.mesh.count(tel.M_PLANNING_WAITS, {"tenant": m.tenant})
            self._to_plan.add(task)
            raise Park(lambda: planning.wait(m.tenant, m.task_id, m.priority), f"{key} waits for a planning slot")
        self._to_plan.discard(task)
        release = await self._release_of_task(m.tenant, m.task_id)
        plan_prompt, unusable = await self._plan_prompt(m, release)
        route = bundles.route(await self._bundle(m.tenant, release), "planner")
        try:
            with env.releasing(m.tenant, m.task_id, release):
                await self._plan(m, d, plan_prompt, unusable, route)
        finally:
            if planning is not None:
                planning.release(m.tenant, m.task_id)

    async def _plan(
        self, m: TaskSubmitted, d: Delivery, plan_prompt: prompts.Prompt, unusable: str, route: str = ""
    ) -> None:
        """Ask the model for the task's plan and apply it (or fail the task with why not)."""
        request = ModelRequest(
            (Message("system", plan_prompt.render(max_steps=m.limits.max_steps)), Message("user", m.goal)),
            agent="planner",
            prompt_version=plan_prompt.ref,
            # what a plan of max_steps steps can need, not more: the reservation is the worst case
            max_tokens=plan_max_tokens(m.limits.max_steps),
            route=route,
        )
        usage = None
        try:
            if unusable:
                raise ValueError(unusable)  # the replay names a prompt version this planner does not have
            response, usage = await call_model_once(
                self.mesh,
                self.ledger,
                self.model,
                request,
                tenant=m.tenant,
                task_id=m.task_id,
                step_id="plan",
                call_id="plan-r1",
                delivery=d,
                replay=m.replay,
            )
            steps = parse_plan(response.content, m.limits.max_steps)
            error = ""
        except BudgetExceeded as exc:
            steps, usage, error = [], None, exc.describe()
        except (ContextOverflow, UnknownRoute) as exc:  # permanent (other model errors retry)
            steps, usage, error = [], None, f"model: {exc}"
        except ValueError as exc:
            steps, error = [], str(exc)

        def planned(rec: TaskRecord) -> bool:
            if rec.status != "planning" or rec.draft:
                return False  # planned already (a draft waiting for review is planned too)
            if usage is not None:
                rec.planner_usage = rec.planner_usage + usage
            if error:
                fail(rec, error)
                return True
            if self.reviewed(rec.tenant):
                draft(rec, steps, causation=d.msg_id)
                return True
            rec.status = "running"
            rec.steps = {s.step_id: StepState(step=s) for s in steps}
            _out(
                rec,
                PlanCreated(tenant=rec.tenant, task_id=rec.task_id, steps=tuple(steps)),
                key="r1",
                causation=d.msg_id,
            )
            _event(rec, "plan.created", f"{len(steps)} steps: " + ", ".join(f"{s.step_id}:{s.kind}" for s in steps))
            self.dispatch(rec, d.msg_id)
            return True

        rec = await self.transition(m.tenant, m.task_id, planned)
        if rec is not None and rec.status == "planning" and rec.draft_hash:
            await self.audit.append(
                m.tenant, m.task_id, "plan.drafted", f"{m.task_id}:draft:{rec.draft_hash}", actor="planner",
                source=d.msg_id, detail={"draft": rec.draft_hash, "revision": rec.draft_revision, "steps": len(rec.draft)},
            )  # fmt: skip

    def fixed(self, tenant: str) -> bool:
        """Whether the tenant runs registered workflows only (``MESH_PLAN_FIXED``)."""
        names = {t.strip() for t in self.settings.plan_fixed.split(",") if t.strip()}
        return "*" in names or tenant in names

    def reviewed(self, tenant: str) -> bool:
        """Whether the tenant's model-made plans wait for a reviewer (``MESH_PLAN_REVIEW``)."""
        names = {t.strip() for t in self.settings.plan_review.split(",") if t.strip()}
        return "*" in names or tenant in names

    async def on_reviewed(self, m: PlanReviewed, d: Delivery) -> None:
        """A reviewer's decision on the task's waiting draft: approved, it runs exactly as drafted;
        edited, the edit is the new draft (and waits again); rejected, the task fails with why.
        Who may decide is judged as for a held call (the tenant's named approvers, under the newest
        bundle); a decision on a draft that is no longer the one waiting is refused. Every decision,
        refused ones too, is a link of the tenant's audit chain, with the draft's hash."""
        who = d.sender.name
        if m.reviewed_by != who:
            raise Reject(f"reviewed_by {m.reviewed_by!r} is not the signer {who!r}")
        why = (await self.mesh.newest_trust()).may_decide(who, m.tenant)
        outcome: dict[str, str] = {}

        def apply(rec: TaskRecord) -> bool:
            opened = waits.open_approval(rec, m.draft)
            if opened is not None:  # a workflow's approval node, not a draft plan
                return self.decide_approval(rec, opened, m, who, d.msg_id, outcome)
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
                draft(rec, steps, causation=d.msg_id, editor=who)
                outcome["draft"] = rec.draft_hash
                return True
            steps = list(rec.draft)
            if rec.workflow:
                wf = self.definition(rec)
                assert wf is not None
                rec.reviewed_by, rec.draft = who, []
                self.start_workflow(rec, wf, steps, d.msg_id, reviewed=f"{rec.draft_hash} by {who}")
                return True
            rec.status, rec.reviewed_by = "running", who
            rec.steps = {s.step_id: StepState(step=s) for s in steps}
            rec.draft = []
            _out(rec, PlanCreated(tenant=rec.tenant, task_id=rec.task_id, steps=tuple(steps),
                                  reviewed=f"{rec.draft_hash} by {who}"), key="r1", causation=d.msg_id)  # fmt: skip
            _event(rec, "plan.created", f"{len(steps)} steps, as approved by {who}: "
                   + ", ".join(f"{s.step_id}:{s.kind}" for s in steps))  # fmt: skip
            self.dispatch(rec, d.msg_id)
            return True

        if why is None:
            await self.transition(m.tenant, m.task_id, apply)
            why = outcome.get("why")
        detail = {"draft": m.draft, "decision": m.decision, "comment": m.comment}
        if why is not None:
            await self.audit.append(
                m.tenant, m.task_id, "plan.review-refused", f"{d.msg_id}:refused", actor=who, source=d.msg_id,
                detail={**detail, "refused": why},
            )  # fmt: skip
            raise Reject(why)
        if "draft" in outcome:
            detail["new_draft"] = outcome["draft"]
        kind = {"approve": "plan.approved", "reject": "plan.rejected", "edit": "plan.edited"}[m.decision]
        if "node" in outcome:
            detail["node"] = outcome["node"]
            kind = {"approve": "approval.approved", "reject": "approval.denied"}[m.decision]
        await self.audit.append(m.tenant, m.task_id, kind, f"{m.task_id}:{m.decision}:{m.draft}", actor=who,
                              source=d.msg_id, detail=detail)  # fmt: skip

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

    async def on_step_completed(self, m: StepCompleted, d: Delivery) -> None:
        if m.retrievals and self.evidence is not None:  # by attempt: a redone step's records replace nothing
            key = Evidence.key(m.tenant, m.task_id, m.step_id, m.attempt)
            await self.evidence.put(key, Evidence(records=list(m.retrievals)).model_dump_json().encode())

        def apply(rec: TaskRecord) -> bool:
            s = rec.steps.get(m.step_id)
            if (
                rec.status not in ("running", "halted")
                or s is None
                or s.status != "dispatched"
                or s.attempt != m.attempt
            ):
                return False  # duplicate, stale attempt, or the task already ended
            s.status, s.output, s.citations = "completed", m.output, list(m.citations)
            s.usage = s.usage + m.usage  # a redone step's earlier attempts were paid for too
            s.tools, s.models, s.prompt_version = list(m.tools), list(m.models), m.prompt_version
            s.tool_denials = m.tool_denials
            s.taint = m.taint
            # held calls stay pending across a redo: the outcome names every one still waiting
            s.held += [h for h in m.held if h.approval_id not in {x.approval_id for x in s.held}]
            _event(rec, "step.completed", f"{m.step_id}: {m.output[:100]}", m.step_id, str(m.attempt))
            waits.drop(rec, m.step_id)  # its try ended in time
            self.settle(rec, d.msg_id)
            return True

        await self.transition(m.tenant, m.task_id, apply)

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
        _out(rec, check_request(rec), key=str(rec.check_attempt), causation=causation)
        _event(rec, "check.requested", f"{len(rec.steps)} step result(s) and the answer", key=str(rec.check_attempt))

    async def on_step_failed(self, m: StepFailed, d: Delivery) -> None:
        def apply(rec: TaskRecord) -> bool:
            s = rec.steps.get(m.step_id)
            if rec.status in TERMINAL or s is None or s.status != "dispatched" or s.attempt != m.attempt:
                return False
            s.usage = s.usage + m.usage
            waits.drop(rec, m.step_id)  # its try ended in time (if it had a timeout)
            if m.halted:
                s.status, s.reason = "halted", m.reason
                _event(rec, "step.halted", f"{m.step_id}: {m.reason}", m.step_id, str(m.attempt))
                return True
            self.try_failed(rec, m.step_id, m.reason)
            return True

        await self.transition(m.tenant, m.task_id, apply)

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
            _event(rec, "step.retrying", f"{sid}: {s.reason}; try {s.attempt + 1} in {delay:g} s", sid, str(s.attempt))
            return
        s.status, s.reason = "failed", reason
        cascade = self._dependents(rec, sid)
        for dep in cascade:
            rec.steps[dep].status, rec.steps[dep].reason = "failed", f"dependency {sid} failed"
        tail = f"; dependents not run: {', '.join(cascade)}" if cascade else ""
        tries = f" (try {s.attempt} of {node.retry.attempts})" if node is not None and node.retry.attempts > 1 else ""
        fail(rec, f"step {sid} failed{tries}: {reason}{tail}", sid)

    async def on_wake(self, tenant: str, task_id: str, wid: str) -> None:
        """A wake-up the broker fired (``mesh_planner.timers``): the wait it names ends, if the
        task still has it open and it is due."""
        early = 0.0

        def apply(rec: TaskRecord) -> bool:
            nonlocal early
            w = rec.waits.get(wid)
            if w is None or rec.status in TERMINAL:
                return False  # over already (its step ended, the task ended, a second copy)
            now = time.time()
            if w.due_at is not None and w.due_at - now > waits.EARLY_S:
                early = w.due_at - now
                return False
            s = rec.steps.get(w.step_id)
            if s is None:
                rec.waits.pop(wid)
                return True
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
                    return True  # that try ended meanwhile
                _event(rec, "step.timed_out", f"{w.step_id}: try {w.attempt} still running at its timeout",
                       w.step_id, str(w.attempt))  # fmt: skip
                self.try_failed(rec, w.step_id, f"try {w.attempt} timed out")
            return True

        await self.transition(tenant, task_id, apply)
        if early > 0:
            raise Early(early)

    async def on_signal(self, m: TaskSignal, d: Delivery) -> None:
        """A signal for a task (its tenant's own: the door and the identity check saw to that):
        taken by the node waiting for it, kept until that node is reached, or refused with why."""
        outcome, why = "refused", f"tenant {m.tenant} has no task {m.task_id}"
        sig = SignalState(payload=m.payload, by=d.sender.name, at=time.time(), msg_id=d.msg_id)

        def apply(rec: TaskRecord) -> bool:
            nonlocal outcome, why
            earlier = rec.signals.get(m.name)
            if earlier is not None and earlier.msg_id == d.msg_id:
                outcome, why = ("taken", earlier.taken_by) if earlier.taken_by else ("kept", "")
                return False  # this very signal, delivered again
            outcome, why = waits.signal_outcome(rec, self.definition(rec), m.name, sig)
            if outcome == "taken":
                self.settle(rec, d.msg_id)
            return outcome != "refused"

        await self.transition(m.tenant, m.task_id, apply)
        if outcome == "refused":
            await self.mesh.publish(
                ProgressEvent(tenant=m.tenant, task_id=m.task_id, source="planner", stage="signal.refused",
                              message=f"signal {m.name} from {d.sender.name}: {why}"),
                key=f"planner:signal.refused::{d.msg_id}",
            )  # fmt: skip
        detail = {"signal": m.name, "outcome": outcome, **({"reason": why} if outcome == "refused" else {}),
                  **({"node": why} if outcome == "taken" else {})}  # fmt: skip
        await self.audit.append(m.tenant, m.task_id, "task.signal", f"{d.msg_id}:signal", actor=d.sender.name,
                              source=d.msg_id, detail=detail)  # fmt: skip

    @staticmethod
    def _dependents(rec: TaskRecord, step_id: str) -> list[str]:
        out: list[str] = []
        frontier = {step_id}
        for sid, s in rec.steps.items():  # steps are in dependency order
            if frontier & set(s.step.depends_on) and s.status in ("pending", "dispatched"):
                out.append(sid)
                frontier.add(sid)
        return out

    async def on_verdict(self, m: CheckVerdict, d: Delivery) -> None:
        if m.node:
            await self.on_node_verdict(m, d)
            return

        def apply(rec: TaskRecord) -> bool:
            if rec.status != "checking" or m.attempt != rec.check_attempt:
                return False
            rec.checks, rec.judge_score = list(m.checks), m.judge_score
            rec.check_usage = rec.check_usage + m.usage
            rec.prompt_versions = {**rec.prompt_versions, **m.prompt_versions}
            if m.passed:
                answer, citations = final_answer(rec)
                rec.status, rec.finished_at = "completed", time.time()
                _out(
                    rec,
                    TaskCompleted(
                        tenant=rec.tenant,
                        task_id=rec.task_id,
                        answer=answer,
                        citations=tuple(citations),
                        steps=sum(1 for s in rec.steps.values() if not s.skipped),
                        elapsed_s=round(rec.finished_at - rec.created_at, 3),
                        **outcome_fields(rec),
                    ),
                    key="completed",
                    causation=d.msg_id,
                )
                _event(rec, "task.completed", f"{len(rec.steps)} steps, {rec.total_usage().total_tokens} tokens")
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
            _event(rec, "check.revise", f"{', '.join(redo)} redone: {failed}", redo[0], str(rec.check_attempt))
            self.dispatch(rec, d.msg_id)
            return True

        await self.transition(m.tenant, m.task_id, apply)

    async def on_node_verdict(self, m: CheckVerdict, d: Delivery) -> None:
        """The checker's verdict for a workflow's check node (``CheckNode``): passed, the node
        completes; failed with tries left, the node it checks (and what lies between) runs again
        after the backoff, told why, and is checked again; failed on its last try, the node fails."""

        def apply(rec: TaskRecord) -> bool:
            s = rec.steps.get(m.node)
            if rec.status in TERMINAL or s is None or s.status != "dispatched" or s.attempt != m.attempt:
                return False  # a verdict for an earlier try (timed out), or a second copy
            node = self.definition(rec).node(m.node)  # type: ignore[union-attr]
            assert isinstance(node, CheckNode)
            rec.check_usage = rec.check_usage + m.usage
            rec.prompt_versions = {**rec.prompt_versions, **m.prompt_versions}
            waits.drop(rec, m.node)  # its try's timeout
            names = [c.name for c in m.checks]
            if m.passed:
                waits.complete(rec, s, json.dumps({"passed": True, "score": m.judge_score, "checks": names}))
                self.settle(rec, d.msg_id)
                return True
            failed = "; ".join(f"{c.name}: {c.reason}" for c in m.checks if not c.passed) or "no check passed"
            if s.attempt >= node.retry.attempts:
                self.try_failed(rec, m.node, f"the checker rejected {node.of}: {failed}")
                return True
            delay = node.retry.delays()[s.attempt - 1]
            between = self.definition(rec).between(node.of, m.node)  # type: ignore[union-attr]
            redo = [sid for sid in rec.steps if sid in between]  # in plan order
            for sid in redo:
                r = rec.steps[sid]
                r.status, r.output, r.citations, r.skipped = "pending", "", [], False
            rec.feedback = {**rec.feedback, node.of: f"the checker rejected this step: {failed}"}
            s.status, s.reason = "pending", f"check {s.attempt} of {node.retry.attempts} failed: {failed}"
            waits.start(rec, waits.wait_id("retry", rec.steps[node.of].attempt, node.of),
                        WaitState(step_id=node.of, kind="retry", attempt=rec.steps[node.of].attempt,
                                  due_at=time.time() + delay))  # fmt: skip
            _event(rec, "check.revise", f"{m.node}: {', '.join(redo)} run again in {delay:g} s: {failed}",
                   m.node, str(s.attempt))  # fmt: skip
            return True

        await self.transition(m.tenant, m.task_id, apply)

    async def on_control(self, m: ControlCancel | ControlHalt | ControlResume, d: Delivery) -> None:
        who = d.sender.name

        def apply(rec: TaskRecord) -> bool:
            if rec.status in TERMINAL:
                return False
            if isinstance(m, ControlCancel):
                fail(rec, f"cancelled by {who}: {m.reason}", status="cancelled")
            elif isinstance(m, ControlHalt):
                if rec.status == "halted":
                    return False
                rec.status, rec.reason = "halted", f"halted by {who}: {m.reason}"
                _event(rec, "task.halted", rec.reason, key=d.msg_id)  # a task may be halted more than once
            else:
                if rec.status != "halted":
                    return False
                rec.status, rec.reason = "running", ""
                for s in rec.steps.values():
                    if s.status == "halted":
                        s.status = "pending"
                _event(rec, "task.resumed", f"resumed by {who}", key=d.msg_id)
                self.dispatch(rec, d.msg_id)
            return True

        if await self.transition(m.tenant, m.task_id, apply) is None and isinstance(m, ControlCancel):
            await self.cancel_before_start(m, who, apply)
        # Then (a chain that cannot be appended to must not delay a cancel; if this fails, the
        # redelivery finds the control applied and appends again): every control action that
        # reached the task's owner, applied or not, as a link of the tenant's audit chain.
        await self.audit.append(
            m.tenant, m.task_id, m.type, d.msg_id, actor=who, source=d.msg_id, detail={"reason": m.reason}
        )

    async def cancel_before_start(self, m: ControlCancel, who: str, apply: Callable[[TaskRecord], bool]) -> None:
        """A cancel for a task not taken up yet (waiting for a run slot, or behind a backlog):
        its record is made, cancelled, so the client is told and the submission, when its turn
        comes, finds the task ended instead of starting it."""

        def create(rec: TaskRecord | None) -> TaskRecord | None:
            if rec is not None:
                return None  # taken up meanwhile: cancel it as any other
            new = TaskRecord(tenant=m.tenant, task_id=m.task_id, goal="", created_at=time.time())
            fail(new, f"cancelled by {who} before it started: {m.reason}", status="cancelled")
            return new

        rec, created = await st.update(self.kv, TaskRecord.key(m.tenant, m.task_id), TaskRecord, create)
        if not created:
            await self.transition(m.tenant, m.task_id, apply)
            return
        assert rec is not None
        await self.publish_status(rec, "planning")
        await self.release(rec)
        await self.flush(rec)


async def build(mesh: Mesh, settings: PlannerSettings) -> Planner:
    planner = Planner(mesh, configured(mesh, settings), settings)
    planner.register()
    return planner
