"""Tool-executor: validates tool calls, applies the tool policy, runs tools, answers the agent.

A call goes: validate the arguments (a hallucinated tool or bad arguments is a structured
error, nothing runs) -> the policy (``policy.py``) -> run now, or wait durably for a human
(``approvals.py``), or refuse -> the result, with its injection score when the tool's output
is outside content. Every call that runs goes through the idempotency ledger under its
deterministic call id: a redelivered request returns the recorded result instead of running
the tool again, and an external effect is handed the same key as its own idempotency key.
Every write or external call and every refusal is recorded as ``tool.audited``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from nacl.public import PublicKey, SealedBox

from mesh_contracts.v1 import (
    ApprovalDecided,
    ApprovalRequested,
    Destination,
    ToolAudited,
    ToolCompleted,
    ToolRequested,
)
from mesh_contracts.v1.records import TERMINAL, StatusRecord, TaskRecord, ToolCatalogue
from mesh_durable import chain, guard, records
from mesh_durable import metrics as durable_metrics
from mesh_durable.ledger import BUCKET, Ledger
from mesh_durable.tail import Reader
from mesh_guardrails import metrics as guardrails_metrics
from mesh_guardrails.injection import score as injection_score
from mesh_guardrails.redact import redact, redact_value
from mesh_identity import Principal
from mesh_kit import Delivery, Mesh
from mesh_kit import envelope as env
from mesh_kit.delivery import Reject
from mesh_kit.faults import crash_point
from mesh_tenancy import tenancy
from mesh_tool_executor import destinations, net
from mesh_tool_executor import metrics as tool_executor_metrics
from mesh_tool_executor.approvals import ApprovalRecord, Approvals, approval_id
from mesh_tool_executor.limits import RateLimiter
from mesh_tool_executor.policy import Decision, decide
from mesh_tool_executor.settings import ToolExecutorSettings
from mesh_tool_executor.tools import (
    MemoryNotes,
    Notes,
    Registry,
    StepLookup,
    Tool,
    ToolContext,
    ToolError,
    with_policy,
)

if TYPE_CHECKING:
    from mesh_tool_executor.mcp_mount import McpMount  # imported when a mount is configured: the SDK is slow

log = logging.getLogger("mesh.tool-executor")

# A trusted argument's role -> the kind of destination its value is.
_KIND_OF_ROLE: dict[destinations.Role, Literal["email", "url", "value"]] = {
    "recipient": "email",
    "url": "url",
    "value": "value",
}


class KVNotes(Notes):
    """Notes in the ``notes`` bucket, key ``<tenant>.<note id>``: durable and tenant-scoped (the
    tenant comes from the verified message, never from the arguments)."""

    def __init__(self, kv: Any, nc: Any, max_per_tenant: int = 0) -> None:
        self.kv = kv
        self.reader = Reader(nc, "KV_notes")
        self.max_per_tenant = max_per_tenant
        """Most notes a tenant may keep (``MESH_NOTES_PER_TENANT``; 0: no limit): the bucket holds
        every tenant's, so one tenant's agents must not be able to fill it."""

    async def get(self, tenant: str, note_id: str) -> str | None:
        try:
            entry = await self.kv.get(f"{tenant}.{note_id}")
        except Exception:  # noqa: BLE001 - KeyNotFoundError and a deleted key both mean "no note"
            return None
        return entry.value.decode() if entry.value else None

    async def put(self, tenant: str, note_id: str, text: str) -> None:
        if self.max_per_tenant and await self.get(tenant, note_id) is None:
            held = len(await self.list(tenant))
            if held >= self.max_per_tenant:
                raise ToolError(
                    f"quota: tenant {tenant} keeps {held} notes, its limit of {self.max_per_tenant}; "
                    "replace or delete one first"
                )
        await self.kv.put(f"{tenant}.{note_id}", text.encode())

    async def delete(self, tenant: str, note_id: str) -> bool:
        if await self.get(tenant, note_id) is None:
            return False
        await self.kv.delete(f"{tenant}.{note_id}")
        return True

    async def list(self, tenant: str) -> list[str]:
        # The current value of every key under the tenant's own prefix, filtered by the server
        # (one direct get; nats-py's keys(filters=) would read every tenant's keys, and a watch
        # needs a consumer).
        current = await self.reader.current("notes", f"{tenant}.>")
        return sorted(key.split(".", 1)[1] for key in current)


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
        self.notes: Notes = MemoryNotes()
        self.limiter = RateLimiter(
            mesh.settings.redis_url if mesh.settings else "",
            on_local=lambda: mesh.count(tool_executor_metrics.M_RATE_LIMIT_LOCAL),
        )
        self.mcp: McpMount | None = None
        self._apply_policy()

    def _apply_policy(self) -> None:
        for name, overrides in self.settings.policy.items():
            tool = self.registry.get(name)
            if tool is not None:  # MCP tools get theirs when mounted
                self.registry.add(with_policy(tool, overrides))

    async def start(self) -> None:
        redis = self.limiter.connect()
        if redis is not None:
            self.mesh.depend(redis)
        self.ledger = Ledger(await self.mesh.kv(BUCKET), self.mesh.service)
        self.tasks = await self.mesh.kv("tasks")
        self.bundles = records.Bundles(await self.mesh.kv("releases"))
        self.notes = KVNotes(await self.mesh.kv("notes"), self.mesh.nc, self.settings.notes_per_tenant)
        self.approvals = Approvals(
            await self.mesh.kv("approvals"), self._settle, nc=self.mesh.nc, ended=self._ended_seen
        )
        self.approvals.start()
        tools = await self.mesh.kv("tools")
        await tools.put(ToolCatalogue.KEY, self.registry.catalogue().to_bytes())  # built-ins at once
        if self.settings.mcp_config:
            await self._mount_mcp(str(self.settings.mcp_config))
            await tools.put(ToolCatalogue.KEY, self.registry.catalogue().to_bytes())

    async def stop(self) -> None:
        if self.approvals is not None:
            await self.approvals.stop()
        if self.mcp is not None:
            await self.mcp.close()
        await self.limiter.close()

    async def _mount_mcp(self, path: str) -> None:
        # Imported here: the MCP SDK takes ~1.7 s to import, a cost only a configured mount pays.
        from mesh_tool_executor.mcp_mount import McpMount, McpToolError, load_config

        # "python" in a server's command means this interpreter (the tool-executor's own
        # environment, where a bundled server's package is installed), not whatever is on PATH.
        configs = [replace(c, command=sys.executable) if c.command == "python" else c for c in load_config(path)]
        self.mcp = mount = McpMount(configs)
        await mount.start()
        for name, why in getattr(mount, "errors", {}).items():
            log.error("MCP server %s not mounted: %s", name, why)
        for mt in mount.tools():
            overrides = {**mt.policy, **self.settings.policy.get(mt.name, {})}

            async def run(args: Any, ctx: ToolContext, _name: str = mt.name) -> str:
                tool = self.registry.get(_name)
                try:
                    return await mount.call(_name, dict(args), timeout_s=tool.timeout_s if tool else 30.0)
                except McpToolError as exc:
                    raise ToolError(str(exc)) from None

            base = Tool(
                mt.name,
                mt.description or f"{mt.remote_name} (MCP server {mt.server})",
                None,
                run,
                risk=mt.risk,  # the config's word (per tool, else the server's default_risk), never the server's hints
                timeout_s=30.0,
                untrusted_output=True,  # another program's answer: content, never instructions
                input_schema=mt.input_schema,
                source=f"mcp:{mt.server}",
            )
            self.registry.add(with_policy(base, overrides))
            log.info("mounted MCP tool %s (risk %s)", mt.name, self.registry.get(mt.name).risk)  # type: ignore[union-attr]

    def register(self) -> None:
        guard.enable(self.mesh)
        self.mesh.on_start(self.start)
        self.mesh.on_stop(self.stop)
        self.mesh.consume(ToolRequested, self.on_request)
        self.mesh.consume(ApprovalDecided, self.on_decision)

    # --- the effect sink and the context a tool runs in -----------------------------------------

    async def _effect(self, suffix: str, payload: bytes, key: str) -> str:
        ack = await self.mesh.nc.jetstream().publish(
            f"outbox.{suffix}", payload, headers={"Nats-Msg-Id": key}, timeout=10.0
        )
        crash_point("after_effect")  # fault injection for the chaos suite: effect done, not yet recorded
        return f"outbox #{ack.seq}"

    async def _fetch(self, url: str) -> str:
        try:
            r = await net.fetch(url, allow=self.settings.allow)
        except net.NetError as exc:
            raise ToolError(str(exc)) from None
        more = " [truncated]" if r.truncated else ""
        return f"HTTP {r.status} {r.final_url} ({r.content_type}){more}\n\n{r.text}"

    def _step_lookup(self, tenant: str, task_id: str) -> StepLookup:
        async def lookup(step_id: str) -> tuple[str, str, str]:
            rec = await records.task_record(self.tasks, tenant, task_id)
            if rec is None:
                return "", "", ""
            s = rec.steps.get(step_id)
            return rec.status, (s.status if s else ""), (s.output if s else "")

        return lookup

    async def _goal(self, m: ToolRequested) -> str:
        """The tenant's goal, as the planner recorded it: text no retrieved passage, tool output
        or model wrote ('' when unknown: then nothing counts as offered by it)."""
        if self.tasks is None:
            return ""
        rec = await records.task_record(self.tasks, m.tenant, m.task_id)
        return rec.goal if rec is not None else ""

    def _destinations(self, m: ToolRequested, tool: Tool | None, goal: str) -> tuple[Destination, ...]:
        """Where the call's effect lands: traceable (domain or host, a keyed hash, the value sealed
        to the tenant's auditor) without the value in clear."""
        if tool is None or not tool.trusted_args:
            return ()
        offered = destinations.offers(goal)
        auditor = self.mesh.verifier.bundle.auditors.get(m.tenant)
        out = []
        for arg in tool.trusted_args:
            name, role = destinations.role_of(arg)
            value = m.arguments.get(name)
            for v in value if isinstance(value, list) else [value]:
                if not isinstance(v, str) or not v:
                    continue
                whole = destinations.normalised(role, v)
                out.append(
                    Destination(
                        arg=name,
                        kind=_KIND_OF_ROLE[role],
                        where=destinations.where(role, v),
                        digest=destinations.digest(self.settings.audit_key, m.tenant, role, v)
                        if self.settings.audit_key else "",
                        sealed=base64.b64encode(SealedBox(PublicKey(auditor)).encrypt(whole.encode())).decode()
                        if auditor else "",
                        offered=offered.offers(role, v),
                    )
                )  # fmt: skip
        return tuple(out[:16])

    # --- running a call -------------------------------------------------------------------------

    async def _run(
        self, m: ToolRequested, tool: Tool, args: Any, key: str, delivery: Delivery | None
    ) -> dict[str, Any]:
        ctx = ToolContext(
            tenant=m.tenant,
            task_id=m.task_id,
            key=key,
            effect=self._effect,
            step_state=self._step_lookup(m.tenant, m.task_id) if self.tasks is not None else None,
            notes=self.notes,
            fetch=self._fetch,
        )
        try:
            wait = await self.limiter.take(m.tenant, tool.name, tool.rate_per_min)
            if wait > 0:
                error = (f"rate limited: {tool.name} allows {tool.rate_per_min} calls per minute per tenant; "
                         f"try again in {wait:.0f}s")  # fmt: skip
                return {"ok": False, "result": "", "error": error, "untrusted": False}
            async with delivery.keepalive() if delivery is not None else contextlib.nullcontext():
                result = await self.registry.run(tool, args, ctx)
            return {"ok": True, "result": result, "error": "", "untrusted": tool.untrusted_output}
        except ToolError as exc:
            # A tool whose output is outside content fails with outside content too: an HTTP
            # error's status line and headers, an MCP server's error text. Same taint.
            return {"ok": False, "result": "", "error": str(exc), "untrusted": tool.untrusted_output}

    async def _run_recorded(self, m: ToolRequested, tool: Tool, args: Any, d: Delivery | None) -> dict[str, Any]:
        if self.ledger is None:  # in-memory tests without a KV store
            return await self._run(m, tool, args, f"{m.tenant}.{m.task_id}.{m.call_id}", d)
        key = self.ledger.key(m.tenant, m.task_id, m.call_id)
        outcome: dict[str, Any] = await self.ledger.run(
            key,
            lambda k: self._run(m, tool, args, k, d),
            owner=d.owner if d is not None else f"approval:{m.call_id}",
            attempt=d.deliveries if d is not None else 1,
        )
        if tool.risk != "read":
            # The effect itself, as a link of the tenant's chain beside the decision that let it
            # run: whether it succeeded, under which idempotency key, and a digest of what it
            # returned (not the result: it can be large, and the task's messages hold it). A
            # redelivery gets the recorded outcome and appends under the same key: stored once.
            await self.audit.append(
                m.tenant, m.task_id, "tool.performed", f"{m.call_id}:performed", actor="tool-executor",
                detail={"step_id": m.step_id, "call_id": m.call_id, "tool": m.tool, "risk": tool.risk,
                        "ok": bool(outcome.get("ok")), "error": redact(str(outcome.get("error", "")))[:300],
                        "result_sha256": hashlib.sha256(str(outcome.get("result", "")).encode()).hexdigest(),
                        "idempotency_key": key},
            )  # fmt: skip
        return outcome

    async def _answer(self, m: ToolRequested, outcome: dict[str, Any], tool: Tool | None, *, causation: str = "",
                      approval: str = "", stopped: Literal["", "halted", "stopped"] = "",
                      dry_run: bool = False) -> None:  # fmt: skip
        # Taint is the outcome's own (a ledger record made before it carried one: the tool's).
        untrusted = bool(outcome.get("untrusted", tool is not None and tool.untrusted_output))
        scored = injection_score(outcome["result"] if outcome["ok"] else outcome["error"]) if untrusted else None
        if scored is not None and scored.flagged:
            self.mesh.count(guardrails_metrics.M_INJECTION_FLAGGED)
        await self.mesh.publish(
            ToolCompleted(
                tenant=m.tenant,
                task_id=m.task_id,
                step_id=m.step_id,
                call_id=m.call_id,
                tool=m.tool,
                ok=outcome["ok"],
                result=outcome["result"],
                error=outcome["error"],
                untrusted=untrusted,
                injection_score=round(scored.score, 3) if scored else 0.0,
                injection_signals=scored.signals if scored else (),
                approval_id=approval,
                stopped=stopped,
                dry_run=dry_run,
                denied=bool(outcome.get("denied")),
            ),
            key=m.call_id,
            causation=causation or None,
        )
        shown = outcome["result"][:80] if outcome["ok"] else "error: " + outcome["error"][:80]
        shown += " (dry run: not performed)" if dry_run else ""
        await self.mesh.progress(
            m.tenant, m.task_id, "tool.completed", redact(f"{m.tool} -> {shown}"), step_id=m.step_id, key=m.call_id
        )

    async def _audit(self, m: ToolRequested, tool: Tool | None, decision: str, reasons: tuple[str, ...] | list[str],
                     *, approval: str = "", by: str = "", goal: str | None = None, void: str = "") -> None:  # fmt: skip
        self.mesh.count(tool_executor_metrics.M_TOOL_DECISIONS)
        if goal is None and tool is not None and tool.trusted_args:
            goal = await self._goal(m)
        record = ToolAudited(
            tenant=m.tenant,
            task_id=m.task_id,
            step_id=m.step_id,
            call_id=m.call_id,
            tool=m.tool,
            risk=tool.risk if tool else "",
            decision=decision,  # type: ignore[arg-type]
            reasons=tuple(redact(r)[:300] for r in reasons),
            arguments=redact_value(m.arguments),
            taint=m.taint,
            approval_id=approval,
            decided_by=by,
            destinations=self._destinations(m, tool, goal or ""),
            void=void,
        )
        key = f"{m.call_id}:{decision}"
        await self.mesh.publish(record, key=key)
        # The same decision as a link of the tenant's tamper-evident chain (kept a year, not a
        # week; a removed or altered link shows in ``meshctl audit verify``).
        await self.audit.append(
            m.tenant, m.task_id, f"tool.{decision}", key, actor=by or "tool-executor",
            source=env.message_id(record.type, m.tenant, m.task_id, key),
            detail={
                "step_id": m.step_id, "call_id": m.call_id, "tool": m.tool, "risk": record.risk,
                "reasons": list(record.reasons), "arguments": record.arguments, "approval_id": approval,
                "untrusted": m.taint.untrusted, "injection_score": m.taint.injection_score,
                "destinations": [{"arg": d.arg, "where": d.where, "digest": d.digest, "offered": d.offered}
                                 for d in record.destinations],
                **({"void": void} if void else {}),
            },
        )  # fmt: skip

    async def on_request(self, m: ToolRequested, d: Delivery) -> None:
        stop = await g.check(m.tenant, m.task_id) if (g := guard.of(self.mesh)) is not None else None
        if stop is not None:
            # Not run and not recorded: after a resume the step is dispatched afresh.
            self.mesh.count(durable_metrics.M_CALLS_REFUSED)
            await self._answer(m, {"ok": False, "result": "", "error": f"not run: {stop.reason}"}, None,
                               causation=d.msg_id, stopped="halted" if stop.halted else "stopped")  # fmt: skip
            return
        try:
            tool, args = self.registry.validate(m.tool, _scoped(m, self.registry.get(m.tool)))
        except ToolError as exc:
            await self._audit(m, None, "invalid", (str(exc),))
            await self._answer(m, {"ok": False, "result": "", "error": str(exc)}, None, causation=d.msg_id)
            return
        bundle = await self.bundles.bundle(m.tenant, m.release)
        if bundle is not None and m.tool in bundle.tools.deny:
            # The task's release takes the tool away (the worker does not offer it either).
            reason = f"release {m.release} denies tool {m.tool}"
            await self._audit(m, tool, "blocked", (reason,), by="release")
            await self._answer(m, {"ok": False, "result": "", "error": f"refused by policy: {reason}",
                                   "untrusted": False, "denied": True}, tool, causation=d.msg_id)  # fmt: skip
            return
        if m.replay is not None and tool.risk != "read":
            await self._dry_run(m, tool, d)
            return
        goal = await self._goal(m) if tool.risk != "read" else ""
        decision = decide(tool, args, m.taint, goal) if tool.risk != "read" else None
        if decision is None or decision.verdict == "allow":
            if decision is not None:
                await self._audit(m, tool, "allowed", decision.reasons, by="policy", goal=goal)
            outcome = await self._run_recorded(m, tool, args, d)
            await self._answer(m, outcome, tool, causation=d.msg_id)
        elif decision.verdict == "deny":
            await self._audit(m, tool, "blocked", decision.reasons, by="policy", goal=goal)
            error = f"refused by policy: {'; '.join(decision.reasons[:2])}"
            await self._answer(m, {"ok": False, "result": "", "error": error, "untrusted": False, "denied": True}, tool,
                               causation=d.msg_id)  # fmt: skip
        else:
            await self._ask(m, tool, decision, d, goal)

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
        await self._audit(m, tool, "allowed", (f"dry run in a replay of {m.replay.of}: not performed; {how}",),
                          by="replay")  # fmt: skip
        await self._answer(m, outcome, tool, causation=d.msg_id, dry_run=True)

    # --- approvals ------------------------------------------------------------------------------

    async def _ask(self, m: ToolRequested, tool: Tool, decision: Decision, d: Delivery | None, goal: str) -> None:
        aid = approval_id(m.tenant, m.task_id, m.call_id)
        if self.approvals is None:  # no durable store (in-memory tests): nobody can approve, so refuse
            await self._audit(m, tool, "blocked", (*decision.reasons, "no approval store"), by="policy", goal=goal)
            await self._answer(m, {"ok": False, "result": "", "error": "needs approval, and approvals are not "
                                   "available here", "untrusted": False}, tool)  # fmt: skip
            return
        now = time.time()
        rec, created = await self.approvals.open(
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
                await self._settle(rec)
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
                destinations=self._destinations(m, tool, goal),
            ),
            key=aid,
            causation=d.msg_id if d is not None else None,
        )
        if created:
            await self._audit(m, tool, "approval-requested", decision.reasons, approval=aid, by="policy", goal=goal)
            await self.mesh.progress(
                m.tenant, m.task_id, "approval.requested",
                f"{m.tool} waits for a human: meshctl approve {aid} (or deny); {decision.reasons[0]}"[:300],
                step_id=m.step_id, key=aid,
            )  # fmt: skip

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
        refused = await self._may_not_decide(rec.tenant, d.sender)
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
        ended = await self._ended_now(rec.tenant, rec.task_id) if rec.status == "pending" else None
        if ended is not None:
            # Too late to count: recorded (who decided what, and why it is void), performs nothing.
            rec, _ = await self.approvals.decide(m.approval_id, "void", d.sender.name, m.comment, void=ended,
                                                 decided=decision)  # fmt: skip
        else:
            rec, _ = await self.approvals.decide(m.approval_id, decision, d.sender.name, m.comment)
        if rec is not None and not rec.done:
            await self._settle(rec, causation=d.msg_id)

    async def _may_not_decide(self, tenant: str, sender: Principal) -> str | None:
        """Why ``sender`` may not decide ``tenant``'s calls, judged under the newest published trust
        bundle (read now: a person added or removed a moment ago counts already), or None.

        A tenant that names approvers has them alone: the console's own ``approver`` (bound to no
        tenant) may not decide its calls. With none named (or the last one removed), the console
        decides them, as before any were named."""
        return (await self.mesh.newest_trust()).may_decide(sender.name, tenant)

    async def _ended_now(self, tenant: str, task_id: str) -> str | None:
        """Why the task can no longer have a call performed, read now from its record (the
        planner's compare-and-set, the first place an end is written), or None while it may."""
        if self.tasks is None:
            return None
        rec = await records.task_record(self.tasks, tenant, task_id)
        return f"task ended ({rec.status})" if rec is not None and rec.status in TERMINAL else None

    async def _ended_seen(self, tenant: str, task_id: str) -> str | None:
        """The same from the guard's view of the ``status`` bucket (memory, kept current by its
        feed): cheap enough for the sweep that voids waits of ended tasks every second."""
        view = g.status_view if (g := guard.of(self.mesh)) is not None else None
        if view is None:
            return None
        raw = await view.get(TaskRecord.key(tenant, task_id))
        rec = StatusRecord.model_validate_json(raw) if raw else None
        return f"task ended ({rec.status})" if rec is not None and rec.status in TERMINAL else None

    async def _settle(self, rec: ApprovalRecord, causation: str = "") -> None:
        """Act on a decided approval exactly once in effect: run the call (under the ledger) or
        answer the refusal; both are deduplicated by the call id if repeated after a crash.

        An approved call is first committed to (``Approvals.commit``): ``started`` if its task
        still runs, else void. Only a started record is performed, and a started one always is,
        so a decision racing the task's end is performed or void, never both."""
        assert self.approvals is not None
        m = rec.request
        tool = self.registry.get(m.tool)
        stopped: Literal["", "halted", "stopped"] = ""
        if rec.status == "approved" and tool is not None and not rec.started:
            committed = await self.approvals.commit(rec.approval_id, await self._ended_now(m.tenant, m.task_id))
            rec = committed if committed is not None else rec
        if rec.status == "approved" and tool is not None:
            await self._audit(m, tool, "approved", (*rec.reasons[:1], f"approved by {rec.decided_by}"),
                              approval=rec.approval_id, by=rec.decided_by)  # fmt: skip
            try:
                _, args = self.registry.validate(m.tool, _scoped(m, tool))
            except ToolError as exc:  # held under a rule since tightened (an upgrade while it waited)
                await self._audit(m, tool, "invalid", (str(exc),), approval=rec.approval_id)
                outcome = {"ok": False, "result": "", "error": str(exc), "untrusted": False}
            else:
                outcome = await self._run_recorded(m, tool, args, None)
        elif rec.status == "void":
            # Nothing ran, and the task is over: what the audit, the agent's answer and the record
            # say is why (the task's end), and who decided what too late, if anyone did.
            late = (f"{rec.decided} by {rec.decided_by} after the task ended" if rec.decided
                    else "no decision before the task ended")  # fmt: skip
            await self._audit(m, tool, "blocked", (f"void: {rec.void}", late, *rec.reasons[:1]),
                              approval=rec.approval_id, by=rec.decided_by, void=rec.void)  # fmt: skip
            outcome = {"ok": False, "result": "", "error": f"not run: approval {rec.approval_id} void: {rec.void}",
                       "untrusted": False}  # fmt: skip
            stopped = "stopped"
            self.mesh.count(tool_executor_metrics.M_APPROVALS_VOID)
        else:
            verdict = "expired" if rec.status == "expired" else "denied"
            why = (f"no decision within {rec.deadline - rec.requested_at:g}s" if verdict == "expired"
                   else f"denied by {rec.decided_by}" + (f": {rec.comment}" if rec.comment else ""))  # fmt: skip
            await self._audit(m, tool, verdict, (*rec.reasons[:1], why), approval=rec.approval_id, by=rec.decided_by)
            # A person's comment is not the tool-executor's words: it reaches the model as untrusted text.
            outcome = {"ok": False, "result": "", "error": f"not run: approval {rec.approval_id} {verdict} ({why})",
                       "untrusted": bool(rec.comment), "denied": True}  # fmt: skip
        await self._answer(m, outcome, tool, causation=causation, approval=rec.approval_id, stopped=stopped)
        await self.approvals.mark_done(rec.approval_id)


def _scoped(m: ToolRequested, tool: Tool | None) -> dict[str, Any]:
    """The arguments with the tenant forced to the caller's own: a mounted tool that takes a
    ``tenant`` argument (an admin API, say) must never be pointed at another tenant by a model.
    A different tenant in the arguments is refused rather than silently rewritten."""
    args = dict(m.arguments)
    if tool is None or tool.input_schema is None or "tenant" not in tool.input_schema.get("properties", {}):
        return args
    asked = args.get("tenant", m.tenant)
    if asked != m.tenant:
        raise ToolError(f"{m.tool}: tenant {asked!r} is not this task's tenant; a tool acts for its own tenant only")
    args["tenant"] = m.tenant
    return args


def _for_approver(arguments: dict[str, Any], tool: Tool) -> dict[str, Any]:
    """What an approver sees: the arguments that decide where the effect lands (recipient, URL)
    as they are, everything else redacted (secrets and PII in a body are not theirs to read)."""
    return {k: (v if k in tool.destination_args else redact_value(v)) for k, v in arguments.items()}


async def build(mesh: Mesh, settings: ToolExecutorSettings) -> ToolExecutor:
    svc = ToolExecutor(mesh, settings)
    tenancy.install(mesh)  # its tenants' doors and quotas (mesh_tenancy)
    svc.register()
    return svc


__all__ = ["KVNotes", "ToolExecutor", "ToolExecutorSettings", "build"]
