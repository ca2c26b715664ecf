"""Tool-executor: validates and runs tool calls, answers with a result or a structured error.

Every call goes through the idempotency ledger under its deterministic call id: a
redelivered request returns the recorded result instead of running the tool again, and an
external effect is handed the same key as its own idempotency key.
"""

from __future__ import annotations

import contextlib
from typing import Any

from mesh_contracts.v1 import ToolCompleted, ToolRequested
from mesh_kit import Delivery, Mesh
from mesh_kit import state as st
from mesh_kit import telemetry as tel
from mesh_kit.faults import crash_point
from mesh_kit.ledger import BUCKET, Ledger
from mesh_kit.state import TaskRecord
from mesh_tool_executor.tools import ToolContext, ToolError, execute


class ToolExecutor:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.ledger: Ledger | None = None
        self.tasks: Any = None

    async def start(self) -> None:
        self.ledger = Ledger(await self.mesh.kv(BUCKET), self.mesh.service)
        self.tasks = await self.mesh.kv("tasks")

    def _step_lookup(self, tenant: str, task_id: str):
        async def lookup(step_id: str) -> tuple[str, str, str]:
            rec, _ = await st.load(self.tasks, TaskRecord.key(tenant, task_id), TaskRecord)
            if rec is None:
                return "", "", ""
            s = rec.steps.get(step_id)
            return rec.status, (s.status if s else ""), (s.output if s else "")

        return lookup

    def register(self) -> None:
        self.mesh.enable_guard()
        self.mesh.on_start(self.start)
        self.mesh.consume(ToolRequested, self.on_request)

    async def _effect(self, suffix: str, payload: bytes, key: str) -> str:
        ack = await self.mesh.nc.jetstream().publish(
            f"outbox.{suffix}", payload, headers={"Nats-Msg-Id": key}, timeout=10.0
        )
        crash_point("after_effect")  # fault injection for the chaos suite: effect done, not yet recorded
        return f"outbox #{ack.seq}"

    async def _run(self, m: ToolRequested, key: str, delivery: Delivery | None = None) -> dict[str, Any]:
        ctx = ToolContext(
            tenant=m.tenant,
            task_id=m.task_id,
            key=key,
            effect=self._effect,
            step_state=self._step_lookup(m.tenant, m.task_id) if self.tasks is not None else None,
        )
        try:
            async with delivery.keepalive() if delivery is not None else contextlib.nullcontext():
                result = await execute(m.tool, m.arguments, ctx)
            return {"ok": True, "result": result, "error": ""}
        except ToolError as exc:
            return {"ok": False, "result": "", "error": str(exc)}

    async def on_request(self, m: ToolRequested, d: Delivery) -> None:
        stop = await self.mesh.guard.check(m.tenant, m.task_id) if self.mesh.guard is not None else None
        if stop is not None:
            # Not run and not recorded: after a resume the step is dispatched afresh.
            self.mesh.count(tel.M_CALLS_REFUSED)
            outcome = {"ok": False, "result": "", "error": f"not run: {stop.reason}"}
        elif self.ledger is not None:
            outcome = await self.ledger.run(
                self.ledger.key(m.tenant, m.task_id, m.call_id),
                lambda k: self._run(m, k, d),
                owner=d.owner,
                attempt=d.deliveries,
            )
        else:  # in-memory tests without a KV store
            outcome = await self._run(m, f"{m.tenant}.{m.task_id}.{m.call_id}")
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
            ),
            key=m.call_id,
            causation=d.msg_id,
        )
        shown = outcome["result"][:80] if outcome["ok"] else "error: " + outcome["error"][:80]
        await self.mesh.progress(
            m.tenant, m.task_id, "tool.completed", f"{m.tool} -> {shown}", step_id=m.step_id, key=m.call_id
        )


async def build(mesh: Mesh) -> ToolExecutor:
    svc = ToolExecutor(mesh)
    svc.register()
    return svc
