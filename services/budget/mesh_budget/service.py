"""Budget service: grants or denies reservations before model calls and accounts every call.

Spend is derived from the ``usage.recorded`` stream only (deduplicated by call id), so it
is the same whatever service or replica made the call. Reservation decisions run as one
atomic Redis script over spent + outstanding, so replicas never together overspend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mesh_budget.ledger import Cold, DayUsage, TaskUsage, View, today
from mesh_contracts import topology as topo
from mesh_contracts.v1 import BudgetDenied, BudgetGranted, BudgetReserve, TokenUsage, UsageRecorded
from mesh_kit import Delivery, Mesh
from mesh_kit import state as st
from mesh_kit import telemetry as tel
from mesh_kit.state import TaskRecord

log = logging.getLogger("mesh.budget")
USAGE_DURABLE = "budget--usage-recorded"


class TenantLimits(BaseModel):
    daily_tokens: int | None = Field(None, gt=0)
    daily_cost_usd: float | None = Field(None, ge=0)


class BudgetSettings(BaseSettings):
    """Budget-specific settings (``MESH_BUDGET_*``)."""

    model_config = SettingsConfigDict(env_prefix="MESH_BUDGET_", extra="ignore")

    reservation_ttl_s: float = Field(120.0, gt=0)
    """An unsettled reservation is released this long after it was granted (once every usage
    message stored before then has been accounted). Must exceed the longest model call."""
    tenant_limits: str = ""
    """JSON ``{"<tenant>" | "*": {"daily_tokens": N, "daily_cost_usd": X}}``; ``*`` applies to
    tenants not listed. Empty: no tenant-day ceilings."""
    tenant_limits_file: Path | None = None
    """The same JSON in a file (wins over ``tenant_limits``)."""
    horizon_poll_s: float = Field(0.5, gt=0)

    def limits(self) -> dict[str, TenantLimits]:
        raw = self.tenant_limits_file.read_text() if self.tenant_limits_file else self.tenant_limits
        if not raw.strip():
            return {}
        try:
            return {k: TenantLimits.model_validate(v) for k, v in json.loads(raw).items()}
        except (ValueError, AttributeError) as exc:
            raise SystemExit(f"configuration error: MESH_BUDGET_TENANT_LIMITS: {exc}") from None


DENIAL = {
    "task_tokens": "task token ceiling {lim_t} would be exceeded: {want_t} requested, {rem_t} available",
    "task_cost": "task cost ceiling ${lim_c:.4f} would be exceeded: ${want_c:.6f} requested, ${rem_c:.6f} available",
    "tenant_daily_tokens": "tenant {tenant} daily token ceiling {dlim_t} would be exceeded: {want_t} requested, "
    "{drem_t} available today",
    "tenant_daily_cost": "tenant {tenant} daily cost ceiling ${dlim_c:.4f} would be exceeded: ${want_c:.6f} "
    "requested, ${drem_c:.6f} available today",
}


class Budget:
    def __init__(self, mesh: Mesh, settings: BudgetSettings | None = None) -> None:
        self.mesh = mesh
        self.settings = settings or BudgetSettings()
        self.tenant_limits = self.settings.limits()
        if not mesh.settings.redis_url:
            raise SystemExit(
                "configuration error: the budget service needs MESH_REDIS_URL (or MESH_REDIS_URL_FILE): "
                "its reservations must be shared by every replica"
            )
        self.view = View(mesh.settings.redis_url, self.settings.reservation_ttl_s)
        self.kv: Any = None
        self.tasks: Any = None
        self.horizon = 0.0  # nothing expires until the first look at the accounting backlog
        self._samples: list[tuple[float, int]] = []
        self._poller: asyncio.Task[None] | None = None
        meter = mesh.telemetry.meter_provider.get_meter("mesh_budget")
        self.m_tokens = meter.create_counter(tel.M_BUDGET_TOKENS, unit="{token}")
        self.m_cost = meter.create_counter(tel.M_BUDGET_COST, unit="USD")
        self.m_calls = meter.create_counter(tel.M_BUDGET_CALLS, unit="{call}")
        self.m_reservations = meter.create_counter(tel.M_BUDGET_RESERVATIONS, unit="{reservation}")

    async def start(self) -> None:
        self.kv = await self.mesh.kv("budget")
        self.tasks = await self.mesh.kv("tasks")
        self._poller = asyncio.create_task(self._poll_horizon())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.view.close()

    def register(self) -> None:
        self.mesh.enable_guard()
        self.mesh.on_start(self.start)
        self.mesh.on_stop(self.stop)
        self.mesh.serve(BudgetReserve, self.on_reserve)
        self.mesh.consume(UsageRecorded, self.on_usage)

    # --- the expiry horizon -------------------------------------------------------------------

    async def _poll_horizon(self) -> None:
        """Keep ``horizon``: a time before which every stored usage message has been accounted.

        Each poll notes (time, last stored usage sequence). Once the consumer's ack floor has
        passed that sequence, everything stored before that time is counted, so reservations
        that expired before it and are still unsettled were abandoned. With no backlog at all
        the horizon is the poll time itself."""
        js = self.mesh.nc.jetstream()
        while True:
            sent = time.time()
            try:
                stream = await js.stream_info(topo.STREAMS["usage"], subjects_filter=None)
                info = await js.consumer_info(topo.STREAMS["usage"], USAGE_DURABLE, timeout=2.0)
            except Exception as exc:  # noqa: BLE001 - broker away: the horizon just stands still
                log.debug("horizon poll failed: %s", exc)
            else:
                if not info.num_pending and not info.num_ack_pending:
                    self.horizon, self._samples = sent, []
                else:
                    self._samples.append((sent, stream.state.last_seq))
                    floor = info.ack_floor.stream_seq if info.ack_floor else 0
                    passed = [t for t, seq in self._samples if seq <= (floor or 0)]
                    if passed:
                        self.horizon = max(self.horizon, max(passed))
                        self._samples = [(t, s) for t, s in self._samples if t > self.horizon]
                    self._samples = self._samples[-600:]
            await asyncio.sleep(self.settings.horizon_poll_s)

    # --- reserve ------------------------------------------------------------------------------

    def _tenant_limits(self, tenant: str) -> TenantLimits:
        return self.tenant_limits.get(tenant) or self.tenant_limits.get("*") or TenantLimits()

    async def on_reserve(self, m: BudgetReserve, d: Delivery) -> BudgetGranted | BudgetDenied:
        base = {"tenant": m.tenant, "task_id": m.task_id}

        def deny(code: str, reason: str) -> BudgetDenied:
            self.m_reservations.add(1, {"tenant": m.tenant, "outcome": "denied", "code": code})
            return BudgetDenied(**base, reason=reason, code=code)

        rec, _ = await st.load(self.tasks, TaskRecord.key(m.tenant, m.task_id), TaskRecord)
        if rec is None:
            return deny("unknown_task", "unknown task: no task record")
        if rec.status in st.TERMINAL or rec.status == "halted":
            return deny("stopped", f"task is {rec.status}" + (f": {rec.reason}" if rec.reason else ""))
        assert self.mesh.guard is not None
        stop = await self.mesh.guard.kill_switch(m.tenant)
        if stop is not None:
            return deny("stopped", stop.reason)
        if rec.created_at and time.time() > rec.created_at + rec.limits.deadline_s:
            return deny("deadline", f"task deadline of {rec.limits.deadline_s:g} s has passed")
        tl = self._tenant_limits(m.tenant)
        day = today()
        limits = (
            rec.limits.max_tokens,
            rec.limits.max_cost_usd,
            tl.daily_tokens if tl.daily_tokens is not None else -1,
            tl.daily_cost_usd if tl.daily_cost_usd is not None else -1.0,
        )
        args = (m.tenant, m.task_id, day, m.call_id, m.tokens, m.cost_usd, limits, self.horizon)
        try:
            decision = await self.view.reserve(*args)
        except Cold:
            task_usage, _ = await st.load(self.kv, TaskUsage.key(m.tenant, m.task_id), TaskUsage)
            day_usage, _ = await st.load(self.kv, DayUsage.key(m.tenant, day), DayUsage)
            await self.view.init(task_usage, day_usage or DayUsage(tenant=m.tenant, day=day), m.tenant, m.task_id)
            decision = await self.view.reserve(*args)
        if not decision.granted:
            text = DENIAL[decision.code].format(
                tenant=m.tenant,
                lim_t=limits[0],
                lim_c=limits[1],
                dlim_t=limits[2],
                dlim_c=limits[3],
                want_t=m.tokens,
                want_c=m.cost_usd,
                rem_t=decision.remaining_tokens,
                rem_c=decision.remaining_cost_usd,
                drem_t=decision.day_remaining_tokens,
                drem_c=decision.day_remaining_cost_usd,
            )
            return deny(decision.code, text)
        self.m_reservations.add(1, {"tenant": m.tenant, "outcome": "granted", "code": ""})
        return BudgetGranted(
            **base,
            reservation_id=m.call_id,
            remaining_tokens=decision.remaining_tokens,
            remaining_cost_usd=decision.remaining_cost_usd,
            expires_in_s=self.settings.reservation_ttl_s,
        )

    # --- account ------------------------------------------------------------------------------

    async def on_usage(self, m: UsageRecorded, d: Delivery) -> None:
        call = TokenUsage(
            input_tokens=m.input_tokens,
            output_tokens=m.output_tokens,
            cached_input_tokens=m.cached_input_tokens,
            cost_usd=m.cost_usd,
            calls=1,
        )
        agent = f"{m.agent}/{m.role or m.agent}"
        model = f"{m.provider}/{m.model}"
        first = [False]

        def add(cur: TaskUsage | None) -> TaskUsage | None:
            if cur is None:
                first[0] = True
                cur = TaskUsage(tenant=m.tenant, task_id=m.task_id)
            if m.call_id in cur.call_ids:
                return None  # the same call recorded twice is counted once
            cur.call_ids.append(m.call_id)
            cur.total = cur.total + call
            cur.by_agent[agent] = cur.by_agent.get(agent, TokenUsage()) + call
            cur.by_step[m.step_id or "-"] = cur.by_step.get(m.step_id or "-", TokenUsage()) + call
            cur.by_model[model] = cur.by_model.get(model, TokenUsage()) + call
            cur.errors += 1 if m.error else 0
            cur.updated_at = time.time()
            return cur

        task_usage, changed = await st.update(self.kv, TaskUsage.key(m.tenant, m.task_id), TaskUsage, add)
        day = today(d.stored_at or None)
        if changed:

            def add_day(cur: DayUsage | None) -> DayUsage | None:
                cur = cur or DayUsage(tenant=m.tenant, day=day)
                cur.total = cur.total + call
                cur.by_agent[agent] = cur.by_agent.get(agent, TokenUsage()) + call
                cur.by_model[model] = cur.by_model.get(model, TokenUsage()) + call
                cur.tasks += 1 if first[0] else 0
                return cur

            await st.update(self.kv, DayUsage.key(m.tenant, day), DayUsage, add_day)
            attrs = {
                "tenant": m.tenant,
                "agent": agent,
                "gen_ai.provider.name": m.provider,
                "gen_ai.request.model": m.model,
            }
            for kind, n in (("input", m.input_tokens - m.cached_input_tokens), ("cached_input", m.cached_input_tokens),
                            ("output", m.output_tokens)):  # fmt: skip
                if n:
                    self.m_tokens.add(n, {**attrs, "token.type": kind})
            if m.cost_usd:
                self.m_cost.add(m.cost_usd, attrs)
            self.m_calls.add(1, {**attrs, "outcome": "error" if m.error else "ok"})
        await self.view.settle(
            m.tenant, m.task_id, today(), m.reservation_id or m.call_id, m.call_id, call.total_tokens, call.cost_usd
        )
        if changed and task_usage is not None:
            t = task_usage.total
            await self.mesh.progress(
                m.tenant,
                m.task_id,
                "budget.usage",
                f"{agent} {model}: {call.total_tokens} tokens, ${call.cost_usd:.6f}"
                + (f" (failed: {m.error[:80]})" if m.error else "")
                + f"; task total {t.total_tokens} tokens, ${t.cost_usd:.6f}",
                step_id=m.step_id,
                key=m.call_id,
                detail={"call": call.model_dump(mode="json"), "task_total": t.model_dump(mode="json"), "agent": agent,
                        "model": model},
            )  # fmt: skip


async def build(mesh: Mesh) -> Budget:
    svc = Budget(mesh)
    svc.register()
    return svc
