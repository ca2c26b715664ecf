"""A step's tools: what its model is offered, and each call it makes sent to the service that answers it.

The worker serves two tools itself (``search_docs``, sent to rag as ``retrieval.requested``, and
``await_step``); every other tool, with the schema the executor validates against, comes from the
tool-executor's catalogue (KV ``tools``) and is sent as ``tool.requested``. A call not answered
by its deadline becomes an error observation: the timer runs in the process and is re-armed
whenever the step resumes from its checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from mesh_agent import releases
from mesh_contracts.v1 import Citation, RetrievalRequested, ToolRequested
from mesh_contracts.v1.records import ToolCatalogue
from mesh_durable import records
from mesh_guardrails.provenance import Text
from mesh_host import Mesh
from mesh_kit import Delivery
from mesh_kit.delivery import Retry
from mesh_llm import ToolSpec
from mesh_worker.checkpoint import StepRun
from mesh_worker.profiles import Profiles
from mesh_worker.settings import WorkerSettings

log = logging.getLogger("mesh.worker")

TOOLS: dict[str, ToolSpec] = {
    # Only the tools the worker serves without the tool-executor: retrieval (rag) and waiting for
    # another step. Every other tool, with its schema, comes from the executor's catalogue.
    "search_docs": ToolSpec(
        "search_docs",
        "Retrieve passages from the tenant's documents.",
        {
            "type": "object",
            "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}},
            "required": ["query"],
        },
    ),
    "await_step": ToolSpec(
        "await_step",
        "Wait for another step of this task to complete and return its output.",
        {"type": "object", "properties": {"step_id": {"type": "string"}}, "required": ["step_id"]},
    ),
}
RETRIEVAL_TOOL = "search_docs"


class Observe(Protocol):
    """``Loop.observe``: what answers a step's call in flight (here: the worker's own words)."""

    async def __call__(
        self,
        tenant: str,
        task_id: str,
        step_id: str,
        call_id: str,
        tool: str,
        text: Text,
        citations: list[Citation],
        d: Delivery | None = None,
        *,
        error: bool = False,
    ) -> None: ...


class Calls:
    """The tools a step offers its model (``specs``), its calls sent (``send``) and their timeouts.
    ``bundles``: the releases bucket, as it is once the worker started; ``observe``: where a call
    the step may not make, or one not answered in time, is answered."""

    def __init__(
        self, mesh: Mesh, settings: WorkerSettings, bundles: Callable[[], records.Bundles], observe: Observe
    ) -> None:
        self.mesh, self.settings = mesh, settings
        self._bundles, self._observe = bundles, observe
        self.catalogue: dict[str, ToolSpec] = {}
        # KV ``tools``: what the tool-executor serves every tenant; KV ``toolservers``: each tenant's own
        self.tools = records.TenantCatalogues(None, None)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.profiles = Profiles()  # the loop's: a step's agent profile scopes its retrievals

    # --- what the model is offered ----------------------------------------------------------

    async def start(self, tools: Any, servers: Any = None) -> None:
        """Follow the catalogue in KV ``tools`` and the tenants' own (KV ``toolservers``), each read
        again at most once a second."""
        self.tools = records.TenantCatalogues(tools, servers)
        await self.read_catalogue(fresh=True)

    async def read_catalogue(self, *, fresh: bool = False) -> None:
        """The tool-executor's catalogue (built-ins and mounted MCP tools), so a step can be
        offered any tool the executor serves, with the schema the executor validates against."""
        catalogue = await self.tools.mesh.get(fresh=fresh)
        if catalogue is not None:  # (None: not written yet, the executor is starting)
            self.use_catalogue(catalogue)

    def use_catalogue(self, catalogue: ToolCatalogue) -> None:
        """Offer the tools of this catalogue (what the executor publishes: ``Registry.catalogue()``)."""
        self.catalogue = {t.name: ToolSpec(t.name, t.description, t.parameters) for t in catalogue.tools}

    async def specs(self, names: tuple[str, ...], tenant: str = "") -> tuple[ToolSpec, ...]:
        """The tools a step of ``tenant`` offers: the mesh's, and the tenant's own servers' approved
        tools (``<server>__<tool>``), which no other tenant's step is ever offered."""
        own: dict[str, ToolSpec] = {}
        if tenant and any("__" in n and n not in self.catalogue for n in names):
            tools = await self.tools.own(tenant)
            own = {t.name: ToolSpec(t.name, t.description, t.parameters) for t in tools}
        offered = {**self.catalogue, **own}
        missing = [n for n in names if n not in TOOLS and n not in offered]
        if missing:
            await self.read_catalogue()  # a tool the executor mounted after this worker started
            offered = {**self.catalogue, **own}
            missing = [n for n in missing if n not in offered]
        if missing and not self.catalogue:
            # The executor has not published its catalogue yet (starting): wait for it rather
            # than run the step without the tools it was planned with.
            raise Retry(f"the tool-executor's catalogue is not available yet (step offers {', '.join(missing)})")
        if missing:
            log.warning("step offers tool(s) the tool-executor does not serve: %s", ", ".join(missing))
        return tuple(TOOLS.get(n) or offered[n] for n in names if n in TOOLS or n in offered)

    # --- a call sent, and its timeout -------------------------------------------------------

    async def send(self, run: StepRun, call_id: str, tool: str, assistant: dict[str, Any]) -> None:
        req = run.request
        pending = run.pending
        if pending is not None and pending.arguments:  # the worker's own call, made without a model turn
            args = pending.arguments
        else:
            args = assistant["tool_calls"][0]["arguments"] if assistant.get("tool_calls") else {}
        sid = req.step.step_id
        denied = releases.denied(await self._bundles().bundle(req.tenant, req.release))
        if tool not in req.step.tools or tool in denied:
            # A tool the step does not offer (a model's invention, or an instruction injected into
            # its context), or one the task's release takes away: an observation the model can
            # recover from, never a dispatch.
            offered = ", ".join(t for t in req.step.tools if t not in denied) or "none"
            note = Text.trusted(f"error: tool {tool!r} is not available in this step (offered: {offered})", "worker")
            await self._observe(req.tenant, req.task_id, sid, call_id, tool, note, [], error=True)
            return
        if pending is not None and pending.deadline:
            self.arm(req.tenant, req.task_id, sid, call_id, tool, pending.deadline)
        if tool == RETRIEVAL_TOOL:
            profile = await self.profiles.get(req.tenant, req.step.agent)
            await self.mesh.publish(
                RetrievalRequested(
                    tenant=req.tenant,
                    task_id=req.task_id,
                    step_id=sid,
                    call_id=call_id,
                    query=str(args.get("query", ""))[:2000] or "?",
                    top_k=int(args.get("top_k", 3)),
                    scope=profile.documents if profile is not None else (),
                ),
                key=call_id,
            )
        else:
            await self.mesh.publish(
                ToolRequested(
                    tenant=req.tenant,
                    task_id=req.task_id,
                    step_id=sid,
                    call_id=call_id,
                    tool=tool,
                    arguments=args,
                    taint=run.taint,
                    replay=req.replay,
                ),
                key=call_id,
            )
        await self.mesh.progress(
            req.tenant, req.task_id, "tool.called", f"{tool}({json.dumps(args)[:80]})", step_id=sid, key=call_id
        )

    def arm(self, tenant: str, task_id: str, step_id: str, call_id: str, tool: str, deadline: float) -> None:
        """A call not answered by its deadline becomes an error observation (the loop goes on).
        In-process timer, re-armed whenever the step is resumed from its checkpoint."""
        if call_id in self._timers:
            return

        def fire() -> None:
            self._timers.pop(call_id, None)
            msg = Text.trusted(f"error: {tool} did not answer within {self.settings.tool_timeout_s:g} s (timed out)",
                               "worker")  # fmt: skip
            task = asyncio.ensure_future(self._observe(tenant, task_id, step_id, call_id, tool, msg, [], error=True))
            task.add_done_callback(_log_failure)

        delay = max(0.0, deadline - time.time())
        self._timers[call_id] = asyncio.get_running_loop().call_later(delay, fire)

    def cancel(self, call_id: str) -> None:
        """The call was answered (or is waited for anew): its timer, if armed here, stops."""
        if (timer := self._timers.pop(call_id, None)) is not None:
            timer.cancel()


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("tool timeout could not be applied: %s", task.exception())
