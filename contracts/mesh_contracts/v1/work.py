"""Step execution: the planner dispatches steps, the worker runs them, calling tools and retrieval."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from mesh_contracts.base import ID_PATTERN, Contract, ContractSpec
from mesh_contracts.v1.common import Citation, PlanStep, RetrievalHit, TokenUsage

_EX = {"tenant": "acme", "task_id": "t-7f3a"}


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
        "step", "requested", producers=("planner",), consumers=("worker",), summary="Run one step."
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
        "step", "completed", producers=("worker",), consumers=("planner",), summary="A step's output."
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
        "step", "failed", producers=("worker",), consumers=("planner",), summary="A step failed, with the reason."
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
        "tool", "requested", producers=("worker",), consumers=("tool-executor",), summary="Run a tool."
    )

    type: Literal["tool.requested"] = "tool.requested"
    step_id: str = Field(pattern=ID_PATTERN)
    call_id: str = Field(pattern=ID_PATTERN)
    """Deterministic id (step, iteration, call index); the idempotency key of the call."""
    tool: str
    """Registered tool name."""
    arguments: dict[str, Any] = {}
    """Arguments, validated against the tool's JSON schema before anything runs."""


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
        "tool", "completed", producers=("tool-executor",), consumers=("worker",), summary="A tool's result or error."
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
        "rag", "requested", producers=("worker",), consumers=("rag",), summary="Retrieve passages for a query."
    )

    type: Literal["retrieval.requested"] = "retrieval.requested"
    step_id: str = Field(pattern=ID_PATTERN)
    call_id: str = Field(pattern=ID_PATTERN)
    query: str = Field(min_length=1, max_length=2000)
    top_k: int = Field(3, ge=1, le=50)


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
        "rag", "completed", producers=("rag",), consumers=("worker",), summary="Retrieved passages with provenance."
    )

    type: Literal["retrieval.completed"] = "retrieval.completed"
    step_id: str = Field(pattern=ID_PATTERN)
    call_id: str = Field(pattern=ID_PATTERN)
    hits: tuple[RetrievalHit, ...] = ()
    index_version: str = ""
    """Version of the tenant index that answered (changes on every ingest)."""
