"""Usage accounting and cost reservations.

Every model call is preceded by a reservation (request/reply to the budget service) for
its worst-case cost and followed by a ``usage.recorded`` event that settles it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from mesh_contracts.base import ADMIN, CLIENT, ID_PATTERN, Contract, ContractSpec

_EX = {"tenant": "acme", "task_id": "t-7f3a"}
LLM_CALLERS = ("planner", "worker", "checker")


class UsageRecorded(Contract):
    """Tokens and cost of one model call, as billed."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "usage.recorded",
                    "agent": "worker",
                    "step_id": "s2",
                    "call_id": "s2-i1",
                    "provider": "scripted",
                    "model": "scripted-1",
                    "input_tokens": 61,
                    "output_tokens": 9,
                    "cost_usd": 0.0,
                    "reservation_id": "r-s2-i1",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "usage",
        "recorded",
        producers=LLM_CALLERS,
        consumers=("budget", CLIENT),
        summary="One model call's usage (the tenant's client follows its own tasks' calls live).",
    )

    type: Literal["usage.recorded"] = "usage.recorded"
    agent: str
    """Service that made the call."""
    role: str = ""
    """Agent role within the service (e.g. ``planner``, ``judge``)."""
    step_id: str = ""
    call_id: str = Field(pattern=ID_PATTERN)
    """Deterministic call id: the same call recorded twice is counted once."""
    provider: str
    model: str
    """The configured model id the call was reserved and priced for (never the provider's echo)."""
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    cost_usd: float = Field(0.0, ge=0)
    price_table: str = "v1"
    """Version of the price table the cost was computed with."""
    reservation_id: str = ""
    """Reservation this usage settles."""
    cached_input_tokens: int = Field(0, ge=0)
    """Part of ``input_tokens`` read from the provider's prompt cache."""
    error: str = ""
    """Set when the call failed (provider error, timeout): the attempt is accounted, with
    whatever tokens the provider billed, and counts toward the provider's error rate."""
    prompt_version: str = ""
    """Version of the prompt the call was made with (``<prompt id>@<version>+<digest>``)."""
    handed_on: bool = False
    """The failed attempt was retried, or the call handed to the next model of its fallback
    chain: it counts toward the provider's error rate, but not toward the task's retry storm
    (only a failure that reaches the task does)."""
    response_model: str = ""
    """The model id the provider reported, when it differs from ``model`` (providers answer a
    pinned alias with a dated snapshot): recorded beside the configured id, never priced."""


class BudgetReserve(Contract):
    """Request (core NATS request/reply): reserve the worst-case cost of a model call."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EX,
                    "type": "budget.reserve",
                    "agent": "worker",
                    "call_id": "s2-i1",
                    "tokens": 1061,
                    "cost_usd": 0.0,
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "budget",
        "reserve",
        producers=LLM_CALLERS,
        consumers=("budget",),
        transport="request",
        summary="Reserve before a model call.",
    )

    type: Literal["budget.reserve"] = "budget.reserve"
    agent: str
    step_id: str = ""
    call_id: str = Field(pattern=ID_PATTERN)
    tokens: int = Field(ge=0)
    """Worst case: prompt tokens + max_tokens."""
    cost_usd: float = Field(0.0, ge=0)
    """Worst-case cost of ``tokens`` under the current price table."""
    provider: str = ""
    """Provider the call will go to (the budget keeps a circuit breaker per provider/model)."""
    model: str = ""


class BudgetGranted(Contract):
    """Reply: the reservation is held; the call may proceed."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{**_EX, "type": "budget.granted", "reservation_id": "r-s2-i1", "remaining_tokens": 48000}]
        }
    )
    spec: ClassVar = ContractSpec(
        "budget",
        "granted",
        producers=("budget",),
        consumers=LLM_CALLERS,
        transport="reply",
        summary="Reservation held.",
    )

    type: Literal["budget.granted"] = "budget.granted"
    reservation_id: str
    remaining_tokens: int
    """Tokens left under the task ceiling after this reservation."""
    remaining_cost_usd: float = 0.0
    expires_in_s: float = 120.0
    """An unsettled reservation is released after this long."""


class BudgetDenied(Contract):
    """Reply: the call must not be made."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {**_EX, "type": "budget.denied", "reason": "task token ceiling 50000 would be exceeded (49100 + 1061)"}
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "budget",
        "denied",
        producers=("budget",),
        consumers=LLM_CALLERS,
        transport="reply",
        summary="Reservation refused, with the reason.",
    )

    type: Literal["budget.denied"] = "budget.denied"
    reason: str
    code: str = ""
    """Machine-readable cause: ``task_tokens``, ``task_cost``, ``tenant_daily_tokens``,
    ``tenant_daily_cost``, ``deadline``, ``stopped`` (halted, cancelled, finished, kill switch),
    ``breaker``, ``provider_breaker``, ``unknown_task``."""


class BudgetStatusRequested(Contract):
    """Request (core NATS request/reply, an operator's): what the budget service sees now, per
    tenant (``meshctl top``, ``meshctl status``). Any replica answers: each follows every task.
    ``tenant`` is ``_mesh`` and ``task_id`` is ``status``: it is about no task."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"tenant": "_mesh", "task_id": "status",
                                                               "type": "budget.status"}]})  # fmt: skip
    spec: ClassVar = ContractSpec(
        "budget",
        "status",
        producers=(ADMIN,),
        consumers=("budget",),
        transport="request",
        summary="An operator asks what the budget sees.",
    )

    type: Literal["budget.status"] = "budget.status"


class TenantTasks(BaseModel):
    """One tenant's tasks not ended, as a budget replica follows them."""

    running: int = 0
    """Tasks with some work taken up."""
    queued: int = 0
    """Tasks whose outstanding work all waits in a queue (queue time, not a stall)."""
    queued_s: float = 0.0
    """Queue time of those tasks so far, open spells included."""


class BudgetStatusReport(Contract):
    """Reply to ``budget.status``: the answering replica's view."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"tenant": "_mesh", "task_id": "status", "type": "budget.report", "replica": "budget-7f9c",
                 "started_at": 1795500000.0, "tenants": {"acme": {"running": 2, "queued": 1, "queued_s": 0.4}},
                 "trips": {"loop": 1}, "detected_after_s": {"loop": 0.12}}
            ]
        }
    )  # fmt: skip
    spec: ClassVar = ContractSpec(
        "budget",
        "report",
        producers=("budget",),
        consumers=(ADMIN,),
        transport="reply",
        summary="What the budget sees.",
    )

    type: Literal["budget.report"] = "budget.report"
    replica: str = ""
    """Which replica answered (its host name)."""
    started_at: float = 0.0
    tenants: dict[str, TenantTasks] = {}
    trips: dict[str, int] = {}
    """Breakers tripped and acted on by this replica since it started, by kind (``loop``,
    ``deadlock``, ``stall``, ...); every replica reaches the same trips, one acts."""
    detected_after_s: dict[str, float] = {}
    """Per kind, the median time from cause to action of those trips."""
    partition: int = Field(0, ge=0)
    partitions: int = Field(1, ge=1)
    """Which of how many partitions of the tenants the replica follows (``MESH_BUDGET_PARTITIONS``):
    with several, each replica answers and the asker adds the partitions' reports up."""
