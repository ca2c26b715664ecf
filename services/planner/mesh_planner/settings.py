"""The planner's settings: the common ones and the model-calling ones (``AgentSettings``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from mesh_agent.settings import AgentSettings


class PlannerSettings(AgentSettings):
    """Everything the planner reads. A task's limits and policy come with the task; what a
    tenant may submit (admission) is the planner's."""

    admission_max_in_flight: int = Field(100, ge=0)
    """Tasks of one tenant admitted and not yet ended, at most; a submission over it is refused
    with ``task.rejected`` code ``too_many_in_flight`` and a ``retry_after_s`` (0: no limit)."""
    admission_rate_per_s: float = Field(50.0, ge=0)
    """Submissions per second one tenant may make on average (token bucket; 0: no limit). Over
    it: code ``rate_limited``."""
    admission_burst: int = Field(200, ge=0)
    """How many submissions one tenant may make at once before ``admission_rate_per_s`` applies."""
    run_slots: int = Field(1, ge=0)
    """Tasks the mesh runs at once while several tenants want to run, shared fairly among them
    (run slots, ``mesh_planner.admission``): each is entitled to ``slots // tenants``, at least
    one; an admitted task past them waits, queued, for one. The default, 1, is one task per
    tenant at a time while others run: right when the CPU is the bottleneck (the scripted or a
    local model), where every task in flight slows every other. With models behind a provider
    the mesh waits, not computes: set it to the provider's concurrency (0: every admitted task
    starts at once)."""
    run_slots_alone: int = Field(8, ge=0)
    """How many tasks one tenant may run at once while no other tenant has a task in flight or
    ended one in the last 10 s (0: ``MESH_RUN_SLOTS``, as when others do). A lone tenant keeps
    most of its throughput, and a tenant that arrives meets at most this many of its tasks still
    running."""
    planning_slots: int = Field(0, ge=0)
    """Plans this planner makes at once, shared fairly among tenants (``mesh_planner.planning``);
    an admitted submission past them waits, parked, for its tenant's turn. 0: one fewer than
    ``MESH_MAX_WORKERS`` (at least one), so a handler is always free to take in new submissions."""
    store_high_water: float = Field(0.9, gt=0, le=1)
    """New tasks are refused (code ``overloaded``) while one of the mesh's streams holds this
    share of its cap: the rest is kept for the tasks in flight (1: only when a stream is full)."""
    store_retry_after_s: float = Field(30.0, gt=0)
    """The ``retry_after_s`` of an ``overloaded`` refusal: space comes back as messages age out
    or when an operator raises a cap, so not soon."""
    plan_review: str = ""
    """Tenants whose model-made plans wait for a person before they run (comma-separated; ``*``:
    every tenant): the plan is published as a draft (``plan.drafted``) and runs only once one of
    the tenant's approvers approves it (``meshctl review approve``), as drafted or as they edited
    it; a rejection fails the task with their reason. The wait is not a stall; the task's deadline
    still runs (submit such tasks with a deadline that allows for the review)."""
    plan_fixed: str = ""
    """Tenants that run registered workflows only (comma-separated; ``*``: every tenant): a
    submission that names no workflow (``--workflow``) is refused, so no plan the model makes up
    runs for them (plan governance ``fixed``, per tenant; per workflow it is the workflow's ``mode``)."""
    admission_tenants: dict[str, dict[str, float]] = {}
    """Per-tenant limits over the defaults, as JSON: ``{"acme": {"max_in_flight": 200,
    "rate_per_s": 50, "burst": 100}}``."""

    @field_validator("admission_tenants")
    @classmethod
    def _known_limits(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for tenant, values in v.items():
            unknown = set(values) - {"max_in_flight", "rate_per_s", "burst"}
            if unknown:
                raise ValueError(f"tenant {tenant}: unknown limit(s) {', '.join(sorted(unknown))}")
            if any(x < 0 for x in values.values()):
                raise ValueError(f"tenant {tenant}: limits must be >= 0")
        return v
