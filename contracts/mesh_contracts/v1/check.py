"""Answer verification: the planner asks, the checker gives a verdict."""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

from pydantic import ConfigDict, Field

from mesh_contracts.base import Contract, ContractSpec
from mesh_contracts.decode import MB
from mesh_contracts.v1.common import CheckResult, Citation, Replay, StepResult, TaskPolicy, TokenUsage

_EX = {"tenant": "acme", "task_id": "t-7f3a"}

CheckName = Literal[
    "non_empty", "length", "schema", "citations_present", "references_resolve", "citations_resolve", "grounded",
    "no_pii", "no_forbidden_terms", "judge",
]  # fmt: skip
"""The checker's checks, by the name its results carry (a workflow's check node selects among them)."""
CHECK_NAMES: tuple[str, ...] = get_args(CheckName)


class CheckRequested(Contract):
    """The planner asks the checker to verify a candidate final answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "check.requested",
                    "attempt": 1,
                    "goal": "...",
                    "answer": "... [durability.md#2]",
                    "citations": [
                        {"doc_id": "durability.md", "version": "9c1e", "chunk_id": "2", "chunk_hash": "ab12"}
                    ],
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "check",
        "requested",
        producers=("planner",),
        consumers=("checker",),
        summary="Verify an answer.",
        max_bytes=4 * MB,  # every step's result with the retrieval records it read
        sealed=("goal", "answer", "citations", "steps"),
    )

    type: Literal["check.requested"] = "check.requested"
    attempt: int = Field(1, ge=1)
    goal: str
    """The task's goal, for relevance checks."""
    answer: str
    citations: tuple[Citation, ...] = ()
    require_citations: bool = True
    """Whether an answer without citations fails."""
    max_length: int = 8000
    """Upper bound on the answer's length in characters."""
    policy: TaskPolicy = TaskPolicy()
    """The task's policy (forbidden terms, length bounds, output schema, judge rubric)."""
    steps: tuple[StepResult, ...] = ()
    """Every step's result: each is checked too (schema, citations, grounding, PII, terms)."""
    answer_step: str = ""
    """The step whose output is ``answer``."""
    prompt_versions: dict[str, str] = {}
    """Prompt version per agent role that shaped the answer (``planner``, ``worker``)."""
    started_at: float = Field(0.0, ge=0)
    """When the task was accepted (epoch seconds): a retrieval record signed before it is not
    one of this task's (0: unknown, no lower bound)."""
    replay: Replay | None = None
    """The task's ``replay``: the judge may answer from the replayed task's recorded verdict."""
    node: str = Field("", max_length=64)
    """A workflow's ``check`` node asks (its id): the verdict decides that node (``answer`` is the
    output of the node it checks), not the task. Empty: the task's answer."""
    only: tuple[CheckName, ...] = ()
    """The checks that decide the verdict, the others not run or not counted (a check node's
    ``checks``; ``judge`` among them runs the judge whatever ``policy.judge`` says). Empty: all."""


class CheckVerdict(Contract):
    """The checker's verdict with per-check results."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "check.verdict",
                    "attempt": 1,
                    "passed": True,
                    "checks": [{"name": "citations_present", "passed": True, "reason": "1 citation"}],
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "check",
        "verdict",
        producers=("checker",),
        consumers=("planner",),
        summary="Pass/fail with reasons.",
        sealed=("checks",),
    )

    type: Literal["check.verdict"] = "check.verdict"
    attempt: int = Field(1, ge=1)
    passed: bool
    checks: tuple[CheckResult, ...] = ()
    usage: TokenUsage = TokenUsage()
    """Model usage of the check (LLM-as-judge)."""
    judge_model: str = ""
    """``provider/model`` of the judge, when the judge ran."""
    judge_score: float | None = None
    """The judge's score in [0, 1], when the judge ran."""
    failed_steps: tuple[str, ...] = ()
    """Steps whose own results failed a check (the planner redoes these and their dependents)."""
    prompt_versions: dict[str, str] = {}
    """Prompt version per agent role, including the judge's (``judge``)."""
    node: str = Field("", max_length=64)
    """The request's ``node``: a workflow's check node the verdict is for (empty: the task's answer)."""
