"""Worker: runs one plan step as an agent loop (model call -> tool call -> observation -> ...).

The loop is event-driven and checkpointed: each iteration's state (messages, usage,
pending call) is a record in the ``steps`` KV bucket. A tool or retrieval call is a
message to the tool-executor or RAG service; its answer arrives on this service's own
durable and continues the loop, on whichever worker replica fetches it. A worker that
dies mid-step loses nothing: the next delivery resumes from the checkpoint.

Here: the messages the worker consumes and their handlers, each turning a message into the
step's beginning or an observation of its call in flight. Beside it: the loop itself
(``loop.py``), the checkpoint and the one way text enters a step's context (``checkpoint.py``),
the step's tools and calls (``calls.py``), its outcome (``outcome.py``) and the live output
(``live.py``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from mesh_agent import prompts, releases
from mesh_agent.metered import Models, configured
from mesh_contracts.v1 import (
    ApprovalRequested,
    Citation,
    HeldCall,
    RetrievalCompleted,
    SignedRecord,
    StepRequested,
    ToolCompleted,
)
from mesh_durable import guard, ledger, records
from mesh_durable import metrics as durable_metrics
from mesh_durable.ledger import Ledger
from mesh_guardrails.injection import UNTRUSTED_NOTICE, score_many
from mesh_guardrails.provenance import Text
from mesh_host import Mesh
from mesh_kit import Delivery
from mesh_kit import envelope as env
from mesh_kit import state as st
from mesh_llm import ChatModel
from mesh_tenancy import tenancy
from mesh_worker.calls import RETRIEVAL_TOOL
from mesh_worker.checkpoint import StepRun, begun
from mesh_worker.loop import Loop
from mesh_worker.profiles import ProfileMissing, applied, with_profile
from mesh_worker.settings import WorkerSettings

log = logging.getLogger("mesh.worker")

SYSTEM_PROMPT = prompts.load("mesh_worker", "system")
"""The packaged system prompt (``prompts/system.md``). A worker begins every step with it, or
with its ``MESH_PROMPTS_DIR`` override (``Worker.system_prompt``); its ``ref`` is recorded on
every model call and on ``step.completed``."""


class Worker:
    def __init__(self, mesh: Mesh, model: ChatModel | Models, settings: WorkerSettings | None = None) -> None:
        self.mesh, self.model = mesh, model
        self.settings = settings if settings is not None else WorkerSettings.defaults()
        self.system_prompt = prompts.load("mesh_worker", "system", self.settings.prompts_dir)
        self.steps: Any = None
        self.ledger: Ledger | None = None
        self.bundles = records.Bundles(None)  # the releases bucket, from start()
        self.loop = Loop(mesh, model, self.settings, self.system_prompt, steps=lambda: self.steps,
                         ledger=lambda: self.ledger, bundles=lambda: self.bundles)  # fmt: skip
        self.calls = self.loop.calls  # the tools a step offers, its calls sent and timed out
        self.profiles = self.loop.profiles  # the agent profile versions steps run as

    async def start(self) -> None:
        self.steps = await self.mesh.kv("steps")
        self.profiles.kv = await self.mesh.kv("workflows")
        self.bundles = records.Bundles(await self.mesh.kv("releases"))
        self.ledger = await ledger.calls(self.mesh)
        # the tool-executor's catalogue, and each tenant's own servers' tools
        await self.calls.start(await self.mesh.kv("tools"), await self.mesh.kv("toolservers"))

    def register(self) -> None:
        guard.enable(self.mesh)
        self.mesh.on_start(self.start)
        # a pool's own durables (``MESH_WORKER_POOL``): its steps, and its copy of what answers them
        pool = self.settings.worker_pool
        self.mesh.consume(StepRequested, self.on_step, pool=pool)
        self.mesh.consume(ToolCompleted, self.on_tool, pool=pool)
        self.mesh.consume(RetrievalCompleted, self.on_retrieval, pool=pool)
        self.mesh.consume(ApprovalRequested, self.on_approval, pool=pool)

    # --- handlers -------------------------------------------------------------------------

    async def on_step(self, m: StepRequested, d: Delivery) -> None:
        if m.step.pool != self.settings.worker_pool:  # the durables' filters keep it from happening
            log.error("step %s/%s of pool %r reached pool %r: not run here", m.task_id, m.step.step_id,
                      m.step.pool, self.settings.worker_pool)  # fmt: skip
            return
        key = StepRun.key(m.tenant, m.task_id, m.step.step_id)

        bundle = await self.bundles.bundle(m.tenant, m.release)
        system, unusable = releases.prompt(self.system_prompt, bundle, m.release), ""
        if m.replay is not None:
            try:
                system = prompts.chosen(system, m.replay.prompts, self.settings.prompts_dir)
            except prompts.PromptError as exc:
                unusable = f"prompt: {exc}"
        if m.step.agent:  # handed to one of the tenant's agent profiles: it runs as that agent
            try:
                profile = await self.profiles.get(m.tenant, m.step.agent)
            except ProfileMissing as exc:
                unusable = str(exc)
            else:
                assert profile is not None
                m, system = applied(m, profile), with_profile(system, profile, m.step.agent)

        run, _ = await st.load(self.steps, key, StepRun, remember=True)  # the first checkpoint writes on it
        if run is not None and run.attempt > m.attempt:
            return  # a newer attempt superseded this request
        began = run is None or run.attempt < m.attempt
        if began:
            run = begun(m, system)  # not written yet: the step's first checkpoint creates the record
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
            await self.loop.finish(run, failed=unusable[:1000])
            return
        await self.loop.resume(run, d)

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
        await self.loop.observe(m.tenant, m.task_id, m.step_id, m.call_id, m.tool, text, [], d, error=failed,
                                denied=m.denied)  # fmt: skip

    async def _stopped_call(self, m: ToolCompleted) -> None:
        """The tool-executor did not run the call because the task is halted or stopped: end the
        step that way (halted steps run again after a resume). Handing the refusal to the model
        instead would let the step finish without the call's result whenever the worker's own
        view of the halt lags the tool-executor's."""
        self.calls.cancel(m.call_id)
        run, _ = await st.load(self.steps, StepRun.key(m.tenant, m.task_id, m.step_id), StepRun)
        if run is None or run.status != "running" or run.pending is None or run.pending.call_id != m.call_id:
            return  # duplicate or stale
        if not self.loop.ours(run):
            return  # another pool's step: its own workers take their copy
        self.mesh.count(durable_metrics.M_CALLS_REFUSED)
        await self.loop.finish(run, failed=f"stopped: {m.error.removeprefix('not run: ')}",
                               halted=m.stopped == "halted")  # fmt: skip

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
        await self.loop.observe(m.tenant, m.task_id, m.step_id, m.call_id, RETRIEVAL_TOOL, text, citations, d,
                                record=record)  # fmt: skip

    async def on_approval(self, m: ApprovalRequested, d: Delivery) -> None:
        """A call of ours waits for a human: wait for it as long as the approval may take (the
        tool-executor answers when it is decided or expires), not the usual tool timeout."""
        if not m.call_id or not m.step_id:
            return
        key = StepRun.key(m.tenant, m.task_id, m.step_id)
        run, _ = await st.load(self.steps, key, StepRun)
        if run is None or run.pending is None or run.pending.call_id != m.call_id:
            return
        if not self.loop.ours(run):
            return  # another pool's step: its own workers take their copy
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
            self.calls.cancel(m.call_id)
            self.calls.arm(m.tenant, m.task_id, m.step_id, m.call_id, run.pending.tool, deadline)

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
        await self.loop.observe(m.tenant, m.task_id, m.step_id, m.call_id, m.tool, Text.trusted(note, "worker"), [],
                                held=held)  # fmt: skip


async def build(mesh: Mesh, settings: WorkerSettings) -> Worker:
    worker = Worker(mesh, configured(mesh, settings), settings)
    prompt = worker.system_prompt
    if UNTRUSTED_NOTICE not in prompt.text:  # an override that dropped it
        log.warning("system prompt %s (%s) lacks the notice on untrusted blocks: the model is not told that "
                    "delimited content is data", prompt.ref, prompt.source)  # fmt: skip
    tenancy.install(mesh)  # its tenants' doors and quotas (mesh_tenancy)
    worker.register()
    return worker
