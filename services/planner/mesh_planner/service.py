"""Planner handlers: plan a submitted task, dispatch ready steps, decide the outcome.

Every handler is a state transition on the task record (compare-and-set in KV). The
messages a transition decides are written into the record's outbox in the same write,
then published with deterministic ids, then removed from the outbox. A crash anywhere
leaves either nothing done or an outbox that the next delivery flushes: no decision is
lost and the server's dedup window absorbs republishing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mesh_agent import prompts
from mesh_agent import releases as bundles
from mesh_agent.metered import BudgetExceeded, Models, call_model_once, configured
from mesh_contracts import topology as topo
from mesh_contracts.v1 import (
    AgentChange,
    CheckVerdict,
    ControlCancel,
    ControlHalt,
    ControlResume,
    PlanReviewed,
    PlanStep,
    ProgressEvent,
    ReleaseChange,
    StepCompleted,
    StepFailed,
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
    TaskRecord,
)
from mesh_durable import chain, guard, ledger, records
from mesh_durable.ledger import Ledger
from mesh_durable.records import Bundles
from mesh_durable.view import KeyView
from mesh_host import Mesh
from mesh_kit import Delivery, Park
from mesh_kit import envelope as env
from mesh_kit import state as st
from mesh_kit.delivery import Reject
from mesh_llm import ChatModel, ContextOverflow, Message, ModelRequest, UnknownRoute
from mesh_planner import agents as ag
from mesh_planner import metrics as planner_metrics
from mesh_planner import waits
from mesh_planner.admission import Admission, Limits, StoreLevel, parse_tenants
from mesh_planner.changes import Changes
from mesh_planner.drafts import parse_plan, plan_max_tokens, plan_schema, tool_list
from mesh_planner.errors import NeedWorkflow
from mesh_planner.flow import Flow
from mesh_planner.intake import Intake
from mesh_planner.outbox import Outbox, event
from mesh_planner.planning import PlanningSlots
from mesh_planner.releases import Releases
from mesh_planner.settings import PlannerSettings
from mesh_planner.steps import (
    fail,
    replaying,
)  # fmt: skip
from mesh_planner.timers import Early, Timers
from mesh_planner.workflows import Registry
from mesh_tenancy import tenancy

log = logging.getLogger("mesh.planner")
PLAN_PROMPT = prompts.load("mesh_planner", "plan")
"""The packaged planning prompt; a planner plans with it or with its ``MESH_PROMPTS_DIR``
override (``Planner.plan_prompt``)."""


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
        self.agents: ag.Agents | None = None  # the tenant's agent profiles (same bucket)
        self.releases: Releases | None = None
        self.changes = Changes(
            mesh, lambda: self.workflows, lambda: self.releases, lambda: self.agents
        )  # people's changes to them
        self.flow = Flow(lambda: self.workflows, self.reviewed)  # how a task's record moves
        self.channels: KeyView | None = None
        self.bundles: Bundles | None = None
        self.catalogue = records.TenantCatalogues(
            None, None
        )  # KV ``tools`` and each tenant's: the plan prompt lists them
        self.timers: Timers | None = None
        self.outbox = Outbox(mesh, lambda: self.kv, lambda: self.evidence, lambda: self.timers)  # decided messages
        self._to_plan: dict[tuple[str, str], str] = {}
        """Submissions this process admitted, made a record for and parked for a planning slot,
        with the release each runs."""
        self.intake = Intake(
            mesh, records=lambda: self.kv, fixed=self.fixed, admission=lambda: self.admission, store=lambda: self.store,
            workflows=lambda: self.workflows, releases=lambda: self.releases, ended=self.release,
        )  # fmt: skip

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
        self.admission.own = self.mesh.verifier.tenants.admission  # the tenant's record, live
        await self.admission.follow(self.mesh.nc)
        self.ledger = await ledger.calls(self.mesh)
        streams = [*topo.STREAMS.values(), topo.DLQ_STREAM]
        self.store = StoreLevel(self.mesh.nc.jetstream(), streams, s.store_high_water, s.store_retry_after_s)
        self.planning = PlanningSlots(s.planning_slots or max(1, self.mesh.settings.max_workers - 1))
        self.workflows = Registry(await self.mesh.kv("workflows"))
        self.agents = ag.Agents(self.workflows.kv)
        kv = await self.mesh.kv("releases")
        gateway = getattr(self.model, "gateway", self.model)
        routes = getattr(gateway, "routes", None)
        self.channels = KeyView(self.mesh.nc, kv, "releases", max_age_s=self.mesh.settings.guard_view_s)
        await self.channels.start()
        self.releases = Releases(kv, frozenset(routes) if isinstance(routes, dict) else None, self.channels)
        self.bundles = Bundles(kv)
        # a tool mounted since (the mesh's, or a tenant's own) is listed a second on
        self.catalogue = records.TenantCatalogues(await self.mesh.kv("tools"), await self.mesh.kv("toolservers"))

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
        m.on_stop(self.outbox.drain, connected=True)
        m.consume(TaskSubmitted, self.on_submitted, on_reject=self.on_rejected)
        m.consume(StepCompleted, self.on_step_completed)
        m.consume(StepFailed, self.on_step_failed)
        m.consume(CheckVerdict, self.on_verdict)
        m.consume(WorkflowChange, self.changes.on_workflow)
        m.consume(ReleaseChange, self.changes.on_release)
        m.consume(AgentChange, self.changes.on_agent)
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
            self.outbox.drop_sent(rec)  # what is published already is cleared by this write
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
        release = self._to_plan.get((m.tenant, m.task_id))
        if release is not None:
            # Back from waiting for a planning slot: admitted and its record made, by this
            # process; straight to its plan (a task cancelled meanwhile is not planned: the guard
            # refuses the call, and the plan is applied only to a record still planning).
            await self._plan_in_turn(m, d, key, release)
            return
        terms = await self.intake.admit(m, d)
        if terms is None:
            return
        pinned, shares, release, how = terms.workflow, terms.shares, terms.release, terms.how
        plan_prompt, _, _ = await self._plan_prompt(m, release)

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
        elif await records.task_status(self.status, m.tenant, m.task_id) is None:
            # A duplicate copy delivered for the first time (the client published again across a
            # broker restart): its creator normally wrote the record, but that write may have
            # failed (the broker going down), its own redelivery comes later, and this copy would
            # plan the task meanwhile. The broker chaos drill lost a task to that ('unknown task').
            await self.publish_status(rec, rec.status, starts=True)
        if m.agent is not None:  # the goal as one step of a profile: no model call
            await self._plan_agent(m, d)
            return
        if rec.workflow:
            # On the tenant's chain: which version the task runs, whoever publishes what next.
            await self.audit.append(
                m.tenant, m.task_id, "task.workflow", f"{m.task_id}:workflow", actor=d.sender.name, source=d.msg_id,
                detail={"workflow": rec.workflow, "named": m.workflow or ""},
            )  # fmt: skip
            await self._plan_workflow(m, d, rec.workflow)  # no model call: no planning slot
            return
        await self._plan_in_turn(m, d, key, rec.release)

    async def _plan_workflow(self, m: TaskSubmitted, d: Delivery, ref: str) -> None:
        """A fixed workflow's plan: its nodes, as they are (``Flow.workflow_planned``), each agent
        node pinned to the current version of the profile it names (or the task fails: why)."""
        assert self.workflows is not None and self.agents is not None
        named = ag.workflow_agents(await self.workflows.pinned(m.tenant, ref))
        try:
            fit = await self.agents.fitter(m.tenant, named) if named else None
        except ag.Refused as exc:
            why = f"workflow {ref}: {exc}"
            await self.transition(m.tenant, m.task_id, lambda r: self.flow.planned(r, [], None, why, d.msg_id))
            return
        await self.transition(m.tenant, m.task_id, lambda rec: self.flow.workflow_planned(rec, d.msg_id, fit))

    async def _plan_agent(self, m: TaskSubmitted, d: Delivery) -> None:
        """A task submitted to one of the tenant's profiles: its goal, one step of that agent."""
        assert self.agents is not None and m.agent is not None
        steps: list[PlanStep] = []
        if m.workflow:
            error = "a task runs a workflow or an agent profile, not both"
        else:
            steps, error = await ag.one_step(self.agents, m.tenant, m.agent, m.goal)
        await self.transition(m.tenant, m.task_id, lambda r: self.flow.planned(r, steps, None, error, d.msg_id))

    async def _plan_prompt(self, m: TaskSubmitted, release: str) -> tuple[prompts.Prompt, str, str]:
        """The planning prompt for the task and the model route, its release's (a replay may name
        another prompt version), and why it cannot be planned if that version is not here."""
        bundle = await self.bundles.bundle(m.tenant, release) if self.bundles is not None and release else None
        current, route = bundles.prompt(self.plan_prompt, bundle, release), bundles.route(bundle, "planner")
        if m.replay is None:
            return current, "", route
        try:
            return prompts.chosen(current, m.replay.prompts, self.settings.prompts_dir), "", route
        except prompts.PromptError as exc:
            return current, f"prompt: {exc}", route

    async def _plan_in_turn(self, m: TaskSubmitted, d: Delivery, key: str, release: str) -> None:
        """Plan the task in a planning slot, or wait for one parked: out of the fetch window (so
        later submissions, another tenant's too, are still fetched) for its tenant's turn."""
        planning, task = self.planning, (m.tenant, m.task_id)
        if planning is not None and not planning.take(m.tenant, m.task_id):
            if task not in self._to_plan:
                self.mesh.count(planner_metrics.M_PLANNING_WAITS, {"tenant": m.tenant})
            self._to_plan[task] = release
            raise Park(lambda: planning.wait(m.tenant, m.task_id, m.priority), f"{key} waits for a planning slot")
        self._to_plan.pop(task, None)
        plan_prompt, unusable, route = await self._plan_prompt(m, release)
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
        catalogue = await self.catalogue.get(m.tenant)
        agents, names = await ag.listing(self.agents, m.tenant)
        request = ModelRequest(
            (
                Message(
                    "system", plan_prompt.render(max_steps=m.limits.max_steps, tools=tool_list(catalogue) + agents)
                ),
                Message("user", m.goal),
            ),
            response_schema=ag.with_agents(plan_schema(catalogue, m.limits.max_steps), names),
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
            content, named = ag.take_agents(response.content)
            steps = parse_plan(content, m.limits.max_steps)
            if named and self.agents is not None:  # each step handed to a profile runs its current version
                steps = (await self.agents.fitter(m.tenant, named))(steps)
            error = ""
        except BudgetExceeded as exc:
            steps, usage, error = [], None, exc.describe()
        except (ContextOverflow, UnknownRoute) as exc:  # permanent (other model errors retry)
            steps, usage, error = [], None, f"model: {exc}"
        except (ValueError, ag.Refused) as exc:
            steps, error = [], str(exc)

        rec = await self.transition(m.tenant, m.task_id, lambda r: self.flow.planned(r, steps, usage, error, d.msg_id))
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
        """A reviewer's decision on the task's waiting draft (``Flow.review``). Who may decide is
        judged as for a held call (the tenant's named approvers, under the newest bundle); a
        decision on a draft that is no longer the one waiting is refused. Every decision, refused
        ones too, is a link of the tenant's audit chain, with the draft's hash."""
        who = d.sender.name
        if m.reviewed_by != who:
            raise Reject(f"reviewed_by {m.reviewed_by!r} is not the signer {who!r}")
        why = (await self.mesh.newest_trust()).may_decide(who, m.tenant)
        outcome: dict[str, str] = {}
        if why is None:
            await self.transition(m.tenant, m.task_id, lambda rec: self.flow.review(rec, m, who, d.msg_id, outcome))
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

    async def on_step_completed(self, m: StepCompleted, d: Delivery) -> None:
        if m.retrievals and self.evidence is not None:  # by attempt: a redone step's records replace nothing
            key = Evidence.key(m.tenant, m.task_id, m.step_id, m.attempt)
            await self.evidence.put(key, Evidence(records=list(m.retrievals)).to_bytes(key))
        await self.transition(m.tenant, m.task_id, lambda rec: self.flow.step_completed(rec, m, d.msg_id))

    async def on_step_failed(self, m: StepFailed, d: Delivery) -> None:
        await self.transition(m.tenant, m.task_id, lambda rec: self.flow.step_failed(rec, m))

    async def on_wake(self, tenant: str, task_id: str, wid: str) -> None:
        """A wake-up the broker fired (``mesh_planner.timers``): the wait it names ends, if the
        task still has it open and it is due (``Flow.wake``); one that came early is taken again."""
        early = 0.0

        def apply(rec: TaskRecord) -> bool:
            nonlocal early
            changed, early = self.flow.wake(rec, wid, time.time())
            return changed

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
            changed, outcome, why = self.flow.signal(rec, m.name, sig, d.msg_id)
            return changed

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

    async def on_verdict(self, m: CheckVerdict, d: Delivery) -> None:
        if m.node:
            await self.transition(m.tenant, m.task_id, lambda rec: self.flow.node_verdict(rec, m, d.msg_id))
        else:
            await self.transition(m.tenant, m.task_id, lambda rec: self.flow.verdict(rec, m, d.msg_id))

    async def on_control(self, m: ControlCancel | ControlHalt | ControlResume, d: Delivery) -> None:
        who = d.sender.name

        def apply(rec: TaskRecord) -> bool:
            return self.flow.control(rec, m, who, d.msg_id)

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
