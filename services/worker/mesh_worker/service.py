"""Worker: runs one plan step as an agent loop (model call -> tool call -> observation -> ...).

The loop is event-driven and checkpointed: each iteration's state (messages, usage,
pending call) is a record in the ``steps`` KV bucket. A tool or retrieval call is a
message to the tool-executor or RAG service; its answer arrives on this service's own
durable and continues the loop, on whichever worker replica fetches it. A worker that
dies mid-step loses nothing: the next delivery resumes from the checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr

from mesh_agent import prompts, releases
from mesh_agent.metered import BudgetExceeded, Models, call_model_once, configured
from mesh_agent.prompts import Prompt
from mesh_contracts.v1 import (
    ApprovalRequested,
    Citation,
    HeldCall,
    RetrievalCompleted,
    RetrievalRequested,
    SignedRecord,
    StepCompleted,
    StepFailed,
    StepRequested,
    Taint,
    TokenDelta,
    TokenUsage,
    ToolCompleted,
    ToolRequested,
)
from mesh_contracts.v1.records import ToolCatalogue
from mesh_durable import guard, records
from mesh_durable import metrics as durable_metrics
from mesh_durable.ledger import BUCKET as LEDGER
from mesh_durable.ledger import Ledger
from mesh_guardrails.injection import UNTRUSTED_NOTICE, score_many
from mesh_guardrails.provenance import Text
from mesh_kit import Delivery, Mesh
from mesh_kit import envelope as env
from mesh_kit import state as st
from mesh_kit.delivery import Retry
from mesh_llm import ChatModel, Message, ModelRequest, ModelResponse, ProviderError, ToolCall, ToolSpec
from mesh_llm.context import clip
from mesh_llm.model import Role
from mesh_tenancy import tenancy
from mesh_worker import metrics as worker_metrics
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
SYSTEM_PROMPT = prompts.load("mesh_worker", "system")
"""The packaged system prompt (``prompts/system.md``). A worker begins every step with it, or
with its ``MESH_PROMPTS_DIR`` override (``Worker.system_prompt``); its ``ref`` is recorded on
every model call and on ``step.completed``."""
FORWARD_MAX_BYTES = 256 * 1024
"""Retrieval records a step hands on to the checker, at most (a step's few searches take a
few KB each); past it the newest are left out, and citations of theirs fail to resolve."""


class PendingCall(BaseModel):
    call_id: str
    tool: str
    deadline: float = 0.0
    """Wall-clock time after which the call counts as timed out (an observation, not a crash)."""


class StepRun(BaseModel):
    """Checkpoint of one step's agent loop (``steps`` bucket, key ``<tenant>.<task>.<step>``)."""

    model_config = ConfigDict(extra="allow")

    request: StepRequested
    attempt: int
    status: str = "running"  # running | completed | failed
    iteration: int = 0
    messages: list[dict[str, Any]] = []
    usage: TokenUsage = TokenUsage()
    citations: list[Citation] = []
    pending: PendingCall | None = None
    outcome: dict[str, Any] | None = None  # the StepCompleted/StepFailed body, for re-publishing
    taint: Taint = Taint()
    """Untrusted content in the context so far (declared on every tool request; inherited by
    steps that take this step's output as input). Grows only through ``admit``."""
    held: list[HeldCall] = []
    """Calls held for a human that the loop went on without (``on_held`` ``continue``)."""
    models: list[str] = []
    """``provider/model`` of the loop's model calls, distinct, in first-use order."""
    retrievals: list[SignedRecord] = []
    """The retrieval results the loop read, as rag signed them (handed on to the checker)."""
    prompt_version: str = ""
    """Ref of the system prompt the loop began with ('' in a checkpoint written before prompts
    were versioned: see ``prompt_version``)."""
    fixed_output: str = ""
    """A fixed call's result (``PlanStep.call``), as the tool or retrieval gave it: the step's output."""
    fixed_error: bool = False
    """The fixed call failed (its result is the error): the step fails."""
    tool_denials: int = 0
    """Calls of the step a rule or a person refused (``ToolCompleted.denied``)."""
    _unstored: bool = PrivateAttr(default=False)
    """Begun from its request in this process, not written yet (see ``Worker.on_step``)."""

    @staticmethod
    def key(tenant: str, task_id: str, step_id: str) -> str:
        return f"{tenant}.{task_id}.{step_id}"


class Worker:
    def __init__(self, mesh: Mesh, model: ChatModel | Models, settings: WorkerSettings | None = None) -> None:
        self.mesh, self.model = mesh, model
        self.settings = settings if settings is not None else WorkerSettings.defaults()
        self.system_prompt = prompts.load("mesh_worker", "system", self.settings.prompts_dir)
        self.steps: Any = None
        self.ledger: Ledger | None = None
        self.bundles = records.Bundles(None)  # the releases bucket, from start()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.catalogue: dict[str, ToolSpec] = {}
        self.tools = records.Catalogue(None)  # KV ``tools``: what the tool-executor serves

    async def start(self) -> None:
        self.steps = await self.mesh.kv("steps")
        self.bundles = records.Bundles(await self.mesh.kv("releases"))
        self.ledger = Ledger(await self.mesh.kv(LEDGER), self.mesh.service)
        self.tools = records.Catalogue(await self.mesh.kv("tools"))  # read again at most once a second
        await self._read_catalogue(fresh=True)

    async def _read_catalogue(self, *, fresh: bool = False) -> None:
        """The tool-executor's catalogue (built-ins and mounted MCP tools), so a step can be
        offered any tool the executor serves, with the schema the executor validates against."""
        catalogue = await self.tools.get(fresh=fresh)
        if catalogue is not None:  # (None: not written yet, the executor is starting)
            self.use_catalogue(catalogue)

    def use_catalogue(self, catalogue: ToolCatalogue) -> None:
        """Offer the tools of this catalogue (what the executor publishes: ``Registry.catalogue()``)."""
        self.catalogue = {t.name: ToolSpec(t.name, t.description, t.parameters) for t in catalogue.tools}

    async def _specs(self, names: tuple[str, ...]) -> tuple[ToolSpec, ...]:
        missing = [n for n in names if n not in TOOLS and n not in self.catalogue]
        if missing:
            await self._read_catalogue()  # a tool the executor mounted after this worker started
            missing = [n for n in missing if n not in self.catalogue]
        if missing and not self.catalogue:
            # The executor has not published its catalogue yet (starting): wait for it rather
            # than run the step without the tools it was planned with.
            raise Retry(f"the tool-executor's catalogue is not available yet (step offers {', '.join(missing)})")
        if missing:
            log.warning("step offers tool(s) the tool-executor does not serve: %s", ", ".join(missing))
        return tuple(TOOLS.get(n) or self.catalogue[n] for n in names if n in TOOLS or n in self.catalogue)

    def register(self) -> None:
        guard.enable(self.mesh)
        self.mesh.on_start(self.start)
        self.mesh.consume(StepRequested, self.on_step)
        self.mesh.consume(ToolCompleted, self.on_tool)
        self.mesh.consume(RetrievalCompleted, self.on_retrieval)
        self.mesh.consume(ApprovalRequested, self.on_approval)

    # --- handlers -------------------------------------------------------------------------

    async def on_step(self, m: StepRequested, d: Delivery) -> None:
        key = StepRun.key(m.tenant, m.task_id, m.step.step_id)

        bundle = await self.bundles.bundle(m.tenant, m.release)
        system, unusable = releases.prompt(self.system_prompt, bundle, m.release), ""
        if m.replay is not None:
            try:
                system = prompts.chosen(system, m.replay.prompts, self.settings.prompts_dir)
            except prompts.PromptError as exc:
                unusable = f"prompt: {exc}"

        run, _ = await st.load(self.steps, key, StepRun, remember=True)  # the first checkpoint writes on it
        if run is not None and run.attempt > m.attempt:
            return  # a newer attempt superseded this request
        began = run is None or run.attempt < m.attempt
        if began:
            # Not written yet: the step's beginning is what this request determines, so the first
            # checkpoint (the first turn, or the step's end) creates the record (one stored write
            # less per step). A redelivery before then begins again from the same request.
            run = StepRun(request=m, attempt=m.attempt, prompt_version=system.ref)
            run._unstored = True
            for role, text in step_context(m, system):
                admit(run, role, text)
        assert run is not None
        if began:
            await self.mesh.progress(
                m.tenant,
                m.task_id,
                "step.started",
                m.step.instruction[:100],
                step_id=m.step.step_id,
                key=str(m.attempt),
            )
        if unusable and run.status == "running":  # the replay names a prompt version this worker lacks
            await self._finish(run, failed=unusable[:1000])
            return
        await self.resume(run, d)

    async def on_tool(self, m: ToolCompleted, d: Delivery) -> None:
        if m.stopped:
            await self._stopped_call(m)
            return
        content = m.result if m.ok else f"error: {m.error}"
        origin = f"{m.tool}:{m.call_id}"
        failed = not m.ok
        # The tool-executor vouches only for text its own code wrote (untrusted=False); a result
        # or an error that carries outside content is untrusted, scored where it was made.
        text = (
            Text.untrusted(content, origin, score=m.injection_score, signals=m.injection_signals)
            if m.untrusted
            else Text.trusted(content, "tool-executor")
        )
        await self.observe(m.tenant, m.task_id, m.step_id, m.call_id, m.tool, text, [], d, error=failed,
                           denied=m.denied)  # fmt: skip

    async def _stopped_call(self, m: ToolCompleted) -> None:
        """The tool-executor did not run the call because the task is halted or stopped: end the
        step that way (halted steps run again after a resume). Handing the refusal to the model
        instead would let the step finish without the call's result whenever the worker's own
        view of the halt lags the tool-executor's."""
        if (timer := self._timers.pop(m.call_id, None)) is not None:
            timer.cancel()
        run, _ = await st.load(self.steps, StepRun.key(m.tenant, m.task_id, m.step_id), StepRun)
        if run is None or run.status != "running" or run.pending is None or run.pending.call_id != m.call_id:
            return  # duplicate or stale
        self.mesh.count(durable_metrics.M_CALLS_REFUSED)
        await self._finish(run, failed=f"stopped: {m.error.removeprefix('not run: ')}", halted=m.stopped == "halted")

    async def on_retrieval(self, m: RetrievalCompleted, d: Delivery) -> None:
        fields = {"doc_id", "version", "chunk_id", "chunk_hash", "score", "text", "injection_score"}
        hits = [h.model_dump(mode="json", include=fields) for h in m.hits]
        citations = [
            Citation(doc_id=h.doc_id, version=h.version, chunk_id=h.chunk_id, chunk_hash=h.chunk_hash) for h in m.hits
        ]
        # Retrieved text is untrusted whatever it says; the highest passage score travels with it,
        # and the passages are scored together too (an instruction split across two of them).
        together = score_many([h.text for h in m.hits]) if m.hits else None
        signals = [s for h in m.hits for s in h.injection_signals] + list(together.signals if together else ())
        score = max([h.injection_score for h in m.hits] + [together.score if together else 0.0])
        text = Text.untrusted(json.dumps(hits), f"{RETRIEVAL_TOOL}:{m.call_id}", score=score,
                              signals=tuple(dict.fromkeys(signals)))  # fmt: skip
        record = SignedRecord(body=d.body.decode(), token=d.headers.get(env.IDENTITY, "")) if d and d.body else None
        await self.observe(m.tenant, m.task_id, m.step_id, m.call_id, RETRIEVAL_TOOL, text, citations, d, record=record)

    async def on_approval(self, m: ApprovalRequested, d: Delivery) -> None:
        """A call of ours waits for a human: wait for it as long as the approval may take (the
        tool-executor answers when it is decided or expires), not the usual tool timeout."""
        if not m.call_id or not m.step_id:
            return
        key = StepRun.key(m.tenant, m.task_id, m.step_id)
        run, _ = await st.load(self.steps, key, StepRun)
        if run is None or run.pending is None or run.pending.call_id != m.call_id:
            return
        if run.request.on_held == "continue":
            await self._go_on_without(run, m)
            return
        deadline = time.time() + m.timeout_s + self.settings.tool_timeout_s

        def extend(run: StepRun | None) -> StepRun | None:
            if run is None or run.pending is None or run.pending.call_id != m.call_id:
                return None
            if run.pending.deadline >= deadline:
                return None
            run.pending.deadline = deadline
            return run

        run, changed = await st.update(self.steps, key, StepRun, extend)
        if changed and run is not None and run.pending is not None:
            if (timer := self._timers.pop(m.call_id, None)) is not None:
                timer.cancel()
            self._arm_timeout(m.tenant, m.task_id, m.step_id, m.call_id, run.pending.tool, deadline)

    async def _go_on_without(self, run: StepRun, m: ApprovalRequested) -> None:
        """A call of ours is held for a human and the task goes on without it: the loop sees that
        it was not performed (the worker's own words) and continues; the step's outcome names
        the approval, which a person may still grant while the task runs (the executor then
        performs the call; after the task's end the approval is void)."""
        held = HeldCall(approval_id=m.approval_id, step_id=m.step_id, call_id=m.call_id, tool=m.tool,
                        reason=m.reason[:300], destinations=tuple(x.where for x in m.destinations if x.where))  # fmt: skip
        note = (f"error: not performed now: {m.tool} is held for a human decision (approval {m.approval_id}). "
                "It runs later only if a person approves it before this task ends. Go on with the rest of the task "
                "without it, and do not ask for it again.")  # fmt: skip
        await self.observe(m.tenant, m.task_id, m.step_id, m.call_id, m.tool, Text.trusted(note, "worker"), [],
                           held=held)  # fmt: skip

    async def observe(
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
        held: HeldCall | None = None,
        record: SignedRecord | None = None,
        error: bool = False,
        denied: bool = False,
    ) -> None:
        if (timer := self._timers.pop(call_id, None)) is not None:
            timer.cancel()
        key = StepRun.key(tenant, task_id, step_id)
        if len(text.text) > self.settings.tool_output_max_chars:
            # The model sees a clipped output with a visible marker; the whole of it stays in the
            # step's records under a key of its own, for the audit and for a human.
            ref = f"{key}.out.{call_id}"
            await self.steps.put(ref, text.text.encode())
            text = replace(text, text=clip(text.text, self.settings.tool_output_max_chars, f"kv://steps/{ref}"))

        def apply(run: StepRun | None) -> StepRun | None:
            if run is None or run.pending is None or run.pending.call_id != call_id:
                return None  # duplicate or stale answer
            admit(run, "tool", text, tool_call_id=call_id, name=tool)
            run.citations += citations
            run.pending = None
            if run.request.step.call is not None:  # a fixed call: its result is the step's output
                run.fixed_output, run.fixed_error = text.text, error or held is not None
            if held is not None:
                run.held.append(held)
            if record is not None:
                run.retrievals.append(record)
            run.tool_denials += int(denied)
            return run

        run, applied = await st.update(self.steps, key, StepRun, apply)
        if run is None or (not applied and any(h.call_id == call_id for h in run.held)):
            return  # a held call's late result (a person approved it after the loop went on): not ours now
        # Resume if this answer belongs to the loop: just applied, or applied by an earlier
        # delivery whose process died somewhere after (resume picks up from the checkpoint).
        if any(m.get("tool_call_id") == call_id for m in run.messages):
            await self.resume(run, d)

    # --- the loop -------------------------------------------------------------------------

    async def resume(self, run: StepRun, d: Delivery | None = None) -> None:
        """Continue from the checkpoint, whatever point a previous process died at.

        Every branch is safe to repeat: outcomes and calls are re-sent under their
        deterministic ids (deduplicated), and a model call already made is served by the ledger.
        """
        req = run.request
        if run.status != "running":
            await self._publish_outcome(run)
            return
        if run.pending is not None:
            await self._send_call(run, run.pending.call_id, run.pending.tool, run.messages[-1])
            return
        if req.step.call is not None:
            await self._fixed_call(run)
            return
        last = run.messages[-1] if run.messages else {}
        if last.get("role") == "assistant" and not last.get("tool_calls"):
            await self._finish(run, output=last.get("content", ""))  # answered, but died before finishing
            return
        if run.iteration >= req.max_iterations:
            await self._finish(run, failed=f"iteration cap ({req.max_iterations}) reached without an answer")
            return
        await self._next_turn(run, d)

    async def _fixed_call(self, run: StepRun) -> None:
        """A step that is one fixed call (``PlanStep.call``): the call is checkpointed as the
        step's one turn and sent like a call the model asked for (the tool policy, approvals and
        timeouts apply as they do to any); its result ends the step."""
        req = run.request
        call = req.step.call
        assert call is not None
        call_id = f"{req.step.step_id}-a{run.attempt}-fixed"
        if any(m.get("tool_call_id") == call_id for m in run.messages):
            if run.fixed_error:
                await self._finish(run, failed=f"{call.tool}: {run.fixed_output.removeprefix('error: ')}"[:1000])
            else:
                await self._finish(run, output=run.fixed_output)
            return

        def advance(cur: StepRun | None) -> StepRun | None:
            cur = _as_stored(cur, run)
            if cur is None or cur.pending is not None or cur.status != "running" or cur.iteration:
                return None
            cur.iteration = 1
            model_turn(cur, "", (ToolCall(call_id, call.tool, dict(call.arguments)),))
            cur.pending = PendingCall(
                call_id=call_id, tool=call.tool, deadline=time.time() + self.settings.tool_timeout_s
            )
            return cur

        new, changed = await st.update(
            self.steps, StepRun.key(req.tenant, req.task_id, req.step.step_id), StepRun, advance
        )
        if changed and new is not None and new.pending is not None:
            await self._send_call(new, call_id, call.tool, new.messages[-1])

    async def _next_turn(self, run: StepRun, d: Delivery | None) -> None:
        """One turn of the loop: the model call (or its recorded answer), checkpointed, then the
        tool call it asked for is sent, or its answer finishes the step."""
        call_id = f"{run.request.step.step_id}-a{run.attempt}-i{run.iteration}"
        called = await self._call_model(run, call_id, d)
        if called is None:
            return
        new = await self._checkpoint_turn(run, call_id, *called)
        if new is None:
            return
        if new.pending is not None:
            await self._send_call(new, new.pending.call_id, new.pending.tool, new.messages[-1])
            return
        await self._publish_outcome(new)  # the checkpoint holds the answer and the step's end

    async def _call_model(
        self, run: StepRun, call_id: str, d: Delivery | None
    ) -> tuple[ModelResponse, TokenUsage] | None:
        """The turn's model call, streamed live to clients; None when it is refused or fails for
        good (the step is then finished as failed or halted, with the reason)."""
        req = run.request
        bundle = await self.bundles.bundle(req.tenant, req.release)
        denied = releases.denied(bundle)
        request = ModelRequest(
            tuple(Message.from_dict(x) for x in run.messages),
            tools=await self._specs(tuple(t for t in req.step.tools if t not in denied)),
            agent="worker",
            step=req.step.kind,
            difficulty=req.step.difficulty,
            max_tokens=512,
            prompt_version=prompt_version(run, self.system_prompt),
            route=releases.route(bundle, "worker", req.step.difficulty),
        )
        live = _Live(self.mesh, req.tenant, req.task_id, req.step.step_id, call_id, self.settings.live_window_ms / 1000)
        try:
            response, usage = await call_model_once(
                self.mesh,
                self.ledger,
                self.model,
                request,
                tenant=req.tenant,
                task_id=req.task_id,
                step_id=req.step.step_id,
                call_id=call_id,
                delivery=d,
                on_token=live.token,
                on_reset=live.reset,
                replay=req.replay,
            )
        except BudgetExceeded as exc:  # the guard (halted, cancelled, killed) or the budget refused the call
            await self._finish(run, failed=exc.describe(), halted=exc.halted)
            return None
        except ProviderError as exc:
            # Retries and fallbacks are spent (or the request can never fit): the step fails with
            # the reason and the planner decides; the message is not retried into a storm.
            await self._finish(run, failed=f"model ({exc.kind}): {exc}"[:1000])
            return None
        await live.end(f"{response.provider}/{response.model}")
        return response, usage

    async def _checkpoint_turn(
        self, run: StepRun, call_id: str, response: ModelResponse, usage: TokenUsage
    ) -> StepRun | None:
        """The model's turn and its tool call (at most one) written to the step's checkpoint, or,
        with no call, the answer and the step's end (its outcome) in the same write; None when
        another delivery advanced the step meanwhile (this result is stale)."""
        req = run.request
        used = f"{response.provider}/{response.model}"
        iteration = run.iteration
        # The call keeps the id its result will answer to (the worker's deterministic call id): a
        # provider rejects a tool result whose id matches no call of the conversation, and the
        # model's own ids ("c0", "call_...") repeat across iterations and replicas.
        calls = tuple(ToolCall(f"{call_id}-c0", c.name, c.arguments) for c in response.tool_calls[:1])

        def advance(cur: StepRun | None) -> StepRun | None:
            cur = _as_stored(cur, run)
            if cur is None or cur.iteration != iteration or cur.pending is not None or cur.status != "running":
                return None  # another delivery advanced this step concurrently
            cur.iteration += 1
            cur.usage = cur.usage + usage
            if used not in cur.models:
                cur.models.append(used)
            model_turn(cur, response.content, calls)
            if calls:
                cur.pending = PendingCall(
                    call_id=calls[0].id,
                    tool=calls[0].name,
                    deadline=time.time() + self.settings.tool_timeout_s,
                )
            else:  # the answer: the step ends in this same write (one stored write less per step)
                cur.status = "completed"
                cur.outcome = self._outcome(cur, output=response.content).model_dump(mode="json")
            return cur

        new, changed = await st.update(
            self.steps, StepRun.key(req.tenant, req.task_id, req.step.step_id), StepRun, advance
        )
        if not changed or new is None:
            self.mesh.count(worker_metrics.M_FENCED)  # a newer delivery advanced this step: our result is stale
            return None
        return new

    async def _send_call(self, run: StepRun, call_id: str, tool: str, assistant: dict[str, Any]) -> None:
        req = run.request
        args = assistant["tool_calls"][0]["arguments"] if assistant.get("tool_calls") else {}
        sid = req.step.step_id
        denied = releases.denied(await self.bundles.bundle(req.tenant, req.release))
        if tool not in req.step.tools or tool in denied:
            # A tool the step does not offer (a model's invention, or an instruction injected into
            # its context), or one the task's release takes away: an observation the model can
            # recover from, never a dispatch.
            offered = ", ".join(t for t in req.step.tools if t not in denied) or "none"
            note = Text.trusted(f"error: tool {tool!r} is not available in this step (offered: {offered})", "worker")
            await self.observe(req.tenant, req.task_id, sid, call_id, tool, note, [], error=True)
            return
        pending = run.pending
        if pending is not None and pending.deadline:
            self._arm_timeout(req.tenant, req.task_id, sid, call_id, tool, pending.deadline)
        if tool == RETRIEVAL_TOOL:
            await self.mesh.publish(
                RetrievalRequested(
                    tenant=req.tenant,
                    task_id=req.task_id,
                    step_id=sid,
                    call_id=call_id,
                    query=str(args.get("query", ""))[:2000] or "?",
                    top_k=int(args.get("top_k", 3)),
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

    def _arm_timeout(self, tenant: str, task_id: str, step_id: str, call_id: str, tool: str, deadline: float) -> None:
        """A call not answered by its deadline becomes an error observation (the loop goes on).
        In-process timer, re-armed whenever the step is resumed from its checkpoint."""
        if call_id in self._timers:
            return

        def fire() -> None:
            self._timers.pop(call_id, None)
            msg = Text.trusted(f"error: {tool} did not answer within {self.settings.tool_timeout_s:g} s (timed out)",
                               "worker")  # fmt: skip
            task = asyncio.ensure_future(self.observe(tenant, task_id, step_id, call_id, tool, msg, [], error=True))
            task.add_done_callback(_log_failure)

        delay = max(0.0, deadline - time.time())
        self._timers[call_id] = asyncio.get_running_loop().call_later(delay, fire)

    def _outcome(
        self, run: StepRun, *, output: str = "", failed: str = "", halted: bool = False
    ) -> StepCompleted | StepFailed:
        """The step's outcome message from its checkpoint: the answer ``output``, or ``failed``."""
        req = run.request
        sid = req.step.step_id
        if failed:
            return StepFailed(
                tenant=req.tenant,
                task_id=req.task_id,
                step_id=sid,
                attempt=run.attempt,
                reason=failed,
                usage=run.usage,
                halted=halted,
            )
        cited = set(re.findall(r"\[([^\[\]#]+)#([^\[\]]+)\]", output))
        citations = [c for c in run.citations if (c.doc_id, c.chunk_id) in cited] or run.citations
        return StepCompleted(
            tenant=req.tenant,
            task_id=req.task_id,
            step_id=sid,
            attempt=run.attempt,
            output=output,
            citations=tuple(citations),
            usage=run.usage,
            iterations=run.iteration,
            tools=tools_called(run),
            models=tuple(run.models),
            prompt_version=prompt_version(run, self.system_prompt),
            taint=run.taint,
            tool_denials=run.tool_denials,
            held=tuple(run.held),
            retrievals=forwarded(run.retrievals),
        )

    async def _finish(self, run: StepRun, *, output: str = "", failed: str = "", halted: bool = False) -> None:
        req = run.request
        sid = req.step.step_id
        outcome = self._outcome(run, output=output, failed=failed, halted=halted)

        def close(cur: StepRun | None) -> StepRun | None:
            cur = _as_stored(cur, run)
            if cur is None or cur.status != "running" or cur.attempt != run.attempt:
                return None
            cur.status = "failed" if failed else "completed"
            cur.outcome = outcome.model_dump(mode="json")
            return cur

        new, closed = await st.update(self.steps, StepRun.key(req.tenant, req.task_id, sid), StepRun, close)
        if not closed:
            self.mesh.count(worker_metrics.M_FENCED)
        if new is not None and new.attempt == run.attempt:
            await self._publish_outcome(new)

    async def _publish_outcome(self, run: StepRun) -> None:
        if run.outcome is None:
            return
        cls = StepFailed if run.status == "failed" else StepCompleted
        outcome = cls.model_validate(run.outcome)
        await self.mesh.publish(outcome, key=f"{outcome.step_id}:{outcome.attempt}")
        if isinstance(outcome, StepFailed):
            # A completed step is announced once, by the planner, when it accepts the result (the
            # worker's own event said the same: 3 stored messages a sample task). A failure is
            # told here, with the step's own reason.
            await self.mesh.progress(outcome.tenant, outcome.task_id, "step.failed", outcome.reason[:100],
                                     step_id=outcome.step_id, key=str(outcome.attempt))  # fmt: skip


def _as_stored(cur: StepRun | None, run: StepRun) -> StepRun | None:
    """The record a checkpoint writes over: what is stored, or, while a step begun in this process
    (``run``) has no record of its attempt yet, a copy of that beginning (created by the write;
    an older attempt's record is replaced, as a new attempt replaces it)."""
    if run._unstored and (cur is None or cur.attempt < run.attempt):
        return run.model_copy(deep=True)
    return cur


def step_context(m: StepRequested, system: Prompt) -> list[tuple[Role, Text]]:
    """What a step starts from, each piece with its provenance: the system prompt and the
    planner's instruction (trusted); each input, trusted only if the step that wrote it read
    nothing untrusted (``input_taint``; an input without an entry is of unknown provenance, so
    untrusted); the checker's feedback on a redo (untrusted: it can quote anything the task read)."""
    out: list[tuple[Role, Text]] = [("system", Text.trusted(system.text, "system-prompt")),
           ("user", Text.trusted(m.step.instruction, "plan"))]  # fmt: skip
    for sid, output in m.inputs.items():
        declared = m.input_taint.get(sid)
        taint = (
            Taint(untrusted=True, sources=(f"step:{sid}",), signals=("provenance-unknown",))
            if declared is None
            else Taint(untrusted=declared.untrusted, injection_score=declared.injection_score,
                       sources=(f"step:{sid}", *declared.sources), signals=declared.signals)
        )  # fmt: skip
        out.append(("user", Text.tainted(output, f"step:{sid}", taint).labelled(f"Input from {sid}: ")))
    if m.feedback:
        out.append(("user", Text.untrusted(m.feedback, "checker").labelled("Feedback from the checker: ")))
    return out


def admit(run: StepRun, role: Role, text: Text, *, tool_call_id: str | None = None, name: str | None = None) -> None:
    """The one way text enters a step's context: rendered by its provenance (untrusted text in a
    block it cannot close, with its score; the nonce derived from the step and the text, so a
    replay builds the same prompt) and its taint added to the step's."""
    key = StepRun.key(run.request.tenant, run.request.task_id, run.request.step.step_id)
    message = Message(role, text.render(nonce_seed=key), tool_call_id=tool_call_id or "", name=name or "").to_dict()
    # A context message (not a tool's result) has always been stored with None for these two, not
    # Message's "": the stored step and the response cache's key (a hash of the messages) stay as they were.
    message.update(tool_call_id=tool_call_id, name=name)
    run.messages.append(message)
    if text.taint is not None:
        run.taint = run.taint.merge(text.taint)


def model_turn(run: StepRun, content: str, calls: tuple[ToolCall, ...]) -> None:
    """The model's own turn. Written from the context it was given, it carries that context's
    taint, which is the step's already: it goes in as the provider must see it."""
    run.messages.append(Message("assistant", content, tool_calls=calls).to_dict())


def tools_called(run: StepRun) -> tuple[str, ...]:
    """The tools the loop called, in order: the checkpointed assistant turns' calls, less a tool
    the step does not offer (refused as an observation, never dispatched)."""
    offered = set(run.request.step.tools)
    calls = (c.get("name", "") for m in run.messages if m.get("role") == "assistant" for c in m.get("tool_calls") or ())
    return tuple(name for name in calls if name in offered)


def forwarded(records: list[SignedRecord]) -> tuple[SignedRecord, ...]:
    """The step's retrieval records for the checker, oldest first, up to ``FORWARD_MAX_BYTES``
    and the contract's 64 (a loop that searched more is told so in the log)."""
    out: list[SignedRecord] = []
    size = 0
    for r in records:
        size += len(r.body) + len(r.token)
        if size > FORWARD_MAX_BYTES or len(out) == 64:
            log.warning("%d retrieval record(s) not handed on to the checker (over %d bytes or 64)",
                        len(records) - len(out), FORWARD_MAX_BYTES)  # fmt: skip
            break
        out.append(r)
    return tuple(out)


def prompt_version(run: StepRun, system: Prompt) -> str:
    """The system prompt the step's context was built with. A checkpoint from before prompts were
    versioned has none recorded: the current prompt's (``system``) ref if its text is what the
    context holds, else unknown ('')."""
    if run.prompt_version:
        return run.prompt_version
    first = run.messages[0] if run.messages else {}
    same = first.get("role") == "system" and first.get("content") == system.text
    return system.ref if same else ""


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("tool timeout could not be applied: %s", task.exception())


class _Live:
    """Streams one model call's text to clients as it arrives (core NATS ``live.v1.<tenant>.<task>.token``).

    The first delta goes out at once (time to first token is the provider's). What arrives within
    ``window_s`` of the last delta sent is joined into the next one, sent when the window closes:
    a provider handing over one token at a time would otherwise cost a signed message per token
    (one signature here, one verification in every watching client). A lost delta (no one
    listening, a broker hiccup) never affects the step: the durable result is the
    ``step.completed`` that follows."""

    def __init__(
        self, mesh: Mesh, tenant: str, task_id: str, step_id: str, call_id: str, window_s: float = 0.0
    ) -> None:
        self.mesh, self.tenant, self.task_id, self.step_id, self.call_id = mesh, tenant, task_id, step_id, call_id
        self.window_s = window_s
        self.seq = 0
        self._held: list[str] = []
        self._last = -1e9  # monotonic time the last delta was sent
        self._flusher: asyncio.Task[None] | None = None

    async def _emit(self, kind: Literal["delta", "reset", "end"], text: str = "", model: str = "") -> None:
        delta = TokenDelta(
            tenant=self.tenant,
            task_id=self.task_id,
            step_id=self.step_id,
            call_id=self.call_id,
            seq=self.seq,
            text=text,
            kind=kind,
            model=model,
        )
        self.seq += 1
        try:
            await self.mesh.emit(delta)
        except Exception as exc:  # noqa: BLE001 - live output is best effort by design
            log.debug("token delta not sent: %s", exc)

    async def token(self, text: str) -> None:
        self.mesh.count(worker_metrics.M_TOKENS_STREAMED)
        now = time.monotonic()
        if not self._held and now - self._last >= self.window_s:
            self._last = now
            await self._emit("delta", text)
            return
        self._held.append(text)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_after(self._last + self.window_s - now))

    async def _flush_after(self, delay_s: float) -> None:
        await asyncio.sleep(max(0.0, delay_s))
        self._flusher = None
        await self._flush()

    async def _flush(self) -> None:
        if self._held:
            text = "".join(self._held)
            self._held.clear()
            self._last = time.monotonic()
            await self._emit("delta", text)

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None

    async def reset(self, reason: str) -> None:
        self._stop_flusher()
        self._held.clear()  # the failed attempt's text: the client drops what it has of it anyway
        await self._emit("reset", reason[:200])

    async def end(self, model: str) -> None:
        self._stop_flusher()
        await self._flush()
        if self.seq:
            await self._emit("end", model=model)


async def build(mesh: Mesh, settings: WorkerSettings) -> Worker:
    worker = Worker(mesh, configured(mesh, settings), settings)
    prompt = worker.system_prompt
    if UNTRUSTED_NOTICE not in prompt.text:  # an override that dropped it
        log.warning("system prompt %s (%s) lacks the notice on untrusted blocks: the model is not told that "
                    "delimited content is data", prompt.ref, prompt.source)  # fmt: skip
    tenancy.install(mesh)  # its tenants' doors and quotas (mesh_tenancy)
    worker.register()
    return worker
