"""Step execution: the planner dispatches steps, the worker runs them, calling tools and retrieval."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from mesh_contracts.base import CLIENT, ID_PATTERN, Contract, ContractSpec
from mesh_contracts.decode import MB
from mesh_contracts.v1.common import (
    Citation,
    Destination,
    HeldCall,
    PlanStep,
    Replay,
    RetrievalHit,
    SignedRecord,
    Taint,
    TokenUsage,
)

_EX = {"tenant": "acme", "task_id": "t-7f3a"}
DOCUMENT_TYPES: dict[str, str] = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".txt": "text/plain",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
}
"""File suffix -> the media type an ``ingest.requested`` declares (the RAG service reads these)."""
MAX_INGEST_B64 = 6_000_000
"""Largest base64 document one ingest message carries (about 4.5 MB of document; the mesh's
nats-server allows 8 MB payloads)."""


class StepRequested(Contract):
    """The planner asks a worker to execute one plan step."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "step.requested",
                    "step": {
                        "step_id": "s2",
                        "kind": "compute",
                        "instruction": "Compute 17 * 23",
                        "tools": ["calculator"],
                    },
                    "attempt": 1,
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "step",
        "requested",
        producers=("planner",),
        consumers=("worker",),
        summary="Run one step.",
        sealed=("step", "inputs", "feedback"),
        routed=True,  # a step of an agent profile with a worker pool: to that pool's consumer only
    )

    type: Literal["step.requested"] = "step.requested"
    step: PlanStep
    """The step to run."""
    attempt: int = Field(1, ge=1)
    """Dispatch attempt; part of the message id so a re-dispatch is deduplicated."""
    inputs: dict[str, str] = {}
    """Outputs of the steps this one depends on, by step id."""
    max_iterations: int = Field(6, ge=1, le=50)
    """Cap on model calls in this step's agent loop."""
    tries: int = Field(1, ge=1, le=10)
    """The tries the step's workflow node allows (its ``retry``): dispatching it again with the
    same inputs after a failed try is the policy, which the budget's loop breaker allows for."""
    input_taint: dict[str, Taint] = {}
    """Taint of each input, by step id: what untrusted content the step that wrote it had read.
    An input without an entry is treated as untrusted (its provenance is unknown)."""
    feedback: str = ""
    """The checker's reasons when this step is redone after a rejected answer. Untrusted: the
    reasons can quote retrieved text and tool results."""
    on_held: Literal["continue", "wait"] = "wait"
    """The task's ``policy.on_held``: whether the step goes on without a tool call that is held for a
    human (``continue``) or waits for the decision (``wait``, the behaviour before this field)."""
    replay: Replay | None = None
    """The task's ``replay`` (``task.submitted``): the step's model calls may answer from the
    replayed task's recordings, and its tool calls carry it on."""

    def routed_to(self) -> str:
        """A step of a profile with a worker pool goes to that pool's consumer only."""
        return self.step.pool


class StepCompleted(Contract):
    """A worker finished a step."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "step.completed",
                    "step_id": "s2",
                    "attempt": 1,
                    "output": "17 * 23 = 391",
                    "usage": {"input_tokens": 120, "output_tokens": 12, "cost_usd": 0.0, "calls": 2},
                    "iterations": 2,
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "step",
        "completed",
        producers=("worker",),
        consumers=("planner",),
        summary="A step's output.",
        sealed=("output", "citations", "retrievals"),
    )

    type: Literal["step.completed"] = "step.completed"
    step_id: str = Field(pattern=ID_PATTERN)
    attempt: int = Field(1, ge=1)
    output: str
    """The step's result text."""
    citations: tuple[Citation, ...] = ()
    """Retrieved passages the output relies on."""
    usage: TokenUsage = TokenUsage()
    """Model usage of this step."""
    iterations: int = 0
    """Model calls the agent loop made."""
    tools: tuple[str, ...] = ()
    """Tools the step called, in order."""
    models: tuple[str, ...] = ()
    """``provider/model`` of the step's model calls (the checker's judge avoids these by default)."""
    prompt_version: str = ""
    """Version of the worker prompt the step ran with (``worker.system@3+ab12cd34``)."""
    taint: Taint | None = None
    """What untrusted content the step read: the output may carry it, so a step that takes it as
    input inherits this taint (the planner passes it on in ``StepRequested.input_taint``). None
    from a worker that does not declare it: its output is then treated as untrusted."""
    held: tuple[HeldCall, ...] = ()
    """Tool calls held for a human decision that the step went on without."""
    retrievals: tuple[SignedRecord, ...] = Field((), max_length=64)
    """The ``retrieval.completed`` messages the step read, byte for byte as rag signed them, for
    the checker (which reads no stream). The worker hands on up to 256 KB of them per step."""
    tool_denials: int = Field(0, ge=0)
    """Tool calls of the step a rule or a person refused (``ToolCompleted.denied``)."""


class StepFailed(Contract):
    """A worker could not complete a step."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "step.failed",
                    "step_id": "s2",
                    "attempt": 1,
                    "reason": "iteration cap (6) reached without an answer",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "step",
        "failed",
        producers=("worker",),
        consumers=("planner",),
        summary="A step failed, with the reason.",
        sealed=("reason",),
    )

    type: Literal["step.failed"] = "step.failed"
    step_id: str = Field(pattern=ID_PATTERN)
    attempt: int = Field(1, ge=1)
    reason: str
    usage: TokenUsage = TokenUsage()
    """Model usage spent before the failure."""
    halted: bool = False
    """True when the step stopped because its task was halted or cancelled, not because it failed;
    a halted step is dispatched again on resume."""


class ToolRequested(Contract):
    """A worker asks the tool-executor to run a tool."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "tool.requested",
                    "step_id": "s2",
                    "call_id": "s2-i1-c0",
                    "tool": "calculator",
                    "arguments": {"expression": "17 * 23"},
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "tool",
        "requested",
        producers=("worker",),
        consumers=("tool-executor",),
        summary="Run a tool.",
        sealed=("arguments",),
    )

    type: Literal["tool.requested"] = "tool.requested"
    step_id: str = Field(pattern=ID_PATTERN)
    call_id: str = Field(pattern=ID_PATTERN)
    """Deterministic id (step, iteration, call index); the idempotency key of the call."""
    tool: str
    """Registered tool name."""
    arguments: dict[str, Any] = {}
    """Arguments, validated against the tool's JSON schema before anything runs."""
    taint: Taint = Taint()
    """Untrusted content in the step's context when the model asked for this call; the
    tool-executor's policy decides from it whether a write or external call needs approval."""
    replay: Replay | None = None
    """Set in a replayed task: a write or external tool is not performed (dry run); the replayed
    task's recorded result of the same call is answered when there is one."""


class RouteAttempt(BaseModel):
    """One try of a call at one replica of a tool server."""

    endpoint: str
    outcome: str
    """``ok``, or why it failed there: ``unreachable``, ``lost``, ``timeout``, ``auth`` ..."""
    latency_ms: float = 0.0


class CallRoute(BaseModel):
    """Where a call to a tenant's tool server went (``tool.completed``'s ``route``)."""

    server: str
    endpoint: str = ""
    """The replica that answered ('' when none did)."""
    attempts: list[RouteAttempt] = []
    latency_ms: float = 0.0
    """From the first try to the answer, failovers included."""


class ToolCompleted(Contract):
    """The tool-executor's answer to a tool request (success or structured error)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "tool.completed",
                    "step_id": "s2",
                    "call_id": "s2-i1-c0",
                    "tool": "calculator",
                    "ok": True,
                    "result": "391",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "tool",
        "completed",
        producers=("tool-executor",),
        consumers=("worker",),
        summary="A tool's result or error.",
        max_bytes=4 * MB,  # a web page of up to 1,000,000 characters, JSON-escaped
        sealed=("result", "error"),
    )

    type: Literal["tool.completed"] = "tool.completed"
    step_id: str = Field(pattern=ID_PATTERN)
    call_id: str = Field(pattern=ID_PATTERN)
    tool: str
    ok: bool
    """False when the tool refused or failed; ``error`` says why."""
    result: str = ""
    """Tool output as text. Untrusted input for the model."""
    error: str = ""
    """Structured error for the agent when ``ok`` is false."""
    untrusted: bool = False
    """True when ``result`` or ``error`` carries outside content (a web page or an HTTP error
    from a server, an MCP server's answer or error, a note someone wrote, a person's comment):
    the worker delimits it in prompts and taints the step. False only for text the
    tool-executor's own code wrote (a calculator's result, a validation or policy error)."""
    injection_score: float = Field(0.0, ge=0.0, le=1.0)
    """Prompt-injection detector score of ``result`` (or of ``error`` when the call failed)."""
    injection_signals: tuple[str, ...] = ()
    """What the detector saw in ``result`` (or ``error``)."""
    approval_id: str = ""
    """The approval this call waited for, if it needed one."""
    stopped: Literal["", "halted", "stopped"] = ""
    """Set when the call was not run because the task is stopped: ``halted`` (it may resume:
    the step is halted, and dispatched again after a resume) or ``stopped`` (cancelled, ended,
    or the kill switch). The worker then ends the step that way rather than handing the refusal
    to the model: whichever service saw the halt first, the step does not go on without the call."""
    denied: bool = False
    """True when a rule or a person refused the call: the task's release denies the tool, the
    policy blocks it, or its approval was denied or expired (a signal a release is judged by)."""
    dry_run: bool = False
    """True when the call was not performed because its task is a replay (a write or external
    tool): ``result`` is the replayed task's recorded result of the call, or a note that says so."""
    route: CallRoute | None = None
    """A call to a tenant's tool server: which server and replica answered, after which attempts."""


class RetrievalRequested(Contract):
    """A worker asks the RAG service for passages relevant to a query."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "retrieval.requested",
                    "step_id": "s1",
                    "call_id": "s1-i1-c0",
                    "query": "duplicate side effects",
                    "top_k": 3,
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "rag",
        "requested",
        producers=("worker",),
        consumers=("rag",),
        summary="Retrieve passages for a query.",
        sealed=("query",),
    )

    type: Literal["retrieval.requested"] = "retrieval.requested"
    step_id: str = Field(pattern=ID_PATTERN)
    call_id: str = Field(pattern=ID_PATTERN)
    query: str = Field(min_length=1, max_length=2000)
    top_k: int = Field(3, ge=1, le=50)
    method: Literal["hybrid", "vector", "bm25"] = "hybrid"
    """Ranking: vector similarity and BM25 fused by reciprocal rank (default), or one alone."""
    scope: tuple[str, ...] = Field((), max_length=32)
    """Only documents whose id starts with one of these (the step's agent profile's ``documents``);
    empty: every document of the tenant."""


class RetrievalCompleted(Contract):
    """Passages retrieved from the tenant's own index, with provenance."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "retrieval.completed",
                    "step_id": "s1",
                    "call_id": "s1-i1-c0",
                    "hits": [
                        {
                            "doc_id": "durability.md",
                            "version": "9c1e",
                            "chunk_id": "2",
                            "chunk_hash": "ab12",
                            "score": 3.2,
                            "text": "Every side effect is guarded by an idempotency ledger...",
                        }
                    ],
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "rag",
        "completed",
        producers=("rag",),
        consumers=("worker",),
        summary="Retrieved passages with provenance.",
        sealed=("hits",),
    )

    type: Literal["retrieval.completed"] = "retrieval.completed"
    step_id: str = Field(pattern=ID_PATTERN)
    call_id: str = Field(pattern=ID_PATTERN)
    hits: tuple[RetrievalHit, ...] = ()
    index_version: str = ""
    """Version of the tenant index that answered (changes on every ingest)."""
    cached: bool = False
    """True when the hits came from the retrieval cache (valid for ``index_version`` only)."""


Decision = Literal[
    "allowed", "approval-requested", "approved", "denied", "expired", "blocked", "rate-limited", "invalid"
]


class ToolAudited(Contract):
    """The tool-executor's record of a policy decision on a tool call (kept in the TOOL stream).

    Every write or external call, every refused call and every approval outcome is recorded
    with the reasons and the step's taint, so an operator can tell which content tried to make
    an agent do what, and who allowed it. Arguments are redacted (secrets, PII)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "tool.audited",
                    "step_id": "s3",
                    "call_id": "s3-a1-i1-c0",
                    "tool": "send_email",
                    "risk": "external",
                    "decision": "approval-requested",
                    "reasons": ["external tool in a step whose context holds untrusted content"],
                    "arguments": {"to": "[REDACTED:email]"},
                    "taint": {"untrusted": True, "injection_score": 0.9, "sources": ["search_docs:s1-a1-i0-c0"]},
                    "approval_id": "ap-3f9c",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "tool",
        "audited",
        producers=("tool-executor",),
        consumers=(),
        summary="A tool-policy decision, for the audit.",
        sealed=("arguments",),
    )

    type: Literal["tool.audited"] = "tool.audited"
    step_id: str = ""
    call_id: str = Field(pattern=ID_PATTERN)
    tool: str
    risk: str = ""
    """The tool's risk class (read, write, external); empty for an unknown tool."""
    decision: Decision
    reasons: tuple[str, ...] = ()
    arguments: dict[str, Any] = {}
    """The call's arguments, redacted."""
    taint: Taint = Taint()
    approval_id: str = ""
    decided_by: str = ""
    """Who decided an approval (identity name), or ``policy``."""
    destinations: tuple[Destination, ...] = ()
    """Where the effect lands, traceable without personal data in clear (``arguments`` are
    redacted): domain or host, a keyed hash and the value sealed to the tenant's auditor."""
    void: str = ""
    """Set when a held call was not run because its approval is void, with why (``task ended
    (cancelled)``): the task ended before the call was approved, whether a person decided after
    the end (``decided_by`` names them) or nobody did (``policy:task-ended``). The decision is
    then ``blocked``. Empty otherwise (the default, for records written before approvals could
    be void)."""


class IngestRequested(Contract):
    """A tenant's client hands a document to the RAG service (``task_id`` is the ingest id)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant": "acme",
                    "task_id": "ing-4c1d",
                    "type": "ingest.requested",
                    "doc_id": "handbook/refunds.md",
                    "media_type": "text/markdown",
                    "content_b64": "IyBSZWZ1bmRzCg==",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "rag",
        "ingest",
        producers=(CLIENT,),
        consumers=("rag",),
        summary="Add or replace a document.",
        max_bytes=8 * MB,  # a base64 document of up to MAX_INGEST_B64 characters
        sealed=("content_b64", "title"),
    )

    type: Literal["ingest.requested"] = "ingest.requested"
    doc_id: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$")
    """Document identifier within the tenant's index (a relative path); re-ingesting it replaces it."""
    media_type: Literal["text/markdown", "text/plain", "text/html", "application/pdf"]
    content_b64: str = Field(max_length=MAX_INGEST_B64)
    """The document's bytes, base64."""
    title: str = Field("", max_length=300)


class IngestCompleted(Contract):
    """The RAG service's answer to an ingest: the new version is searchable by every replica."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant": "acme",
                    "task_id": "ing-4c1d",
                    "type": "ingest.completed",
                    "doc_id": "handbook/refunds.md",
                    "ok": True,
                    "version": "9c1e77aa01b2c3d4",
                    "chunks": 12,
                    "replaced": "1f0e77aa01b2c3d4",
                    "index_version": "77ab01c2d3e4f5a6",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "rag",
        "ingested",
        producers=("rag",),
        consumers=(CLIENT,),
        summary="A document is (or is not) indexed.",
        sealed=("error",),
    )

    type: Literal["ingest.completed"] = "ingest.completed"
    doc_id: str
    ok: bool
    error: str = ""
    """Why the document was refused (unreadable, empty, too large), when ``ok`` is false."""
    version: str = ""
    """Content hash of the document as indexed."""
    chunks: int = 0
    replaced: str = ""
    """The version this ingest replaced ('' for a new document, equal to ``version`` when unchanged)."""
    index_version: str = ""
    """The tenant index's version after this ingest (retrieval caches are keyed by it)."""
    seconds: float = 0.0
    """Extraction, chunking and embedding time."""
