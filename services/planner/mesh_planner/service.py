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
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from mesh_agent import prompts
from mesh_agent import releases as bundles
from mesh_agent.metered import BudgetExceeded, Models, call_model_once, configured
from mesh_contracts import topology as topo
from mesh_contracts.v1 import (
    CheckVerdict,
    ControlCancel,
    ControlHalt,
    ControlResume,
    PlanCreated,
    PlanReviewed,
    PlanStep,
    ProgressEvent,
    ReleaseChange,
    StepCompleted,
    StepFailed,
    TaskCompleted,
    TaskRejected,
    TaskSignal,
    TaskSubmitted,
    WorkflowChange,
)
from mesh_contracts.v1.records import (
    GUARDED,
    TERMINAL,
    AdmissionRecord,
    Evidence,
    SignalState,
    StatusRecord,
    StepState,
    TaskRecord,
    WaitState,
)
from mesh_contracts.v1.workflow import (
    WAITS,
    AgentNode,
    ApprovalNode,
    CheckNode,
    WorkflowDefinition,
    not_runnable,
)
from mesh_durable import chain, guard
from mesh_durable.ledger import BUCKET as LEDGER
from mesh_durable.ledger import Ledger
from mesh_kit import Delivery, Mesh, Park
from mesh_kit import envelope as env
from mesh_kit import state as st
from mesh_kit.delivery import Reject
from mesh_kit.state import Bundles
from mesh_kit.view import KeyView
from mesh_llm import ChatModel, ContextOverflow, Message, ModelRequest, UnknownRoute
from mesh_planner import metrics as planner_metrics
from mesh_planner import releases as rel
from mesh_planner import waits
from mesh_planner.admission import Admission, Limits, StoreLevel, Wait, parse_tenants
from mesh_planner.changes import Changes
from mesh_planner.drafts import checked_plan, draft, parse_plan, plan_max_tokens, tool_list, workflow_edit_problem
from mesh_planner.errors import NeedWorkflow
from mesh_planner.outbox import Outbox, event, out
from mesh_planner.planning import PlanningSlots
from mesh_planner.releases import Releases
from mesh_planner.settings import PlannerSettings
from mesh_planner.steps import (
    answer_step_id,
    check_request,
    dispatch_ready,
    dispatch_workflow,
    fail,
    final_answer,
    outcome_fields,
    redo_after,
    replaying,
    workflow_steps,
)  # fmt: skip
from mesh_planner.timers import Early, Timers
from mesh_planner.workflows import Refused, Registry
from mesh_tenancy import tenancy

log = logging.getLogger("mesh.planner")
PLAN_PROMPT = prompts.load("mesh_planner", "plan")
"""The packaged planning prompt; a planner plans with it or with its ``MESH_PROMPTS_DIR``
override (``Planner.plan_prompt``)."""


SENT_KEPT = 20_000
"""Tasks whose release a planner remembers (the oldest are forgotten first, and read again)."""


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
        self.changes = Changes(mesh, lambda: self.workflows, lambda: self.releases)  # people's changes to them
        self.channels: KeyView | None = None
        self.bundles: Bundles | None = None
        self.catalogue = st.Catalogue(None)  # KV ``tools``: the tool-executor's, which the plan prompt lists
        self._release_of: OrderedDict[tuple[str, str], str] = OrderedDict()
        """The release each task this process admitted runs (its planning reads the bundle)."""
        self.timers: Timers | None = None
        self.outbox = Outbox(mesh, lambda: self.kv, lambda: self.evidence, lambda: self.timers)  # decided messages
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
        self.catalogue = st.Catalogue(await self.mesh.kv("tools"))  # a tool mounted since: listed a second on

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
        m.consume(WorkflowChange, self.changes.on_workflow)
        m.consume(ReleaseChange, self.changes.on_release)
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
                    await self.changes.observe(rec)
            if rec.status not in TERMINAL and self.admission is not None:
                idle = waits.idle(rec)
                # Changed now, or (a crash between the two writes) the tenant's record still says otherwise.
                if idle != was_idle or idle != self.admission.idle_as_seen(rec.tenant, rec.task_id):
                    self.admission.mark_idle(rec.tenant, rec.task_id, idle)  # written in the background
            await self.outbox.flush(rec)
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
                    self.mesh.count(planner_metrics.M_SLOT_WAITS, {"tenant": m.tenant})
                self._waited.add((m.tenant, m.task_id))
                raise Park(decision.until, f"{key} waits for a run slot")
            refusal = decision
        if refusal is not None:
            self.mesh.count(planner_metrics.M_REFUSED, {"tenant": m.tenant, "code": refusal.code})
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
            event(new, "task.accepted", m.goal[:120])
            if release:
                event(new, "release.chosen", f"runs release {release} ({how})")
            if pinned:
                event(new, "workflow.pinned", f"runs {pinned} (its nodes as defined: no plan of the model's)")
            if m.replay is not None:
                event(new, "task.replay", replaying(m.replay))
            return new

        rec, created = await st.update(self.kv, key, TaskRecord, create)
        assert rec is not None
        self._remember_release(m.tenant, m.task_id, rec.release)
        if created:
            self.mesh.count(planner_metrics.M_ADMITTED, {"tenant": m.tenant})
        elif rec.status in TERMINAL:
            await self.release(rec)  # a late duplicate of an ended task: admitting it again was a no-op
        if not created and rec.goal and rec.goal != m.goal:  # (no goal: cancelled before it started)
            log.warning("task id %s reused with a different goal; ignoring the new submission", key)
            return
        await self.outbox.flush(rec)
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
        self.mesh.count(planner_metrics.M_REFUSED, {"tenant": m.tenant, "code": "invalid"})
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
        out(rec, PlanCreated(tenant=rec.tenant, task_id=rec.task_id, steps=tuple(steps), workflow=rec.workflow,
                              reviewed=reviewed), key="r1", causation=causation)  # fmt: skip
        how = f", as approved by {reviewed}" if reviewed else ""
        event(rec, "plan.created", f"{rec.workflow}: {len(steps)} nodes{how}: " + ", ".join(s.step_id for s in steps))
        self.settle(rec, causation)

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

    async def _plan_in_turn(self, m: TaskSubmitted, d: Delivery, key: str) -> None:
        """Plan the task in a planning slot, or wait for one parked: out of the fetch window (so
        later submissions, another tenant's too, are still fetched) for its tenant's turn."""
        planning, task = self.planning, (m.tenant, m.task_id)
        if planning is not None and not planning.take(m.tenant, m.task_id):
            if task not in self._to_plan:
                self.mesh.count(planner_metrics.M_PLANNING_WAITS, {"tenant": m.tenant})
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
            (
                Message(
                    "system",
                    plan_prompt.render(max_steps=m.limits.max_steps, tools=tool_list(await self.catalogue.get())),
                ),
                Message("user", m.goal),
            ),
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
            out(
                rec,
                PlanCreated(tenant=rec.tenant, task_id=rec.task_id, steps=tuple(steps)),
                key="r1",
                causation=d.msg_id,
            )
            event(rec, "plan.created", f"{len(steps)} steps: " + ", ".join(f"{s.step_id}:{s.kind}" for s in steps))
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
            out(rec, PlanCreated(tenant=rec.tenant, task_id=rec.task_id, steps=tuple(steps),
                                  reviewed=f"{rec.draft_hash} by {who}"), key="r1", causation=d.msg_id)  # fmt: skip
            event(rec, "plan.created", f"{len(steps)} steps, as approved by {who}: "
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
            event(rec, "step.completed", f"{m.step_id}: {m.output[:100]}", m.step_id, str(m.attempt))
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
        out(rec, check_request(rec), key=str(rec.check_attempt), causation=causation)
        event(rec, "check.requested", f"{len(rec.steps)} step result(s) and the answer", key=str(rec.check_attempt))

    async def on_step_failed(self, m: StepFailed, d: Delivery) -> None:
        def apply(rec: TaskRecord) -> bool:
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
            event(rec, "step.retrying", f"{sid}: {s.reason}; try {s.attempt + 1} in {delay:g} s", sid, str(s.attempt))
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
                event(rec, "step.timed_out", f"{w.step_id}: try {w.attempt} still running at its timeout",
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
        found: list[str] = []
        frontier = {step_id}
        for sid, s in rec.steps.items():  # steps are in dependency order
            if frontier & set(s.step.depends_on) and s.status in ("pending", "dispatched"):
                found.append(sid)
                frontier.add(sid)
        return found

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
                out(
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
            event(rec, "check.revise", f"{m.node}: {', '.join(redo)} run again in {delay:g} s: {failed}",
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
                event(rec, "task.halted", rec.reason, key=d.msg_id)  # a task may be halted more than once
            else:
                if rec.status != "halted":
                    return False
                rec.status, rec.reason = "running", ""
                for s in rec.steps.values():
                    if s.status == "halted":
                        s.status = "pending"
                event(rec, "task.resumed", f"resumed by {who}", key=d.msg_id)
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
        await self.outbox.flush(rec)


async def build(mesh: Mesh, settings: PlannerSettings) -> Planner:
    planner = Planner(mesh, configured(mesh, settings), settings)
    tenancy.install(mesh)  # its tenants' doors and quotas (mesh_tenancy)
    planner.register()
    return planner
