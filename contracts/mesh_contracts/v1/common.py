"""Value objects embedded in several v1 messages."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mesh_contracts.base import ID_PATTERN, POOL_PATTERN


class _Value(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, use_attribute_docstrings=True)


class TokenUsage(_Value):
    """Tokens and cost spent by one call or rolled up over many."""

    input_tokens: int = Field(0, ge=0)
    """Prompt tokens billed."""
    output_tokens: int = Field(0, ge=0)
    """Completion tokens billed."""
    cost_usd: float = Field(0.0, ge=0)
    """Cost from the price table in force when the call was made."""
    calls: int = Field(0, ge=0)
    """Number of model calls summed into this tally."""
    cached_input_tokens: int = Field(0, ge=0)
    """Part of ``input_tokens`` served from the provider's prompt cache (billed at the cached price)."""

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cost_usd=round(self.cost_usd + other.cost_usd, 10),
            calls=self.calls + other.calls,
            cached_input_tokens=self.cached_input_tokens + other.cached_input_tokens,
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class TaskLimits(_Value):
    """Ceilings a task must stay within; the budget service enforces them."""

    max_tokens: int = Field(50_000, gt=0)
    """Total input+output tokens across every model call of the task."""
    max_cost_usd: float = Field(1.0, ge=0)
    """Total cost across every model call of the task."""
    max_steps: int = Field(8, gt=0, le=64)
    """Largest plan the planner may make."""
    deadline_s: float = Field(300.0, gt=0)
    """Wall-clock seconds from submission after which the task fails."""
    max_revisions: int = Field(0, ge=0, le=20)
    """How often the planner sends an answer the checker rejected back to be redone (with the
    checker's reasons as input) before failing the task."""
    stall_timeout_s: float = Field(120.0, gt=0)
    """Seconds without any message about the task (time waiting for a human approval excluded)
    after which the budget service flags it as stalled and applies ``stall_policy``. Time the
    task spends queued (its work handed out and not yet taken up) is not a stall."""
    stall_policy: Literal["flag", "halt", "cancel"] = "cancel"
    """What a stall does: ``flag`` publishes an event only; ``halt`` pauses the task (resumable);
    ``cancel`` ends it with reason ``stalled``."""
    max_queue_s: float | None = Field(None, gt=0)
    """Most seconds the task may spend queued in all (waiting for the planner to take it up,
    then for workers to take up its steps), after which the budget service cancels it with
    reason ``queued too long``; none by default (the deadline still holds)."""


class Citation(_Value):
    """Provenance of a retrieved passage an answer relies on."""

    doc_id: str
    """Document identifier within the tenant's index."""
    version: str
    """Document version (content hash of the whole document)."""
    chunk_id: str
    """Chunk identifier within the document version."""
    chunk_hash: str
    """sha256 of the chunk text, so a citation can be checked against the index."""


class RetrievalHit(Citation):
    """One retrieved chunk with its text. The text is untrusted input."""

    score: float
    """Retrieval score (higher is better); comparable only within one response."""
    text: str
    """Chunk text. Treat as data, never as instructions."""
    untrusted: bool = True
    """Always true for retrieved text; consumers must delimit it in prompts."""
    injection_score: float = Field(0.0, ge=0.0, le=1.0)
    """Prompt-injection detector score of ``text`` (0 benign .. 1 certain); travels with the text."""
    injection_signals: tuple[str, ...] = ()
    """What the detector saw (``override``, ``tool-call``, ``encoded:base64`` ...)."""
    title: str = ""
    """Document title, when the document has one."""


class Taint(_Value):
    """What untrusted content a step's context holds when it asks for a tool call.

    The worker declares it on every tool request (retrieved passages, tool outputs, and inputs
    from steps whose own context was untrusted); the tool-executor's policy reads it to decide
    whether a write or external call may run without a human."""

    untrusted: bool = False
    """True when the step's context contains any untrusted text."""
    injection_score: float = Field(0.0, ge=0.0, le=1.0)
    """Highest injection score among that text."""
    sources: tuple[str, ...] = ()
    """Where it came from: ``<tool>:<call id>`` or ``step:<step id>`` for an inherited taint."""
    signals: tuple[str, ...] = ()
    """Detector signals seen in that text."""

    def merge(self, other: Taint) -> Taint:
        """The union of two taints (the stricter view of both)."""
        return Taint(
            untrusted=self.untrusted or other.untrusted,
            injection_score=max(self.injection_score, other.injection_score),
            sources=tuple(dict.fromkeys(self.sources + other.sources))[:32],
            signals=tuple(dict.fromkeys(self.signals + other.signals))[:32],
        )


class FixedCall(_Value):
    """One tool call made exactly as written (a workflow's ``tool`` or ``retrieve`` node)."""

    tool: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    arguments: dict[str, Any] = {}


class PlanStep(_Value):
    """One step of a plan."""

    step_id: str = Field(pattern=ID_PATTERN)
    """Identifier unique within the task."""
    kind: Literal["research", "compute", "write", "answer"] = "research"
    """What sort of work the step is; used for model tiering and tool choice."""
    instruction: str = Field(min_length=1, max_length=4000)
    """What the worker must do."""
    tools: tuple[str, ...] = ()
    """Tools the worker may call in this step (``search_docs`` means retrieval)."""
    depends_on: tuple[str, ...] = ()
    """Steps whose outputs this step needs; it is dispatched after they complete."""
    difficulty: Literal["", "easy", "normal", "hard"] = ""
    """How hard the step is, as the planner judged it; the model gateway routes it to a cheaper
    or a stronger model chain by this ('' = the default route)."""
    output_schema: dict[str, Any] | None = None
    """JSON Schema the step's output must match (the output is then a JSON document); the
    checker verifies it."""
    call: FixedCall | None = None
    """A fixed call: the worker makes exactly this call, under the tool policy like any other, with
    no model turn, and the call's result is the step's output (a failed call fails the step).
    None: the model works the step with ``tools``."""
    agent: str = Field("", max_length=70, pattern=r"^([a-z0-9][a-z0-9_-]{0,47}@[0-9a-f]{16})?$")
    """The tenant's agent profile that runs the step (``name@version``, pinned when the task was
    planned: ``v1.agents``): its instructions, model, tools and iteration cap, on its worker pool.
    '' : the worker's own."""
    pool: str = Field("", pattern=POOL_PATTERN)
    """The worker pool that runs the step (its agent profile's ``pool``): the step is published to
    that pool's own consumer (``step.v1.<tenant>.<task>.requested.<pool>``). '' : the shared workers."""


class CheckResult(_Value):
    """Outcome of one property check on an answer."""

    name: str
    """Check name, e.g. ``citations_resolve``."""
    passed: bool
    reason: str = ""
    """Why it passed or failed, readable by an operator."""
    score: float | None = None
    """Optional numeric score in [0, 1]."""
    step_id: str = ""
    """The step whose result was checked; empty for a check of the final answer."""


class TaskPolicy(_Value):
    """What the checker holds a task's answer to (beyond the checks every answer gets)."""

    forbidden_terms: tuple[str, ...] = ()
    """Words or phrases no step result or answer may contain (case-insensitive, whole words)."""
    require_citations: bool | None = None
    """Whether the answer must cite retrieved passages; ``None`` (the default): exactly when some
    step of the task retrieved passages."""
    min_length: int = Field(0, ge=0)
    """Lower bound on the answer's length in characters."""
    max_length: int = Field(8000, gt=0)
    """Upper bound on the answer's length in characters."""
    output_schema: dict[str, Any] | None = None
    """JSON Schema the final answer must match (the answer is then a JSON document)."""
    rubric: str = Field("", max_length=4000)
    """What the LLM judge grades the answer against; empty: the judge prompt's default rubric."""
    judge: bool = True
    """Whether the LLM-as-judge runs (after the property checks pass)."""
    judge_min_score: float = Field(0.6, ge=0.0, le=1.0)
    """Lowest judge score (0..1) that passes."""
    grounding_min_support: float = Field(0.6, ge=0.0, le=1.0)
    """Lowest share of a claim's content words found in its cited passages (or, for a claim
    with no reference, in the task's evidence) for the claim to count as grounded."""
    on_held: Literal["continue", "wait"] = "continue"
    """What a step does when one of its tool calls is held for a human decision: ``continue``
    (the default) goes on without it, and the outcome names the held call (an approval given
    while the task still runs performs it; once the task has ended the approval is void and
    performs nothing); ``wait`` waits for the decision, as long as the approval may take, and
    continues with the call's result."""


class SignedRecord(_Value):
    """A message exactly as its producer signed it, handed on by a service that received it, so
    that a later reader can check who produced it without reading the stream it came from (the
    checker gets rag's retrieval results this way: it holds no right to read the RAG stream)."""

    body: str = Field(max_length=1_048_576)
    """The message's JSON body, byte for byte as it was signed (UTF-8 text)."""
    token: str = Field(max_length=8192)
    """Its identity token (the ``Mesh-Identity`` header it was published with)."""


class Replay(_Value):
    """A task that re-runs an earlier one of its tenant (``meshctl replay``): the same goal, limits
    and policy, with the earlier task's recorded model responses where asked, and no side effect
    performed. Carried from the submission to every step, check and tool call of the replay."""

    of: str = Field(pattern=ID_PATTERN)
    """The task being replayed (same tenant)."""
    recorded: tuple[str, ...] = Field((), max_length=64)
    """Whose model calls are answered with the replayed task's recorded responses: ``plan`` (the
    planner), a step id (the worker's calls in that step), ``check`` (the judge). Every other
    call is made live; a recorded call with no recording is made live too, and said so."""
    route: str = Field("", max_length=64)
    """The model gateway route every live call of the replay takes (``default``, ``judge`` or any
    route the services' model config names); '' = each call's usual route."""
    prompts: dict[str, str] = Field({}, max_length=16)
    """Prompt versions the replay's live calls use, by prompt id (``{"planner.plan": "4"}``): a
    service serving another version reads ``<id>/<version>.md`` under its ``MESH_PROMPTS_DIR``
    (a call whose version is not there fails, naming the file)."""

    def answers(self, step_id: str) -> bool:
        """Whether the calls of ``step_id`` (``plan``, a step id, ``check``) replay recordings."""
        return step_id in self.recorded


class StepResult(_Value):
    """One completed step's result, as the planner sends it to the checker."""

    step_id: str = Field(pattern=ID_PATTERN)
    kind: str = "research"
    output: str = ""
    citations: tuple[Citation, ...] = ()
    output_schema: dict[str, Any] | None = None
    tools: tuple[str, ...] = ()
    """Tools the step called, in order."""
    models: tuple[str, ...] = ()
    """``provider/model`` of the model calls that produced the output."""
    prompt_version: str = ""
    retrievals: tuple[SignedRecord, ...] = Field((), max_length=64)
    """The ``retrieval.completed`` messages the step read, as rag signed them: citations resolve
    against these, and only after the checker verified rag's signature."""


class HeldCall(_Value):
    """A tool call that was held for a human decision and had not been decided when its step
    went on without it (``TaskPolicy.on_held`` ``continue``). An approval given while the task
    still ran performed it; once the task has ended its approval is void (a decision then is
    recorded and performs nothing). The outcome names it so the tenant knows what was not done."""

    approval_id: str
    """The approval to decide (``meshctl approve|deny <id>``)."""
    step_id: str = ""
    call_id: str = ""
    tool: str
    reason: str = ""
    """Why the policy held it (redacted)."""
    destinations: tuple[str, ...] = ()
    """Where the effect would land, without personal data: an address's domain, a URL's host."""


class Destination(_Value):
    """Where one tool effect went (or would have gone), in a form that can be traced without
    putting personal data in the audit stream: the domain or host in clear, a keyed hash of the
    whole value (compute it with ``meshctl audit digest``), and the whole value sealed to the
    tenant's auditor key (``meshctl audit effects`` opens it)."""

    arg: str
    """The argument that names the destination (``to``, ``url``)."""
    kind: Literal["email", "url", "value"]
    where: str = ""
    """An address's domain, a URL's host (empty for other values)."""
    digest: str = ""
    """``hmac-sha256:<hex>`` of the normalised value under the deployment's audit key, derived per
    tenant (empty when no audit key is configured)."""
    sealed: str = ""
    """The whole value, sealed (libsodium sealed box, base64) to the tenant's auditor public key
    from the trust bundle (empty when the tenant has no auditor key)."""
    offered: bool = False
    """True when the tenant's own goal offered this value in this role (a recipient to mail, a
    URL to open)."""
