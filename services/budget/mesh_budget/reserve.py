"""What deciding a reservation needs beside the Redis script (``mesh_budget.ledger``): the task's
status record, read at its first reservation; the view rebuilt from the record of spend when the
script finds it cold; and the reason a ceiling denial gives.

``Budget.on_reserve`` puts them together, in the order a call is refused: an unknown or stopped
task, a passed deadline, a tripped breaker, then (in one atomic script) an open provider
circuit and the ceilings.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from typing import Any, NamedTuple

import nats.errors

from mesh_budget.accounts import add_call, add_to_day, read_usage
from mesh_budget.ledger import Cold, DayUsage, Decision, Durable, Held, TaskUsage, View, today
from mesh_contracts.v1 import BudgetReserve, TaskLimits
from mesh_contracts.v1.records import StatusRecord, TaskRecord
from mesh_durable import records
from mesh_host import Mesh
from mesh_identity import CLOCK_LEEWAY_S
from mesh_kit import state as st

log = logging.getLogger("mesh.budget")
UNKNOWN_REREADS_S = (0.0, 0.2, 0.5, 1.0)
"""Waits between the leader reads of a task's status record before its first reservation calls
it unknown (1.7 s in all): a read that failed while the bucket's stream elected a leader."""

Limits = tuple[int, float, int, float]
"""Task tokens, task cost, tenant-day tokens, tenant-day cost (-1: none), as the script takes them."""
Step = tuple[str, int, float]
"""A workflow node's own ceilings (step id, tokens, cost; ``("", -1, -1.0)``: none)."""


class TaskFacts(NamedTuple):
    """What a task's reservations are judged by that never changes once its status record exists."""

    created_at: float
    limits: TaskLimits
    shares: dict[str, float]
    """A workflow node's budget share, by step id."""


async def read_status(nc: Any, status: Any, tenant: str, task_id: str) -> StatusRecord | None:
    """The task's status record (KV ``status``) as the planner wrote it when the task started. A
    direct get first (any replica answers); if that has no record with limits, the stream's leader,
    which holds every write acknowledged so far, the planner's included: it wrote the record before
    the model call whose reservation asks. A replica that just rejoined its cluster answers a
    direct get without it for as long as it takes to catch up; the cluster chaos test lost a
    task to that ('unknown task') in two loaded runs, the second time past 3 s of re-reads."""
    rec = await records.task_status(status, tenant, task_id)
    if rec is not None and rec.limits is not None:
        return rec
    key = TaskRecord.key(tenant, task_id)  # (the status record's key is the task record's)
    for wait in UNKNOWN_REREADS_S:
        if wait:
            await asyncio.sleep(wait)
        try:
            rec = await st.from_leader(nc, StatusRecord.bucket, key, StatusRecord)
        except (nats.errors.Error, TimeoutError) as exc:  # no leader for a moment: ask again
            log.info("status record %s: leader read failed (%s); again", key, exc)
            continue
        if rec is not None and rec.limits is not None:
            return rec
    return rec


async def rebuild(
    mesh: Mesh, kv: Any, durable: Durable, view: View, cold: Cold, tenant: str, task_id: str, day: str, *,
    horizon: float, ttl_s: float,
) -> None:  # fmt: skip
    """Initialise the missing Redis view (a new day, a task from before this view began, a
    Redis that lost its data) from the usage stream, which is the record of spend: each
    record's checkpoint (KV ``budget``) and the messages after it, and from the reservations
    bucket's outstanding calls (those whose usage is not in the stream). ``horizon``: the
    service's (``mesh_budget.horizon``); ``ttl_s``: how long a reservation holds."""
    nc, verifier = mesh.nc, mesh.verifier
    # A hold counts until its expiry is behind the horizon: only those granted since
    # ``horizon - ttl`` can (the leeway covers clocks; no horizon yet: all of them).
    since = horizon - ttl_s - CLOCK_LEEWAY_S if horizon else 0.0
    task_usage: TaskUsage | None = None
    task_held: list[Held] = []
    if cold.task:
        task_usage, _ = await st.load(kv, TaskUsage.key(tenant, task_id), TaskUsage)
        task_usage = task_usage or TaskUsage(tenant=tenant, task_id=task_id)
        subject = f"usage.*.{tenant}.{task_id}.*"
        for seq, _, m in await read_usage(nc, verifier, subject, seq=task_usage.through + 1):
            if m.call_id not in task_usage.call_seqs and m.call_id not in task_usage.call_ids:
                add_call(task_usage, m, seq, task_usage.labels)
        held = await durable.granted_since(nc, since, tenant, task_id)
        task_held = [h for h in held if h.expires_at >= horizon]  # init leaves out the settled ones
    day_usage, _ = await st.load(kv, DayUsage.key(tenant, day), DayUsage)
    day_usage = day_usage or DayUsage(tenant=tenant, day=day)
    day_held: list[Held] = []
    if cold.day:
        # The day's checkpoint and the tenant's usage after it (from the day's start if none).
        tenant_usage = f"usage.*.{tenant}.*.*"
        after = (
            {"seq": day_usage.through + 1}
            if day_usage.through
            else {"since": float(calendar.timegm(time.strptime(day, "%Y%m%d")))}
        )
        seen: set[tuple[str, str]] = set()
        for seq, stored_at, m in await read_usage(nc, verifier, tenant_usage, **after):
            if seq > day_usage.through and today(stored_at) == day and (m.task_id, m.call_id) not in seen:
                seen.add((m.task_id, m.call_id))
                add_to_day(day_usage, m, {}, False)
        held = await durable.granted_since(nc, since, tenant)
        held = [h for h in held if h.expires_at >= horizon and h.day == day]
        if held:  # settled: its usage is in the stream, stored since the oldest was granted
            oldest = min(h.expires_at for h in held) - ttl_s - CLOCK_LEEWAY_S
            settled = {
                x for _, _, m in await read_usage(nc, verifier, tenant_usage, since=oldest)
                for x in (m.call_id, m.reservation_id) if x
            }  # fmt: skip
            held = [h for h in held if h.call_id not in settled]
        day_held = held
    await view.init(task_usage, day_usage, tenant, task_id, task_held, day_held)
    if task_held or day_held:
        mesh.count("mesh.budget.reservations_rebuilt")
        log.info("%s/%s: view rebuilt with %d task and %d tenant-day reservations held", tenant, task_id,
                 len(task_held), len(day_held))  # fmt: skip


CEILINGS = ("task_tokens", "task_cost", "tenant_daily_tokens", "tenant_daily_cost", "step_tokens", "step_cost")
"""Denial codes that are a ceiling reached: a trip (``kind=ceiling``) and an audit record."""
DENIAL = {
    "task_tokens": "task token ceiling {lim_t} would be exceeded: {want_t} requested, {rem_t} available",
    "task_cost": "task cost ceiling ${lim_c:.4f} would be exceeded: ${want_c:.6f} requested, ${rem_c:.6f} available",
    "tenant_daily_tokens": "tenant {tenant} daily token ceiling {dlim_t} would be exceeded: {want_t} requested, "
    "{drem_t} available today",
    "tenant_daily_cost": "tenant {tenant} daily cost ceiling ${dlim_c:.4f} would be exceeded: ${want_c:.6f} "
    "requested, ${drem_c:.6f} available today",
    "step_tokens": "step {step}'s budget share ({share:.0%} of the task's tokens: {slim_t}) would be exceeded: "
    "{want_t} requested, {rem_t} available",
    "step_cost": "step {step}'s budget share ({share:.0%} of the task's cost: ${slim_c:.4f}) would be exceeded: "
    "${want_c:.6f} requested, ${rem_c:.6f} available",
}


def denial(m: BudgetReserve, decision: Decision, limits: Limits, share: float | None, step: Step) -> str:
    """The reason the script's refusal gives (``DENIAL``, by its code): the ceiling, what was
    asked and what is left."""
    return DENIAL[decision.code].format(
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
        step=m.step_id,
        share=share or 0.0,
        slim_t=step[1],
        slim_c=step[2],
    )
