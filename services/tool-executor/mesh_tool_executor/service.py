"""Tool-executor: validates and runs tool calls, answers with a result or a structured error."""

from __future__ import annotations

from mesh_contracts.v1 import ToolCompleted, ToolRequested
from mesh_kit import Delivery, Mesh
from mesh_tool_executor.tools import ToolError, execute


class ToolExecutor:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def register(self) -> None:
        self.mesh.consume(ToolRequested, self.on_request)

    async def on_request(self, m: ToolRequested, d: Delivery) -> None:
        try:
            result, ok, error = await execute(m.tool, m.arguments), True, ""
        except ToolError as exc:
            result, ok, error = "", False, str(exc)
        await self.mesh.publish(
            ToolCompleted(
                tenant=m.tenant,
                task_id=m.task_id,
                step_id=m.step_id,
                call_id=m.call_id,
                tool=m.tool,
                ok=ok,
                result=result,
                error=error,
            ),
            key=m.call_id,
            causation=d.msg_id,
        )
        await self.mesh.progress(
            m.tenant,
            m.task_id,
            "tool.completed",
            f"{m.tool} -> {result[:80] if ok else 'error: ' + error[:80]}",
            step_id=m.step_id,
            key=m.call_id,
        )


async def build(mesh: Mesh) -> ToolExecutor:
    svc = ToolExecutor(mesh)
    svc.register()
    return svc
