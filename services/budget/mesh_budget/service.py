"""Budget service: grants or denies reservations before model calls and accounts every call.

Spend is derived from the ``usage.recorded`` stream only (deduplicated by call id), so it
is the same whatever service or replica made the call. Reservations are held in Redis so
every budget replica sees the same outstanding total.
"""

from __future__ import annotations

import logging
from typing import Any

from mesh_budget.ledger import DayUsage, Reservations, TaskUsage, today
from mesh_contracts.v1 import BudgetDenied, BudgetGranted, BudgetReserve, TokenUsage, UsageRecorded
from mesh_kit import Delivery, Mesh
from mesh_kit import state as st
from mesh_kit.state import TaskRecord

log = logging.getLogger("mesh.budget")


class Budget:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.reservations = Reservations(mesh.settings.redis_url)
        self.kv: Any = None
        self.tasks: Any = None

    async def start(self) -> None:
        self.kv = await self.mesh.kv("budget")
        self.tasks = await self.mesh.kv("tasks")
        if not self.mesh.settings.redis_url:
            log.warning("MESH_REDIS_URL unset: reservations are held in memory (not shared by replicas)")

    def register(self) -> None:
        self.mesh.on_start(self.start)
        self.mesh.on_stop(self.reservations.close)
        self.mesh.serve(BudgetReserve, self.on_reserve)
        self.mesh.consume(UsageRecorded, self.on_usage)

    async def on_reserve(self, m: BudgetReserve, d: Delivery) -> BudgetGranted | BudgetDenied:
        base = {"tenant": m.tenant, "task_id": m.task_id}
        rec, _ = await st.load(self.tasks, TaskRecord.key(m.tenant, m.task_id), TaskRecord)
        if rec is None:
            return BudgetDenied(**base, reason="unknown task: no task record")
        if rec.status in st.TERMINAL or rec.status == "halted":
            return BudgetDenied(**base, reason=f"task is {rec.status}")
        usage, _ = await st.load(self.kv, TaskUsage.key(m.tenant, m.task_id), TaskUsage)
        spent = usage.total.total_tokens if usage else 0
        ok, remaining = await self.reservations.reserve(
            m.tenant, m.task_id, m.call_id, m.tokens, rec.limits.max_tokens, spent
        )
        if not ok:
            return BudgetDenied(
                **base,
                reason=f"task token ceiling {rec.limits.max_tokens} would be exceeded: "
                f"{spent} spent, {m.tokens} requested, {remaining} available",
            )
        return BudgetGranted(
            **base, reservation_id=m.call_id, remaining_tokens=remaining, expires_in_s=self.reservations.ttl_s
        )

    async def on_usage(self, m: UsageRecorded, d: Delivery) -> None:
        call = TokenUsage(input_tokens=m.input_tokens, output_tokens=m.output_tokens, cost_usd=m.cost_usd, calls=1)

        def add(cur: TaskUsage | None) -> TaskUsage | None:
            cur = cur or TaskUsage(tenant=m.tenant, task_id=m.task_id)
            if m.call_id in cur.call_ids:
                return None  # the same call recorded twice is counted once
            cur.call_ids.append(m.call_id)
            cur.total = cur.total + call
            cur.by_agent[m.agent] = cur.by_agent.get(m.agent, TokenUsage()) + call
            return cur

        _, changed = await st.update(self.kv, TaskUsage.key(m.tenant, m.task_id), TaskUsage, add)
        if changed:
            day = today()
            await st.update(
                self.kv,
                DayUsage.key(m.tenant, day),
                DayUsage,
                lambda cur: (cur or DayUsage(tenant=m.tenant, day=day)).model_copy(
                    update={"total": (cur.total if cur else TokenUsage()) + call}
                ),
            )
        await self.reservations.settle(m.tenant, m.task_id, m.reservation_id or m.call_id)


async def build(mesh: Mesh) -> Budget:
    svc = Budget(mesh)
    svc.register()
    return svc
