"""A call held for a person: the approval asked for, who may decide it, and its decision acted on.

The wait itself is a record of the ``approvals`` bucket (``approvals.py``: the state machine, the
sweep that expires and voids waits). Here is what the service does around it: a call the policy
holds opens a record and is announced as ``approval.requested`` (arguments redacted except where
the effect lands); a decision is judged under the newest trust bundle (a tenant that names its
approvers has them alone); and a decided record is settled once in effect: the call performed
under the ledger, or the refusal answered. An approval whose task has ended is void.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from mesh_contracts.v1 import ApprovalRequested, ToolRequested
from mesh_contracts.v1.records import TERMINAL, StatusRecord, TaskRecord
from mesh_durable import guard, records
from mesh_guardrails.redact import redact_value
from mesh_host import Mesh
from mesh_identity import Principal
from mesh_kit import Delivery
from mesh_tool_executor import metrics as tool_executor_metrics
from mesh_tool_executor.approvals import ApprovalRecord, Approvals, approval_id
from mesh_tool_executor.policy import Decision
from mesh_tool_executor.reporting import Reporter
from mesh_tool_executor.running import Runner, scoped
from mesh_tool_executor.settings import ToolExecutorSettings
from mesh_tool_executor.tools import Registry, Tool, ToolError


class HeldCalls:
    """Calls waiting for a person, and the decisions on them. ``approvals``, ``tasks``: the
    approvals store and KV ``tasks``, as they are once the service started; ``report`` and
    ``runner``: how a decided call is audited, answered and run."""

    def __init__(
        self,
        mesh: Mesh,
        settings: ToolExecutorSettings,
        registry_for: Callable[[str, str], Registry],
        report: Reporter,
        runner: Runner,
        *,
        approvals: Callable[[], Approvals | None],
        tasks: Callable[[], Any],
    ) -> None:
        self.mesh, self.settings, self.report, self.runner = mesh, settings, report, runner
        self.registry_for = registry_for  # (tenant, tool) -> the registry its tools are in
        self._approvals, self._tasks = approvals, tasks

    async def ask(self, m: ToolRequested, tool: Tool, decision: Decision, d: Delivery | None, goal: str) -> None:
        """The policy holds the call for a person: a durable wait, announced to the approvers."""
        aid = approval_id(m.tenant, m.task_id, m.call_id)
        approvals = self._approvals()
        if approvals is None:  # no durable store (in-memory tests): nobody can approve, so refuse
            await self.report.audit(m, tool, "blocked", (*decision.reasons, "no approval store"), by="policy",
                                    goal=goal)  # fmt: skip
            await self.report.answer(m, {"ok": False, "result": "", "error": "needs approval, and approvals are not "
                                         "available here", "untrusted": False}, tool)  # fmt: skip
            return
        now = time.time()
        rec, created = await approvals.open(
            ApprovalRecord(
                approval_id=aid,
                tenant=m.tenant,
                task_id=m.task_id,
                step_id=m.step_id,
                call_id=m.call_id,
                tool=m.tool,
                request=m,
                reasons=list(decision.reasons),
                requested_at=now,
                deadline=now + self.settings.approval_timeout_s,
            )
        )
        if rec.status != "pending":
            if not rec.done:
                await self.settle(rec)
            return
        # Published on every delivery of the request (deduplicated by the approval id), so a crash
        # between the record and the publish never leaves a wait nobody was told about.
        await self.mesh.publish(
            ApprovalRequested(
                tenant=m.tenant,
                task_id=m.task_id,
                approval_id=aid,
                step_id=m.step_id,
                tool=m.tool,
                arguments=_for_approver(m.arguments, tool),
                reason="; ".join(decision.reasons)[:1000],
                timeout_s=max(0.0, rec.deadline - now),
                call_id=m.call_id,
                risk=tool.risk,
                injection_score=m.taint.injection_score,
                sources=m.taint.sources,
                destinations=self.report.destinations(m, tool, goal),
            ),
            key=aid,
            causation=d.msg_id if d is not None else None,
        )
        if created:
            await self.report.audit(m, tool, "approval-requested", decision.reasons, approval=aid, by="policy",
                                    goal=goal)  # fmt: skip
            await self.mesh.progress(
                m.tenant, m.task_id, "approval.requested",
                f"{m.tool} waits for a human: meshctl approve {aid} (or deny); {decision.reasons[0]}"[:300],
                step_id=m.step_id, key=aid,
            )  # fmt: skip

    async def may_not_decide(self, tenant: str, sender: Principal) -> str | None:
        """Why ``sender`` may not decide ``tenant``'s calls, judged under the newest published trust
        bundle (read now: a person added or removed a moment ago counts already), or None.

        A tenant that names approvers has them alone: the console's own ``approver`` (bound to no
        tenant) may not decide its calls. With none named (or the last one removed), the console
        decides them, as before any were named."""
        return (await self.mesh.newest_trust()).may_decide(sender.name, tenant)

    async def ended_now(self, tenant: str, task_id: str) -> str | None:
        """Why the task can no longer have a call performed, read now from its record (the
        planner's compare-and-set, the first place an end is written), or None while it may."""
        tasks = self._tasks()
        if tasks is None:
            return None
        rec = await records.task_record(tasks, tenant, task_id)
        return f"task ended ({rec.status})" if rec is not None and rec.status in TERMINAL else None

    async def ended_seen(self, tenant: str, task_id: str) -> str | None:
        """The same from the guard's view of the ``status`` bucket (memory, kept current by its
        feed): cheap enough for the sweep that voids waits of ended tasks every second."""
        view = g.status_view if (g := guard.of(self.mesh)) is not None else None
        if view is None:
            return None
        raw = await view.get(TaskRecord.key(tenant, task_id))
        rec = StatusRecord.model_validate_json(raw) if raw else None
        return f"task ended ({rec.status})" if rec is not None and rec.status in TERMINAL else None

    async def settle(self, rec: ApprovalRecord, causation: str = "") -> None:
        """Act on a decided approval exactly once in effect: run the call (under the ledger) or
        answer the refusal; both are deduplicated by the call id if repeated after a crash.

        An approved call is first committed to (``Approvals.commit``): ``started`` if its task
        still runs, else void. Only a started record is performed, and a started one always is,
        so a decision racing the task's end is performed or void, never both."""
        approvals = self._approvals()
        assert approvals is not None
        m = rec.request
        tool = self.registry_for(m.tenant, m.tool).get(m.tool)
        stopped: Literal["", "halted", "stopped"] = ""
        if rec.status == "approved" and tool is not None and not rec.started:
            committed = await approvals.commit(rec.approval_id, await self.ended_now(m.tenant, m.task_id))
            rec = committed if committed is not None else rec
        if rec.status == "approved" and tool is not None:
            outcome = await self._perform(rec, tool)
        elif rec.status == "void":
            outcome = await self._void(rec, tool)
            stopped = "stopped"
        else:
            outcome = await self._refused(rec, tool)
        await self.report.answer(m, outcome, tool, causation=causation, approval=rec.approval_id, stopped=stopped)
        await approvals.mark_done(rec.approval_id)

    async def _perform(self, rec: ApprovalRecord, tool: Tool) -> dict[str, Any]:
        """An approved call, started: audited as approved, then run under the ledger."""
        m = rec.request
        await self.report.audit(m, tool, "approved", (*rec.reasons[:1], f"approved by {rec.decided_by}"),
                                approval=rec.approval_id, by=rec.decided_by)  # fmt: skip
        try:
            _, args = self.registry_for(m.tenant, m.tool).validate(m.tool, scoped(m, tool))
        except ToolError as exc:  # held under a rule since tightened (an upgrade while it waited)
            await self.report.audit(m, tool, "invalid", (str(exc),), approval=rec.approval_id)
            return {"ok": False, "result": "", "error": str(exc), "untrusted": False}
        return await self.runner.run_recorded(m, tool, args, None)

    async def _void(self, rec: ApprovalRecord, tool: Tool | None) -> dict[str, Any]:
        """Nothing ran, and the task is over: what the audit, the agent's answer and the record say
        is why (the task's end), and who decided what too late, if anyone did."""
        late = (f"{rec.decided} by {rec.decided_by} after the task ended" if rec.decided
                else "no decision before the task ended")  # fmt: skip
        await self.report.audit(rec.request, tool, "blocked", (f"void: {rec.void}", late, *rec.reasons[:1]),
                                approval=rec.approval_id, by=rec.decided_by, void=rec.void)  # fmt: skip
        self.mesh.count(tool_executor_metrics.M_APPROVALS_VOID)
        return {"ok": False, "result": "", "error": f"not run: approval {rec.approval_id} void: {rec.void}",
                "untrusted": False}  # fmt: skip

    async def _refused(self, rec: ApprovalRecord, tool: Tool | None) -> dict[str, Any]:
        """Denied by a person, or expired without a decision: audited with why, not run."""
        verdict = "expired" if rec.status == "expired" else "denied"
        why = (f"no decision within {rec.deadline - rec.requested_at:g}s" if verdict == "expired"
               else f"denied by {rec.decided_by}" + (f": {rec.comment}" if rec.comment else ""))  # fmt: skip
        await self.report.audit(rec.request, tool, verdict, (*rec.reasons[:1], why), approval=rec.approval_id,
                                by=rec.decided_by)  # fmt: skip
        # A person's comment is not the tool-executor's words: it reaches the model as untrusted text.
        return {"ok": False, "result": "", "error": f"not run: approval {rec.approval_id} {verdict} ({why})",
                "untrusted": bool(rec.comment), "denied": True}  # fmt: skip


def _for_approver(arguments: dict[str, Any], tool: Tool) -> dict[str, Any]:
    """What an approver sees: the arguments that decide where the effect lands (recipient, URL)
    as they are, everything else redacted (secrets and PII in a body are not theirs to read)."""
    return {k: (v if k in tool.destination_args else redact_value(v)) for k, v in arguments.items()}
