"""The budget service's settings: the common ones and its own (``MESH_BUDGET_*``): reservation
expiry, tenant-day ceilings, how the monitor reads the streams, and the breaker thresholds."""

from __future__ import annotations

import json
from typing import Self

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from mesh_budget import partition
from mesh_budget.monitor import Rules
from mesh_budget.partition import Partition
from mesh_kit.settings import OptionalPath, ServiceSettings


class TenantLimits(BaseModel):
    daily_tokens: int | None = Field(None, gt=0)
    daily_cost_usd: float | None = Field(None, ge=0)


class BudgetSettings(ServiceSettings):
    """Everything the budget service reads. It also needs ``MESH_REDIS_URL_FILE`` (or
    ``MESH_REDIS_URL``): without Redis it refuses to start. Its own fields are named
    ``budget_*`` so that, with the common prefix, each is read from ``MESH_BUDGET_*``; the
    breaker thresholds default to the monitor's ``Rules``."""

    budget_reservation_ttl_s: float = Field(120.0, gt=0)
    """An unsettled reservation is released this long after it was granted (once every usage
    message stored before then has been accounted). Must exceed the longest model call."""
    budget_tenant_limits: str = ""
    """Tenant-day ceilings, JSON ``{"<tenant>" | "*": {"daily_tokens": N, "daily_cost_usd": X}}``;
    ``*`` applies to tenants not listed. Empty: no tenant-day ceilings."""
    budget_tenant_limits_file: OptionalPath = None
    """The same JSON in a file (wins over ``MESH_BUDGET_TENANT_LIMITS``)."""
    budget_horizon_poll_s: float = Field(0.5, gt=0)
    """How often the accounting backlog (the usage durable's ack floor against the USAGE stream)
    is read: a reservation expires only once every usage message stored before its expiry is in."""
    budget_lookback_s: float = Field(900.0, ge=0)
    """On start, the monitor replays this much of the streams to rebuild its view of live tasks."""
    budget_tick_s: float = Field(0.25, gt=0)
    """How often deadlines and stall timeouts are checked."""
    budget_metric_labels: str = "team"
    """Task label keys (``task.submitted`` labels, comma-separated) copied to the spend metrics
    as ``mesh.label.<key>`` attributes. Every label is in the spend records; only these become
    metric attributes (a user id there would make a series per user)."""
    budget_audit_anchor_s: float = Field(60.0, ge=0)
    """How often every tenant's audit chain is anchored: its length and head hash, signed, into KV
    ``anchors`` (``meshctl audit verify`` then sees a cut tail). 0: never."""
    budget_checkpoint_s: float = Field(1.0, gt=0)
    """How often the spend records (KV ``budget``, what ``meshctl budget`` reads) are brought up
    to the usage stream they are folded from (``mesh_budget.accounts``)."""
    budget_watch_poll_s: float = Field(2.0, gt=0)
    """The monitor gets each stored message from the stream's republished feed and reads the
    stream itself only for a gap; after this long without a message it reads anyway (so a fed
    message lost in a reconnect is late by at most this long)."""
    budget_loop_repeats: int = Field(Rules.loop_repeats, ge=2)
    """Loop breaker: the same tool call, re-dispatched step or answer to the checker seen this
    many times in one task cancels it."""
    budget_chatter_window_s: float = Field(Rules.chatter_window_s, gt=0)
    """Chatter breaker: the window inter-agent messages are counted in."""
    budget_chatter_min_messages: int = Field(Rules.chatter_min_messages, ge=2)
    """Chatter breaker: the fewest inter-agent messages in the window that can trip it."""
    budget_chatter_ratio: float = Field(Rules.chatter_ratio, gt=0)
    """Chatter breaker: trips (cancels the task) above this many messages in the window per
    completed step."""
    budget_retry_storm_errors: int = Field(Rules.retry_storm_errors, ge=1)
    """Retry-storm breaker: this many failed calls or steps in the window halt the task."""
    budget_retry_storm_window_s: float = Field(Rules.retry_storm_window_s, gt=0)
    """Retry-storm breaker: its window."""
    budget_provider_window_s: float = Field(Rules.provider_window_s, gt=0)
    """Provider breaker: the window calls to one provider/model are counted in."""
    budget_provider_min_calls: int = Field(Rules.provider_min_calls, ge=1)
    """Provider breaker: calls in the window before it can open."""
    budget_provider_error_rate: float = Field(Rules.provider_error_rate, gt=0, le=1)
    """Provider breaker: the share of failed calls that opens the circuit (reservations for that
    provider/model are denied while it is open)."""
    budget_provider_cooldown_s: float = Field(Rules.provider_cooldown_s, gt=0)
    """Provider breaker: how long the circuit stays open."""
    budget_iteration_cap: int = Field(Rules.iteration_cap, ge=0)
    """Model calls per step attempt before the task is cancelled; 0: each step's own
    ``max_iterations``."""

    budget_task_memory_s: float = Field(300.0, gt=0)
    """What a replica keeps of a task between its messages (start, limits, labels: copies of its
    status record) is forgotten this long after its last use, or when the task ends; the next
    reservation reads the record again. Bounds the replica's memory by the tasks of the last
    few minutes, not the last 20,000."""

    budget_partitions: int = Field(1, ge=1, le=16)
    """Split the monitor's work (breakers, deadlocks, stalls, spend records) by tenant into this
    many partitions; each replica follows one (``mesh_budget.partition``). 1: every replica
    follows everything."""
    budget_partition: int | None = Field(None, ge=0)
    """This replica's partition (0 to ``budget_partitions - 1``); unset with several partitions:
    the ordinal its host name ends in, modulo the partitions (a StatefulSet's pod ``budget-3``
    follows partition 1 of 2: a StatefulSet of twice as many replicas keeps a standby of each)."""

    _tenant_limits: dict[str, TenantLimits] = PrivateAttr(default_factory=dict)
    _partition: Partition = PrivateAttr(default_factory=Partition)

    @model_validator(mode="after")
    def _parse_limits(self) -> Self:
        self._tenant_limits = _tenant_limits(self)
        self._partition = partition.from_settings(self.budget_partitions, self.budget_partition)
        return self

    def partition(self) -> Partition:
        return self._partition

    def metric_labels(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.budget_metric_labels.split(",") if k.strip())

    def rules(self) -> Rules:
        """The monitor's breaker thresholds (``budget_<rule field>``)."""
        return Rules(**{f: getattr(self, f"budget_{f}") for f in Rules.__dataclass_fields__})

    def limits(self) -> dict[str, TenantLimits]:
        """The tenant-day ceilings, by tenant (``*``: any other)."""
        return self._tenant_limits


def _tenant_limits(settings: BudgetSettings) -> dict[str, TenantLimits]:
    file = settings.budget_tenant_limits_file
    try:
        raw = file.read_text() if file else settings.budget_tenant_limits
    except OSError as exc:
        raise ValueError(f"MESH_BUDGET_TENANT_LIMITS_FILE: cannot read {file}: {exc.strerror}") from None
    if not raw.strip():
        return {}
    try:
        items = json.loads(raw).items()
    except (ValueError, AttributeError) as exc:  # not JSON, or not an object
        raise ValueError(f"MESH_BUDGET_TENANT_LIMITS: {exc}") from None
    limits = {}
    for tenant, value in items:
        try:
            limits[tenant] = TenantLimits.model_validate(value)
        except ValidationError as exc:
            why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"MESH_BUDGET_TENANT_LIMITS: {tenant}: {why}") from None
    return limits
