"""Task state lives in JetStream KV, updated with compare-and-set on the revision.

The record is the only truth about a task's progress: any replica of the planner can
pick up any task, and other services read it (e.g. to see a cancel they missed).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict

from mesh_contracts.v1 import (
    CheckResult,
    Citation,
    HeldCall,
    PlanStep,
    SignedRecord,
    Taint,
    TaskLimits,
    TaskPolicy,
    TokenUsage,
)

TaskStatus = Literal["planning", "running", "checking", "halted", "completed", "failed", "cancelled"]
StepStatus = Literal["pending", "dispatched", "completed", "failed", "halted"]
TERMINAL: tuple[str, ...] = ("completed", "failed", "cancelled")


STATUS_BUCKET = "status"
EVIDENCE_BUCKET = "evidence"
GUARDED: tuple[str, ...] = ("halted", "completed", "failed", "cancelled")
"""Task statuses that stop every further model or tool call (the planner writes these, and a
resume from ``halted``, to the ``status`` bucket)."""


class StatusRecord(BaseModel):
    """The ``status`` bucket's value, key ``<tenant>.<task_id>``: whether the task may go on."""

    model_config = ConfigDict(extra="allow")

    status: str
    reason: str = ""

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class Evidence(BaseModel):
    """The ``evidence`` bucket's value, key ``<tenant>.<task>.<step>.<attempt>``: the retrieval
    records one step attempt read, as rag signed them (the planner hands them to the checker)."""

    records: list[SignedRecord] = []


def evidence_key(tenant: str, task_id: str, step_id: str, attempt: int) -> str:
    return f"{tenant}.{task_id}.{step_id}.{attempt}"


def bind(nc: Any, bucket: str) -> KeyValue:
    """A provisioned bucket (provisioning makes every bucket allow direct gets), bound without
    asking the server for its stream's info: ``$JS.API.STREAM.INFO`` with a subjects filter
    lists every key of a bucket, so no service holds it on a bucket where it may only read
    some keys (the per-service ``ledger``). A missing bucket fails on first use instead."""
    return KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=nc.jetstream(), direct=True)


class StepState(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: PlanStep
    status: StepStatus = "pending"
    attempt: int = 0
    output: str = ""
    citations: list[Citation] = []
    usage: TokenUsage = TokenUsage()
    reason: str = ""
    tools: list[str] = []
    """Tools the completed attempt called, in order."""
    models: list[str] = []
    """``provider/model`` of the completed attempt's model calls."""
    prompt_version: str = ""
    taint: Taint | None = None
    """What untrusted content the completed attempt read (None: not declared by its worker, so
    its output counts as untrusted); passed on to the steps that take its output."""
    held: list[HeldCall] = []
    """Calls of the completed attempt held for a human that it went on without."""


class OutboxItem(BaseModel):
    """A message decided in a state transition but not yet confirmed published."""

    type: str
    key: str
    body: dict[str, Any]
    causation: str = ""


class TaskRecord(BaseModel):
    """The ``tasks`` bucket's value, key ``<tenant>.<task_id>``."""

    model_config = ConfigDict(extra="allow")

    tenant: str
    task_id: str
    goal: str
    limits: TaskLimits = TaskLimits()
    policy: TaskPolicy = TaskPolicy()
    status: TaskStatus = "planning"
    reason: str = ""
    steps: dict[str, StepState] = {}
    planner_usage: TokenUsage = TokenUsage()
    check_attempt: int = 0
    feedback: dict[str, str] = {}
    """Checker reasons per step being redone, passed to the step as its ``feedback`` (untrusted)."""
    checks: list[CheckResult] = []
    """The last verdict's results."""
    judge_score: float | None = None
    prompt_versions: dict[str, str] = {}
    """Prompt version per agent role used by the task's model calls."""
    check_usage: TokenUsage = TokenUsage()
    """Model usage of the checker's judge over every verdict."""
    created_at: float = 0.0
    finished_at: float = 0.0
    outbox: list[OutboxItem] = []

    @staticmethod
    def key(tenant: str, task_id: str) -> str:
        return f"{tenant}.{task_id}"

    def total_usage(self) -> TokenUsage:
        total = self.planner_usage + self.check_usage
        for s in self.steps.values():
            total = total + s.usage
        return total


M = TypeVar("M", bound=BaseModel)


async def load(kv: Any, key: str, model: type[M]) -> tuple[M | None, int]:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None, 0
    if entry.value is None:  # deleted or purged
        return None, 0
    return model.model_validate_json(entry.value), entry.revision or 0


class Conflict(Exception):
    """Too many concurrent writers on one key; the message will be retried."""


async def update(
    kv: Any, key: str, model: type[M], mutate: Callable[[M | None], M | None], retries: int = 12
) -> tuple[M | None, bool]:
    """Read-modify-write with compare-and-set. ``mutate`` returns the new value, or None for
    "no change". Returns (value, changed)."""
    for attempt in range(retries):
        current, rev = await load(kv, key, model)
        new = mutate(current.model_copy(deep=True) if current is not None else None)
        if new is None:
            return current, False
        data = new.model_dump_json().encode()
        try:
            if rev == 0:
                await kv.create(key, data)
            else:
                await kv.update(key, data, last=rev)
            return new, True
        except KeyWrongLastSequenceError:
            await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))  # jittered: writers collided
    raise Conflict(f"compare-and-set on {key} lost {retries} times")
