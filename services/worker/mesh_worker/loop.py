"""A step's agent loop, driven from its checkpoint: model turn, call, observation, ... until an answer.

Every entry point reads the checkpoint and goes on from whatever point it records, so a
redelivered or resumed message, or a different replica, continues where a previous process
stopped: outcomes and calls are re-sent under their deterministic ids (deduplicated), and a model
call already made is answered by the ledger. Every write is a compare-and-set that checks the
step is where this delivery found it; a delivery that lost the race writes nothing
(``mesh.steps.fenced``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mesh_agent import releases
from mesh_agent.metered import BudgetExceeded, Models, call_model_once
from mesh_agent.prompts import Prompt
from mesh_contracts.v1 import Citation, HeldCall, SignedRecord, StepCompleted, StepFailed, StepRequested, TokenUsage
from mesh_durable import records
from mesh_durable.ledger import Ledger
from mesh_guardrails.provenance import Text
from mesh_host import Mesh
from mesh_kit import Delivery
from mesh_kit import state as st
from mesh_llm import ChatModel, Message, ModelRequest, ModelResponse, ProviderError, ToolCall
from mesh_llm import quotes as mq
from mesh_llm.context import GROUNDING_LABEL, clip, passages, search_hits
from mesh_worker import metrics as worker_metrics
from mesh_worker.calls import RETRIEVAL_TOOL, Calls
from mesh_worker.checkpoint import PendingCall, StepRun, admit, as_stored, model_turn
from mesh_worker.live import Live
from mesh_worker.outcome import outcome, prompt_version
from mesh_worker.settings import WorkerSettings

TOOL_STEPS = frozenset({"compute", "write"})
"""Step kinds whose first model turn must call one of the step's tools."""


class Loop:
    """The loop of every step this worker runs. ``system``: the worker's system prompt;
    ``steps``, ``ledger``, ``bundles``: KV ``steps``, the ledger and the releases bucket, as they
    are once the worker started. Its ``calls`` sends a step's calls and times them out."""

    def __init__(
        self,
        mesh: Mesh,
        model: ChatModel | Models,
        settings: WorkerSettings,
        system: Prompt,
        *,
        steps: Callable[[], Any],
        ledger: Callable[[], Ledger | None],
        bundles: Callable[[], records.Bundles],
    ) -> None:
        self.mesh, self.model, self.settings, self.system = mesh, model, settings, system
        self._steps, self._ledger, self._bundles = steps, ledger, bundles
        self.calls = Calls(mesh, settings, bundles, self.observe)
        self.profiles = self.calls.profiles

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
        """The answer to the step's call in flight (a result, an error, the worker's own note)
        goes into its context, and the loop goes on; a duplicate or stale answer does nothing."""
        self.calls.cancel(call_id)
        key = StepRun.key(tenant, task_id, step_id)
        if len(text.text) > self.settings.tool_output_max_chars:
            # The model sees a clipped output with a visible marker; the whole of it stays in the
            # step's records under a key of its own, for the audit and for a human.
            ref = f"{key}.out.{call_id}"
            await self._steps().put(ref, text.text.encode())
            text = replace(text, text=clip(text.text, self.settings.tool_output_max_chars, f"kv://steps/{ref}"))

        def apply(run: StepRun | None) -> StepRun | None:
            if run is None or run.pending is None or run.pending.call_id != call_id:
                return None  # duplicate or stale answer
            if not self.ours(run):
                return None  # another pool's step: its own workers take their copy of the answer
            if run.pending.arguments:  # the worker's own retrieval (retrieve first): context, not a tool result
                admit(run, "user", _grounding(text), tool_call_id=call_id, name=tool)
            else:
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

        run, applied = await st.update(self._steps(), key, StepRun, apply)
        if run is None or (not applied and any(h.call_id == call_id for h in run.held)):
            return  # a held call's late result (a person approved it after the loop went on): not ours now
        if not self.ours(run):
            return
        # Resume if this answer belongs to the loop: just applied, or applied by an earlier
        # delivery whose process died somewhere after (resume picks up from the checkpoint).
        if any(m.get("tool_call_id") == call_id for m in run.messages):
            await self.resume(run, d)

    async def resume(self, run: StepRun, d: Delivery | None = None) -> None:
        """Continue from the checkpoint, whatever point a previous process died at.

        Every branch is safe to repeat: outcomes and calls are re-sent under their
        deterministic ids (deduplicated), and a model call already made is served by the ledger.
        """
        req = run.request
        if run.status != "running":
            await self.publish_outcome(run)
            return
        if run.pending is not None:
            await self.calls.send(run, run.pending.call_id, run.pending.tool, run.messages[-1])
            return
        if req.step.call is not None:
            await self._fixed_call(run)
            return
        if run.iteration == 0 and await self._retrieves_first(run):
            await self._retrieve_first(run)
            return
        last = run.messages[-1] if run.messages else {}
        if last.get("role") == "assistant" and not last.get("tool_calls"):
            # answered, but died before finishing
            await self.finish(run, output=self._written(run.messages[:-1], str(last.get("content", ""))))
            return
        if run.iteration >= req.max_iterations:
            await self.finish(run, failed=f"iteration cap ({req.max_iterations}) reached without an answer")
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
                await self.finish(run, failed=f"{call.tool}: {run.fixed_output.removeprefix('error: ')}"[:1000])
            else:
                await self.finish(run, output=run.fixed_output)
            return

        def advance(cur: StepRun | None) -> StepRun | None:
            cur = as_stored(cur, run)
            if cur is None or cur.pending is not None or cur.status != "running" or cur.iteration:
                return None
            cur.iteration = 1
            model_turn(cur, "", (ToolCall(call_id, call.tool, dict(call.arguments)),))
            cur.pending = PendingCall(
                call_id=call_id, tool=call.tool, deadline=time.time() + self.settings.tool_timeout_s
            )
            return cur

        new, changed = await st.update(
            self._steps(), StepRun.key(req.tenant, req.task_id, req.step.step_id), StepRun, advance
        )
        if changed and new is not None and new.pending is not None:
            await self.calls.send(new, call_id, call.tool, new.messages[-1])

    async def _retrieves_first(self, run: StepRun) -> bool:
        """Whether the step's first turn is a retrieval the worker makes itself: the step offers
        ``search_docs`` (and its release does not take it away) and ``retrieve_first`` is on."""
        req = run.request
        if not self.settings.retrieve_first or RETRIEVAL_TOOL not in req.step.tools:
            return False
        return RETRIEVAL_TOOL not in releases.denied(await self._bundles().bundle(req.tenant, req.release))

    async def _retrieve_first(self, run: StepRun) -> None:
        """Grounding that does not depend on the model choosing to search: the step's instruction
        is the query of a ``search_docs`` call the worker makes before the model's first turn,
        sent like a call the model made (the same rag request, tenant scope, citations,
        provenance and injection tainting). Its passages enter the context as a message that
        asks for citations (``GROUNDING_LABEL``), not as a tool result: no model turn is
        invented, and a model without tool calling reads them as it reads any input. The model
        may still search more."""
        req = run.request
        call_id = f"{req.step.step_id}-a{run.attempt}-retrieve"
        query = {"query": req.step.instruction[:2000], "top_k": self.settings.retrieve_first_top_k}

        def advance(cur: StepRun | None) -> StepRun | None:
            cur = as_stored(cur, run)
            if cur is None or cur.pending is not None or cur.status != "running" or cur.iteration:
                return None
            cur.iteration = 1  # the retrieval is the step's first turn (it counts toward the cap)
            cur.pending = PendingCall(call_id=call_id, tool=RETRIEVAL_TOOL, arguments=query,
                                      deadline=time.time() + self.settings.tool_timeout_s)  # fmt: skip
            return cur

        new, changed = await st.update(
            self._steps(), StepRun.key(req.tenant, req.task_id, req.step.step_id), StepRun, advance
        )
        if changed and new is not None and new.pending is not None:
            await self.calls.send(new, call_id, RETRIEVAL_TOOL, {})

    async def _next_turn(self, run: StepRun, d: Delivery | None) -> None:
        """One turn of the loop: the model call (or its recorded answer), checkpointed, then the
        tool call it asked for is sent, or its answer finishes the step."""
        call_id = f"{run.request.step.step_id}-a{run.attempt}-i{run.iteration}"
        called = await self._call_model(run, call_id, d)
        if called is None:
            return
        response, usage, quotes = called
        new = await self._checkpoint_turn(run, call_id, response, usage, quotes)
        if new is None:
            return
        if new.pending is not None:
            await self.calls.send(new, new.pending.call_id, new.pending.tool, new.messages[-1])
            return
        await self.publish_outcome(new)  # the checkpoint holds the answer and the step's end

    async def _call_model(
        self, run: StepRun, call_id: str, d: Delivery | None
    ) -> tuple[ModelResponse, TokenUsage, list[mq.Quote]] | None:
        """The turn's model call, streamed live to clients, and the sentences it was to choose
        from (a quoted answer's, else none); None when it is refused or fails for good (the step
        is then finished as failed or halted, with the reason)."""
        req = run.request
        bundle = await self._bundles().bundle(req.tenant, req.release)
        denied = releases.denied(bundle)
        tools = await self.calls.specs(tuple(t for t in req.step.tools if t not in denied), req.tenant)
        messages = tuple(Message.from_dict(x) for x in run.messages)
        quotes = self._quotable(messages, tuple(t.name for t in tools), req.step.output_schema)
        request = ModelRequest(
            messages,
            tools=() if quotes else tools,
            # A step that must answer in a schema and has no call to make: a model that can be
            # held to the schema is (a call's arguments are held to their tool's schema instead).
            # A quoted answer is held to the sentences it may quote.
            response_schema=mq.schema(quotes) if quotes else req.step.output_schema if not tools else None,
            # A step the plan made to call its tool (compute, write) calls it on its first turn: a
            # small model otherwise answers in prose (measured: SmolLM2 never called the calculator).
            tool_choice="required" if tools and req.step.kind in TOOL_STEPS and not _answered(run) else "auto",
            agent="worker",
            step=req.step.kind,
            difficulty=req.step.difficulty,
            max_tokens=512,
            prompt_version=prompt_version(run, self.system),
            route=await self._route(req, bundle),
        )
        live = Live(self.mesh, req.tenant, req.task_id, req.step.step_id, call_id, self.settings.live_window_ms / 1000)
        shown = mq.QuoteStream()

        async def quoted_token(text: str) -> None:  # a client watches the sentences, not the JSON
            if part := shown.feed(text):
                await live.token(part)

        async def reset(reason: str) -> None:  # a retry or a fallback starts its JSON afresh
            shown.reset()
            await live.reset(reason)

        try:
            response, usage = await call_model_once(
                self.mesh,
                self._ledger(),
                self.model,
                request,
                tenant=req.tenant,
                task_id=req.task_id,
                step_id=req.step.step_id,
                call_id=call_id,
                delivery=d,
                on_token=quoted_token if quotes else live.token,
                on_reset=reset,
                replay=req.replay,
                claim=False,  # a step's duplicates are its own redeliveries: one write per call
            )
        except BudgetExceeded as exc:  # the guard (halted, cancelled, killed) or the budget refused the call
            await self.finish(run, failed=exc.describe(), halted=exc.halted)
            return None
        except ProviderError as exc:
            # Retries and fallbacks are spent (or the request can never fit): the step fails with
            # the reason and the planner decides; the message is not retried into a storm.
            await self.finish(run, failed=f"model ({exc.kind}): {exc}"[:1000])
            return None
        await live.end(f"{response.provider}/{response.model}")
        return response, usage, quotes

    def _quotable(self, messages: tuple[Message, ...], tools: tuple[str, ...], schema: object) -> list[mq.Quote]:
        """The sentences this turn's answer is to be chosen from: with ``answer_style`` quoted,
        for a step with cited text in its context, no schema of its own and no tool to call but
        a search (it has searched: the passages are here); else none (the model writes)."""
        if self.settings.answer_style != "quoted" or schema is not None or set(tools) - {RETRIEVAL_TOOL}:
            return []
        return mq.candidates(messages)

    def _written(self, messages: list[dict[str, Any]], answer: str) -> str:
        """A step's answer as its output: a quoted answer written out with its references (from
        what the model was offered), any other as the model wrote it."""
        if self.settings.answer_style != "quoted":
            return answer
        return _output(answer, mq.candidates([Message.from_dict(x) for x in messages]))

    async def _checkpoint_turn(
        self, run: StepRun, call_id: str, response: ModelResponse, usage: TokenUsage, quotes: list[mq.Quote]
    ) -> StepRun | None:
        """The model's turn and its tool call (at most one) written to the step's checkpoint, or,
        with no call, the answer and the step's end (its outcome, published by the caller and
        not written); None when another delivery advanced the step meanwhile (stale)."""
        req = run.request
        used = f"{response.provider}/{response.model}"
        iteration = run.iteration
        # The call keeps the id its result will answer to (the worker's deterministic call id): a
        # provider rejects a tool result whose id matches no call of the conversation, and the
        # model's own ids ("c0", "call_...") repeat across iterations and replicas.
        calls = tuple(ToolCall(f"{call_id}-c0", c.name, c.arguments) for c in response.tool_calls[:1])

        def advance(cur: StepRun | None) -> StepRun | None:
            cur = as_stored(cur, run)
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
            else:  # the answer: the step ends with it (published, not written: see below)
                cur.status = "completed"
                cur.outcome = outcome(cur, self.system, output=_output(response.content, quotes)).model_dump(
                    mode="json"
                )
            return cur

        key = StepRun.key(req.tenant, req.task_id, req.step.step_id)
        if calls:
            new, changed = await st.update(self._steps(), key, StepRun, advance)
        else:
            # The answer: the step's record is its outcome message (``step.completed`` on STEP),
            # not a last checkpoint as well (one stored write less per step). A read fences it as
            # the write did: a delivery that advanced the step meanwhile makes this result stale.
            # One that reads the same turn got the same answer (the call's record answers every
            # delivery), and the outcome's message id keeps one of the two.
            stored, _ = await st.load(self._steps(), key, StepRun)
            new = advance(stored)
            changed = new is not None
        if not changed or new is None:
            self.mesh.count(worker_metrics.M_FENCED)  # a newer delivery advanced this step: our result is stale
            return None
        return new

    def ours(self, run: StepRun) -> bool:
        """Whether this worker's pool runs the step (every worker kind gets its own copy of the
        answers to every step's calls: ``topology.pool_durables``)."""
        return run.request.step.pool == self.settings.worker_pool

    async def _route(self, req: StepRequested, bundle: Any) -> str:
        """The model route of the step's calls: its agent profile's named route, else its release's."""
        profile = await self.profiles.get(req.tenant, req.step.agent)
        if profile is not None and profile.route:
            return profile.route
        return releases.route(bundle, "worker", req.step.difficulty)

    async def finish(self, run: StepRun, *, output: str = "", failed: str = "", halted: bool = False) -> None:
        """The step ends with the answer ``output``, or ``failed`` (``halted``: it runs again after
        a resume): its outcome is written to the checkpoint, then published."""
        req = run.request
        sid = req.step.step_id
        ended = outcome(run, self.system, output=output, failed=failed, halted=halted)

        def close(cur: StepRun | None) -> StepRun | None:
            cur = as_stored(cur, run)
            if cur is None or cur.status != "running" or cur.attempt != run.attempt:
                return None
            cur.status = "failed" if failed else "completed"
            cur.outcome = ended.model_dump(mode="json")
            return cur

        new, closed = await st.update(self._steps(), StepRun.key(req.tenant, req.task_id, sid), StepRun, close)
        if not closed:
            self.mesh.count(worker_metrics.M_FENCED)
        if new is not None and new.attempt == run.attempt:
            await self.publish_outcome(new)

    async def publish_outcome(self, run: StepRun) -> None:
        if run.outcome is None:
            return
        cls = StepFailed if run.status == "failed" else StepCompleted
        result = cls.model_validate(run.outcome)
        await self.mesh.publish(result, key=f"{result.step_id}:{result.attempt}")
        if isinstance(result, StepFailed):
            # A completed step is announced once, by the planner, when it accepts the result (the
            # worker's own event said the same: 3 stored messages a sample task). A failure is
            # told here, with the step's own reason.
            await self.mesh.progress(result.tenant, result.task_id, "step.failed", result.reason[:100],
                                     step_id=result.step_id, key=str(result.attempt))  # fmt: skip


def _output(answer: str, quotes: list[mq.Quote]) -> str:
    """The step's output for the model's ``answer``: the quotes it chose written out with their
    references, when it was offered ``quotes`` and chose from them; else the answer as written."""
    return (mq.compose(answer, quotes) or answer) if quotes else answer


def _answered(run: StepRun) -> bool:
    """The model has had a turn in this step already."""
    return any(m.get("role") == "assistant" for m in run.messages)


def _grounding(text: Text) -> Text:
    """The first retrieval's answer as the step's context: its passages as ``[doc#chunk] text``
    under ``GROUNDING_LABEL`` (provenance and taint unchanged). An answer that is not a list of
    passages (the call failed or timed out) goes in as it is, labelled the same way."""
    if (hits := search_hits(text.text)) is not None:
        text = replace(text, text=passages(hits) if hits else "(no passage matched)")
    return text.labelled(GROUNDING_LABEL)
