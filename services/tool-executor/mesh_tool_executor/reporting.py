"""What the tool-executor says about a call: its answer to the agent and its audit record.

The answer is ``tool.completed`` (with a progress event): when it carries outside content, a result
or an error alike, it is marked ``untrusted`` and scored by the injection detector. The audit
record is ``tool.audited``, for every write or external call and every refusal, appended to the
tenant's hash-chained audit too; its arguments are redacted, and where the effect lands is
recorded traceably without the value in clear (``Destination``: domain or host, a keyed hash,
the value sealed to the tenant's auditor).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, Literal

from nacl.public import PublicKey, SealedBox

from mesh_contracts.v1 import Destination, ToolAudited, ToolCompleted, ToolRequested
from mesh_durable import records
from mesh_durable.chain import Appender
from mesh_guardrails import metrics as guardrails_metrics
from mesh_guardrails.injection import score as injection_score
from mesh_guardrails.redact import redact, redact_value
from mesh_host import Mesh
from mesh_kit import envelope as env
from mesh_tool_executor import destinations as dst
from mesh_tool_executor import metrics as tool_executor_metrics
from mesh_tool_executor.settings import ToolExecutorSettings
from mesh_tool_executor.tools import Tool

# A trusted argument's role -> the kind of destination its value is.
_KIND_OF_ROLE: dict[dst.Role, Literal["email", "url", "value"]] = {
    "recipient": "email",
    "url": "url",
    "value": "value",
}


class Reporter:
    """Answers and audit records of calls. ``audit``: the tenants' audit chains; ``tasks``: KV
    ``tasks`` as it is once the service started (the tenant's goal, for where an effect lands)."""

    def __init__(self, mesh: Mesh, settings: ToolExecutorSettings, audit: Appender, tasks: Callable[[], Any]) -> None:
        self.mesh, self.settings, self.chain = mesh, settings, audit
        self._tasks = tasks

    async def answer(self, m: ToolRequested, outcome: dict[str, Any], tool: Tool | None, *, causation: str = "",
                     approval: str = "", stopped: Literal["", "halted", "stopped"] = "",
                     dry_run: bool = False) -> None:  # fmt: skip
        stopped = stopped or outcome.get("stopped", "")  # a task halted by the call (its credentials refused)
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
                route=outcome.get("route"),
            ),
            key=m.call_id,
            causation=causation or None,
        )
        shown = outcome["result"][:80] if outcome["ok"] else "error: " + outcome["error"][:80]
        shown += " (dry run: not performed)" if dry_run else ""
        await self.mesh.progress(
            m.tenant, m.task_id, "tool.completed", redact(f"{m.tool} -> {shown}"), step_id=m.step_id, key=m.call_id
        )

    async def audit(self, m: ToolRequested, tool: Tool | None, decision: str, reasons: tuple[str, ...] | list[str],
                    *, approval: str = "", by: str = "", goal: str | None = None, void: str = "") -> None:  # fmt: skip
        self.mesh.count(tool_executor_metrics.M_TOOL_DECISIONS)
        if goal is None and tool is not None and tool.trusted_args:
            goal = await self.goal(m)
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
            destinations=self.destinations(m, tool, goal or ""),
            void=void,
        )
        key = f"{m.call_id}:{decision}"
        await self.mesh.publish(record, key=key)
        # The same decision as a link of the tenant's tamper-evident chain (kept a year, not a
        # week; a removed or altered link shows in ``meshctl audit verify``).
        await self.chain.append(
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

    async def goal(self, m: ToolRequested) -> str:
        """The tenant's goal, as the planner recorded it: text no retrieved passage, tool output
        or model wrote ('' when unknown: then nothing counts as offered by it)."""
        tasks = self._tasks()
        if tasks is None:
            return ""
        rec = await records.task_record(tasks, m.tenant, m.task_id)
        return rec.goal if rec is not None else ""

    def destinations(self, m: ToolRequested, tool: Tool | None, goal: str) -> tuple[Destination, ...]:
        """Where the call's effect lands: traceable (domain or host, a keyed hash, the value sealed
        to the tenant's auditor) without the value in clear."""
        if tool is None or not tool.trusted_args:
            return ()
        offered = dst.offers(goal)
        auditor = self.mesh.verifier.bundle.auditors.get(m.tenant)
        out = []
        for arg in tool.trusted_args:
            name, role = dst.role_of(arg)
            value = m.arguments.get(name)
            for v in value if isinstance(value, list) else [value]:
                if not isinstance(v, str) or not v:
                    continue
                whole = dst.normalised(role, v)
                out.append(
                    Destination(
                        arg=name,
                        kind=_KIND_OF_ROLE[role],
                        where=dst.where(role, v),
                        digest=dst.digest(self.settings.audit_key, m.tenant, role, v)
                        if self.settings.audit_key else "",
                        sealed=base64.b64encode(SealedBox(PublicKey(auditor)).encrypt(whole.encode())).decode()
                        if auditor else "",
                        offered=offered.offers(role, v),
                    )
                )  # fmt: skip
        return tuple(out[:16])
