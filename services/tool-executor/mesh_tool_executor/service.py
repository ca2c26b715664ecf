"""Tool-executor: validates tool calls, applies the tool policy, runs tools, answers the agent.

A call goes: validate the arguments (a hallucinated tool or bad arguments is a structured
error, nothing runs) -> the policy (``policy.py``) -> run now, or wait durably for a human
(``approvals.py``), or refuse -> the result, with its injection score when the tool's output
is outside content. Every call that runs goes through the idempotency ledger under its
deterministic call id: a redelivered request returns the recorded result instead of running
the tool again, and an external effect is handed the same key as its own idempotency key.
Every write or external call and every refusal is recorded as ``tool.audited``.

Here: the messages the service consumes and their handlers, each deciding what becomes of a
call or a decision. Beside it: how a call runs (``running.py``), a call held for a person
(``held.py``), the answers and audit records (``reporting.py``) and the notes' store (``notes.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from mesh_contracts.v1 import ApprovalDecided, ToolRequested, ToolsChange
from mesh_contracts.v1.records import ToolCatalogue
from mesh_durable import chain, guard, records
from mesh_durable import metrics as durable_metrics
from mesh_durable.ledger import BUCKET, Ledger
from mesh_host import Mesh
from mesh_kit import Delivery
from mesh_kit.delivery import Reject
from mesh_tenancy import tenancy
from mesh_tool_executor import metrics as tool_executor_metrics
from mesh_tool_executor.approvals import Approvals
from mesh_tool_executor.held import HeldCalls
from mesh_tool_executor.notes import KVNotes
from mesh_tool_executor.policy import decide
from mesh_tool_executor.reporting import Reporter
from mesh_tool_executor.running import Runner, scoped
from mesh_tool_executor.settings import ToolExecutorSettings
from mesh_tool_executor.tool_changes import ToolChanges
from mesh_tool_executor.tool_servers import TenantServers
from mesh_tool_executor.tools import Registry, Tool, ToolError, with_policy


class ToolExecutor:
    def __init__(
        self, mesh: Mesh, settings: ToolExecutorSettings | None = None, registry: Registry | None = None
    ) -> None:
        self.mesh = mesh
        self.settings = settings if settings is not None else ToolExecutorSettings.defaults()
        self.registry = registry or Registry()
        self.ledger: Ledger | None = None
        self.audit = chain.of(mesh)
        self.bundles = records.Bundles(None)  # the releases bucket, from start()
        self.tasks: Any = None
        self.approvals: Approvals | None = None
        self.report = Reporter(mesh, self.settings, self.audit, lambda: self.tasks)  # answers and audit records
        self.runner = Runner(mesh, self.settings, self.registry, self.audit, ledger=lambda: self.ledger,
                             tasks=lambda: self.tasks)  # fmt: skip
        self.servers = TenantServers(mesh, self.settings, self.audit)  # the tenants' own tool servers
        self.changes = ToolChanges(mesh, self.settings, self.audit, self.registry, self.servers)
        self.held = HeldCalls(mesh, self.settings, self.registry_for, self.report, self.runner,
                              approvals=lambda: self.approvals, tasks=lambda: self.tasks)  # fmt: skip
        self._apply_policy()

    def _apply_policy(self) -> None:
        for name, overrides in self.settings.policy.items():
            tool = self.registry.get(name)
            if tool is not None:  # MCP tools get theirs when mounted
                self.registry.add(with_policy(tool, overrides))

    def registry_for(self, tenant: str, tool: str) -> Registry:
        """Where ``tool`` is looked up for ``tenant``: the tenant's own servers' tools, else the mesh's
        (built-ins and mounted MCP servers). Another tenant's tools are in neither."""
        own = self.servers.registry(tenant)
        return own if tool in own.tools else self.registry

    async def start(self) -> None:
        redis = self.runner.limiter.connect()
        if redis is not None:
            self.mesh.depend(redis)
        self.ledger = Ledger(await self.mesh.kv(BUCKET), self.mesh.service)
        self.tasks = await self.mesh.kv("tasks")
        self.bundles = records.Bundles(await self.mesh.kv("releases"))
        self.runner.notes = KVNotes(await self.mesh.kv("notes"), self.mesh.nc, self.settings.notes_per_tenant)
        self.approvals = Approvals(
            await self.mesh.kv("approvals"), self.held.settle, nc=self.mesh.nc, ended=self.held.ended_seen
        )
        self.approvals.start()
        tools = await self.mesh.kv("tools")
        await tools.put(ToolCatalogue.KEY, self.registry.catalogue().to_bytes())  # built-ins at once
        if self.settings.mcp_config:
            await self.runner.mount_mcp(str(self.settings.mcp_config))
            await tools.put(ToolCatalogue.KEY, self.registry.catalogue().to_bytes())
        await self.servers.start(await self.mesh.kv("toolservers"))

    async def stop(self) -> None:
        await self.servers.stop()
        if self.approvals is not None:
            await self.approvals.stop()
        await self.runner.close()

    def register(self) -> None:
        guard.enable(self.mesh)
        self.mesh.on_start(self.start)
        self.mesh.on_stop(self.stop)
        self.mesh.consume(ToolRequested, self.on_request)
        self.mesh.consume(ApprovalDecided, self.on_decision)
        self.mesh.consume(ToolsChange, self.changes.on_change)

    # --- handlers -------------------------------------------------------------------------------

    async def on_request(self, m: ToolRequested, d: Delivery) -> None:
        stop = await g.check(m.tenant, m.task_id) if (g := guard.of(self.mesh)) is not None else None
        if stop is not None:
            # Not run and not recorded: after a resume the step is dispatched afresh.
            self.mesh.count(durable_metrics.M_CALLS_REFUSED)
            await self.report.answer(m, {"ok": False, "result": "", "error": f"not run: {stop.reason}"}, None,
                                     causation=d.msg_id, stopped="halted" if stop.halted else "stopped")  # fmt: skip
            return
        try:
            registry = self.registry_for(m.tenant, m.tool)
            tool, args = registry.validate(m.tool, scoped(m, registry.get(m.tool)))
        except ToolError as exc:
            await self.report.audit(m, None, "invalid", (str(exc),))
            await self.report.answer(m, {"ok": False, "result": "", "error": str(exc)}, None, causation=d.msg_id)
            return
        bundle = await self.bundles.bundle(m.tenant, m.release)
        if bundle is not None and m.tool in bundle.tools.deny:
            # The task's release takes the tool away (the worker does not offer it either).
            reason = f"release {m.release} denies tool {m.tool}"
            await self.report.audit(m, tool, "blocked", (reason,), by="release")
            await self.report.answer(m, {"ok": False, "result": "", "error": f"refused by policy: {reason}",
                                         "untrusted": False, "denied": True}, tool, causation=d.msg_id)  # fmt: skip
            return
        if m.replay is not None and tool.risk != "read":
            await self._dry_run(m, tool, d)
            return
        goal = await self.report.goal(m) if tool.risk != "read" else ""
        decision = decide(tool, args, m.taint, goal) if tool.risk != "read" else None
        if decision is None or decision.verdict == "allow":
            if decision is not None:
                await self.report.audit(m, tool, "allowed", decision.reasons, by="policy", goal=goal)
            outcome = await self.runner.run_recorded(m, tool, args, d)
            await self.report.answer(m, outcome, tool, causation=d.msg_id)
        elif decision.verdict == "deny":
            await self.report.audit(m, tool, "blocked", decision.reasons, by="policy", goal=goal)
            error = f"refused by policy: {'; '.join(decision.reasons[:2])}"
            await self.report.answer(m, {"ok": False, "result": "", "error": error, "untrusted": False, "denied": True},
                                     tool, causation=d.msg_id)  # fmt: skip
        else:
            await self.held.ask(m, tool, decision, d, goal)

    async def _dry_run(self, m: ToolRequested, tool: Tool, d: Delivery) -> None:
        """A replayed task's write or external call: not performed, not put to a human. It is
        answered with the replayed task's recorded outcome of the same call (so the replay goes
        on as the original did), or with a note that it was not performed; audited as allowed
        with the reason, and the answer says ``dry_run``."""
        assert m.replay is not None
        recorded = None
        if self.ledger is not None:
            recorded = await self.ledger.recorded(self.ledger.key(m.tenant, m.replay.of, m.call_id))
        if recorded is not None:
            outcome = {k: recorded.get(k, "") for k in ("ok", "result", "error")}
            outcome["untrusted"] = bool(recorded.get("untrusted", tool.untrusted_output))
            how = f"answered with {m.replay.of}'s recorded result"
        else:
            note = f"[dry run] {tool.name} was not performed: task {m.task_id} replays {m.replay.of}"
            outcome = {"ok": True, "result": note, "error": "", "untrusted": False}
            how = f"{m.replay.of} recorded no result for {m.call_id}"
        self.mesh.count(tool_executor_metrics.M_TOOL_DRY_RUNS)
        await self.report.audit(m, tool, "allowed", (f"dry run in a replay of {m.replay.of}: not performed; {how}",),
                                by="replay")  # fmt: skip
        await self.report.answer(m, outcome, tool, causation=d.msg_id, dry_run=True)

    async def on_decision(self, m: ApprovalDecided, d: Delivery) -> None:
        # The bus has verified the signature and that the signer may produce decisions at all
        # (an approver); the decision must also name the identity that signed it.
        if m.decided_by != d.sender.name:
            raise Reject(f"decided_by {m.decided_by!r} is not the signer {d.sender.name!r}")
        if self.approvals is None:
            raise RuntimeError("approvals store not ready")
        rec = await self.approvals.get(m.approval_id)
        if rec is None:
            raise Reject(f"no approval {m.approval_id}")
        if (rec.tenant, rec.task_id) != (m.tenant, m.task_id):
            raise Reject(f"approval {m.approval_id} belongs to another task")
        refused = await self.held.may_not_decide(rec.tenant, d.sender)
        if refused is not None:
            # On the tenant's chain as well as in the dead letters: someone its approvers do not
            # include tried to decide one of its calls. The call still waits for them.
            await self.audit.append(
                rec.tenant, rec.task_id, "tool.decision-refused", f"{rec.call_id}:refused:{d.msg_id}",
                actor=d.sender.name, source=d.msg_id,
                detail={"step_id": rec.step_id, "call_id": rec.call_id, "tool": rec.tool,
                        "approval_id": rec.approval_id, "approved": m.approved, "reason": refused},
            )  # fmt: skip
            self.mesh.count(tool_executor_metrics.M_APPROVAL_DECISIONS_REFUSED)
            raise Reject(refused)
        decision: Literal["approved", "denied"] = "approved" if m.approved else "denied"
        ended = await self.held.ended_now(rec.tenant, rec.task_id) if rec.status == "pending" else None
        if ended is not None:
            # Too late to count: recorded (who decided what, and why it is void), performs nothing.
            rec, _ = await self.approvals.decide(m.approval_id, "void", d.sender.name, m.comment, void=ended,
                                                 decided=decision)  # fmt: skip
        else:
            rec, _ = await self.approvals.decide(m.approval_id, decision, d.sender.name, m.comment)
        if rec is not None and not rec.done:
            await self.held.settle(rec, causation=d.msg_id)


async def build(mesh: Mesh, settings: ToolExecutorSettings) -> ToolExecutor:
    svc = ToolExecutor(mesh, settings)
    tenancy.install(mesh)  # its tenants' doors and quotas (mesh_tenancy)
    svc.register()
    return svc


__all__ = ["ToolExecutor", "ToolExecutorSettings", "build"]
