"""Task lifecycle: submitted by a tenant's client, planned, then completed, failed or rejected."""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from mesh_contracts.base import APPROVER, CLIENT, Contract, ContractSpec
from mesh_contracts.decode import KB
from mesh_contracts.v1.common import (
    CheckResult,
    Citation,
    HeldCall,
    PlanStep,
    Replay,
    TaskLimits,
    TaskPolicy,
    TokenUsage,
)

_EX = {"tenant": "acme", "task_id": "t-7f3a"}


class TaskSubmitted(Contract):
    """A tenant asks the mesh to achieve a goal. Published by the tenant's client."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "task.submitted",
                    "goal": "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23.",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "submitted",
        producers=(CLIENT,),
        consumers=("planner",),
        summary="A tenant submits a goal.",
        max_bytes=256 * KB,
        sealed=("goal", "inputs"),
    )

    type: Literal["task.submitted"] = "task.submitted"
    goal: str = Field(min_length=1, max_length=10_000)
    """What the tenant wants done, in natural language."""
    limits: TaskLimits = TaskLimits()
    """Ceilings for this task; defaults apply when omitted."""
    labels: dict[str, str] = {}
    """Who to charge (e.g. ``{"team": "support", "user": "u-17"}``): kept in the task record and the
    budget's spend records (the task's, and the tenant-day's cost by ``key=value``); the keys in
    ``MESH_BUDGET_METRIC_LABELS`` also become attributes of the spend metrics."""
    policy: TaskPolicy = TaskPolicy()
    """What the checker holds the answer to: forbidden terms, length, schema, judge rubric."""
    priority: int = Field(5, ge=0, le=9)
    """0 (lowest) to 9 (highest): within its tenant's turn, a service takes higher-priority work
    first (the planner this submission, the worker the task's steps)."""
    replay: Replay | None = None
    """Set when this task replays an earlier one (``meshctl replay``): which model calls answer
    from its recordings, which route the others take; its write and external tools run dry."""
    workflow: str | None = Field(None, max_length=90)
    """A registered workflow of the tenant to run (``name``, ``name@latest`` or ``name@<version>``):
    the planner resolves it when the task starts and the task keeps that version to the end, a
    newer one published meanwhile or not. None: the planner plans from the goal."""
    inputs: dict[str, Any] = {}
    """The workflow's inputs (checked against its ``inputs`` schema; ``{{inputs.<name>}}`` in its nodes)."""
    agent: str | None = Field(None, max_length=70)
    """One of the tenant's agent profiles (``name`` or ``name@<version>``) to hand the goal to as
    one step: no plan of the model's, the profile's instructions, model and tools (how the A2A
    gateway runs a profile it exposes). None: the planner plans (or runs ``workflow``)."""


REJECTION_CODES = (
    "invalid", "too_many_in_flight", "rate_limited", "overloaded", "quota_exceeded", "busy", "suspended",
)  # fmt: skip
"""``TaskRejected.code``: ``invalid`` (malformed, unverifiable, unknown version: do not retry as
is), ``too_many_in_flight`` (the tenant's tasks in flight are at its limit), ``rate_limited``
(over the tenant's submissions per second, or its bytes per minute at the door), ``overloaded``
(the mesh refuses new work for now: a stream is near its cap; the planner says which, or the TASK
stream refused the submission), ``quota_exceeded`` (the tenant holds its whole share of the TASK
stream: its quota, ``MESH_QUOTA_SHARE``), ``busy`` (too many of the tenant's submissions wait at
the door), ``suspended`` (an operator suspended the tenant: no new work until it is resumed,
``meshctl tenant resume``). All but ``invalid`` and ``suspended`` come with ``retry_after_s`` (``quota_exceeded`` with 0 when the
submission is larger than the whole quota)."""


class TaskRejected(Contract):
    """A submitted task could not be accepted (malformed, unknown version, over a limit)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "task.rejected",
                    "reason": "invalid task.submitted: goal: Field required",
                    "source_subject": "task.v1.acme.t-7f3a.submitted",
                },
                {
                    **_EX,
                    "type": "task.rejected",
                    "reason": "tenant acme has 64 tasks in flight, its limit",
                    "source_subject": "task.v1.acme.t-7f3a.submitted",
                    "code": "too_many_in_flight",
                    "retry_after_s": 2.5,
                },
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "rejected",
        producers=("planner",),
        consumers=(CLIENT,),
        summary="A submission was refused; nothing ran.",
    )

    type: Literal["task.rejected"] = "task.rejected"
    reason: str
    """Readable reason, the same text that went to the dead-letter stream."""
    source_subject: str = ""
    """Subject the rejected message arrived on."""
    code: str = "invalid"
    """Machine-readable reason (``REJECTION_CODES``)."""
    retry_after_s: float | None = None
    """When it is worth submitting again (admission refusals); None: not as it is."""


class PlanCreated(Contract):
    """The planner's plan for a task. Steps run when their dependencies have completed."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "plan.created",
                    "steps": [
                        {
                            "step_id": "s1",
                            "kind": "research",
                            "instruction": "Find how duplicates are avoided",
                            "tools": ["search_docs"],
                        },
                        {"step_id": "s2", "kind": "compute", "instruction": "Compute 17 * 23", "tools": ["calculator"]},
                    ],
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "planned",
        producers=("planner",),
        consumers=(CLIENT,),
        summary="The plan the planner made.",
        sealed=("steps",),
    )

    type: Literal["plan.created"] = "plan.created"
    steps: tuple[PlanStep, ...] = Field(min_length=1)
    """Steps in dependency order."""
    revision: int = 1
    """1 for the first plan; increases on replanning."""
    reviewed: str = ""
    """The draft (``plan.drafted``'s hash) this plan is, exactly, and who approved it
    (``<hash> by <reviewer>``); '' when the plan was not reviewed."""
    workflow: str = ""
    """``name@version`` of the registered workflow the plan is made of ('' when the model planned)."""


class PlanDrafted(Contract):
    """A plan that waits for a person (the tenant plans under review): nothing runs until one of
    the tenant's reviewers approves this draft (``plan.reviewed``), edits it (a new draft) or
    rejects it (the task fails with their reason)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "plan.drafted",
                    "steps": [
                        {"step_id": "s1", "kind": "research", "instruction": "Find it", "tools": ["search_docs"]}
                    ],
                    "draft": "5be1c0a94e7d2f13",
                    "revision": 1,
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "drafted",
        producers=("planner",),
        consumers=(CLIENT, APPROVER),
        summary="A plan waiting for review.",
        sealed=("steps", "changes"),
    )

    type: Literal["plan.drafted"] = "plan.drafted"
    steps: tuple[PlanStep, ...] = Field(min_length=1)
    draft: str = Field(pattern=r"^[0-9a-f]{16}$")
    """The draft's hash (``draft_hash``): what a review names, so it decides this draft and no other."""
    revision: int = 1
    """1 for the model's draft; one more for each edit."""
    edited_by: str = ""
    """Who edited the draft before this one into this one ('' for the model's)."""
    changes: tuple[str, ...] = ()
    """What the edit changed, step by step (``~ s2.instruction: ...``)."""
    workflow: str = ""
    """``name@version`` when the draft is a registered workflow in ``review`` mode: its nodes, as
    the workflow defines them (their templates are filled in as they run). An edit may change what
    its agent nodes are told, nothing else ('' for a plan the model made)."""


REVIEW_DECISIONS = ("approve", "reject", "edit")


class PlanReviewed(Contract):
    """A reviewer's decision on a draft plan: ``approve`` (it runs, exactly as drafted), ``reject``
    (the task fails with the comment) or ``edit`` (``steps`` become a new draft, which waits for
    approval in turn)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "plan.reviewed",
                    "draft": "5be1c0a94e7d2f13",
                    "decision": "approve",
                    "reviewed_by": "approver.acme.alice",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "approval",
        "reviewed",
        producers=(APPROVER,),
        consumers=("planner",),
        summary="Approve, edit or reject a draft plan.",
        max_bytes=128 * KB,
        sealed=("steps", "comment"),
    )

    type: Literal["plan.reviewed"] = "plan.reviewed"
    draft: str = Field(pattern=r"^[0-9a-f]{16}$")
    decision: Literal["approve", "reject", "edit"]
    steps: tuple[PlanStep, ...] = ()
    """``edit``: the plan as the reviewer wants it."""
    reviewed_by: str
    """Identity that reviewed (checked against the message's signed identity)."""
    comment: str = Field("", max_length=2000)


def draft_hash(steps: tuple[PlanStep, ...] | list[PlanStep]) -> str:
    """A draft's identity: the SHA-256 of its steps' canonical JSON, 16 hex digits."""
    body = json.dumps([s.model_dump(mode="json") for s in steps], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class TaskCompleted(Contract):
    """The task finished and its answer passed the checker."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "task.completed",
                    "answer": "Every side effect is keyed ... 17 * 23 = 391.",
                    "citations": [
                        {"doc_id": "durability.md", "version": "9c1e", "chunk_id": "2", "chunk_hash": "ab12"}
                    ],
                    "usage": {"input_tokens": 812, "output_tokens": 96, "cost_usd": 0.0, "calls": 4},
                    "steps": 2,
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "completed",
        producers=("planner",),
        consumers=(CLIENT,),
        summary="Final answer with citations and usage.",
        sealed=("answer", "citations", "checks"),
    )

    type: Literal["task.completed"] = "task.completed"
    answer: str
    """The final answer."""
    citations: tuple[Citation, ...] = ()
    """Retrieved passages the answer relies on."""
    usage: TokenUsage = TokenUsage()
    """Tokens and cost over every model call of the task."""
    steps: int = 0
    """Number of plan steps executed."""
    elapsed_s: float | None = None
    """Seconds from submission to completion, as measured by the planner."""
    checks: tuple[CheckResult, ...] = ()
    """The checker's last verdict, check by check (empty when the task ended before a check)."""
    judge_score: float | None = None
    """The LLM judge's score of the last checked answer, when the judge ran."""
    prompt_versions: dict[str, str] = {}
    """Prompt version per agent role used by the task's model calls (``planner``, ``worker``, ``judge``)."""
    tools: tuple[str, ...] = ()
    """Tool calls the task's steps made, in step order."""
    revisions: int = 0
    """How many times the checker sent the answer back before this outcome."""
    held: tuple[HeldCall, ...] = ()
    """Tool calls held for a human decision that the task went on without (``policy.on_held``
    ``continue``): the answer does not include their effects, and now that the task has ended
    their approvals are void (one still undecided is never performed)."""
    workflow: str = ""
    """``name@version`` of the registered workflow the task ran ('' when the model planned)."""


class TaskFailed(Contract):
    """The task ended without an acceptable answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "task.failed",
                    "reason": "step s2 failed: tool calculator: division by zero",
                    "failed_step": "s2",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "failed",
        producers=("planner",),
        consumers=(CLIENT,),
        summary="The task ended without an answer, with the reason.",
        sealed=("reason", "checks"),
    )

    type: Literal["task.failed"] = "task.failed"
    reason: str
    """Readable reason naming the cause."""
    failed_step: str | None = None
    """The step that caused the failure, when one did."""
    usage: TokenUsage = TokenUsage()
    """Tokens and cost spent before the failure."""
    checks: tuple[CheckResult, ...] = ()
    """The checker's last verdict, check by check (empty when the task ended before a check)."""
    judge_score: float | None = None
    """The LLM judge's score of the last checked answer, when the judge ran."""
    prompt_versions: dict[str, str] = {}
    """Prompt version per agent role used by the task's model calls (``planner``, ``worker``, ``judge``)."""
    tools: tuple[str, ...] = ()
    """Tool calls the task's steps made, in step order."""
    revisions: int = 0
    """How many times the checker sent the answer back before this outcome."""
    held: tuple[HeldCall, ...] = ()
    """Tool calls held for a human decision that the task went on without (``policy.on_held``
    ``continue``): the answer does not include their effects, and now that the task has ended
    their approvals are void (one still undecided is never performed)."""
    workflow: str = ""
    """``name@version`` of the registered workflow the task ran ('' when the model planned)."""
