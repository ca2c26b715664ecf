"""A step's checkpoint (KV ``steps``, key ``<tenant>.<task>.<step>``) and the one way text enters it.

``StepRun`` is what a step's agent loop keeps between deliveries: its context (the messages), the
call in flight, what it used, read and was refused, and its outcome once it has one. Text enters
the context only through ``admit``, rendered by its provenance (``mesh_guardrails.provenance``),
and the model's own turns through ``model_turn``; ``begun`` is a step's beginning, which its
request alone determines (it is stored by the step's first checkpoint, see ``as_stored``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, PrivateAttr

from mesh_agent.prompts import Prompt
from mesh_contracts.stored import STEP_RUN, Sealable
from mesh_contracts.v1 import Citation, HeldCall, SignedRecord, StepRequested, Taint, TokenUsage
from mesh_guardrails.provenance import Text
from mesh_llm import Message, ToolCall
from mesh_llm.context import INPUT_LABEL
from mesh_llm.model import Role


class PendingCall(BaseModel):
    call_id: str
    tool: str
    deadline: float = 0.0
    """Wall-clock time after which the call counts as timed out (an observation, not a crash)."""
    arguments: dict[str, Any] = {}
    """The call's arguments when no model turn holds them: the worker's own retrieval before the
    first turn (``retrieve_first``), whose answer enters the context as passages to cite."""


class StepRun(Sealable):
    """Checkpoint of one step's agent loop (``steps`` bucket, key ``<tenant>.<task>.<step>``)."""

    sealed: ClassVar[tuple[str, ...]] = (
        "request", "messages", "citations", "pending", "outcome", "held", "retrievals", "fixed_output",
    )  # fmt: skip
    """The step's conversation with the model and what it read and called: the tenant's content,
    sealed at rest (``mesh_contracts.sealing``)."""
    seal_name: ClassVar[str] = STEP_RUN

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
    were versioned: see ``outcome.prompt_version``)."""
    fixed_output: str = ""
    """A fixed call's result (``PlanStep.call``), as the tool or retrieval gave it: the step's output."""
    fixed_error: bool = False
    """The fixed call failed (its result is the error): the step fails."""
    tool_denials: int = 0
    """Calls of the step a rule or a person refused (``ToolCompleted.denied``)."""
    _unstored: bool = PrivateAttr(default=False)
    """Begun from its request in this process, not written yet (see ``begun``)."""

    @staticmethod
    def key(tenant: str, task_id: str, step_id: str) -> str:
        return f"{tenant}.{task_id}.{step_id}"


def begun(m: StepRequested, system: Prompt) -> StepRun:
    """A step's beginning, from its request and the system prompt it runs with. Not written yet:
    the first checkpoint (the first turn, or the step's end) creates the record (one stored write
    less per step), and a redelivery before then begins again from the same request."""
    run = StepRun(request=m, attempt=m.attempt, prompt_version=system.ref)
    run._unstored = True
    for role, text in step_context(m, system):
        admit(run, role, text)
    return run


def as_stored(cur: StepRun | None, run: StepRun) -> StepRun | None:
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
        out.append(("user", Text.tainted(output, f"step:{sid}", taint).labelled(INPUT_LABEL.format(step=sid))))
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
