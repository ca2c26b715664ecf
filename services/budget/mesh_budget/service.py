"""Budget service: grants or denies reservations before model calls and accounts every call.

Spend is derived from the ``usage.recorded`` stream only (deduplicated by call id), so it
is the same whatever service or replica made the call. Reservation decisions run as one
atomic Redis script over spent + outstanding, so replicas never together overspend.

Here are the handlers; beside them: what a reservation is decided on (``reserve.py``, the Redis
view itself in ``ledger.py``), the expiry horizon (``horizon.py``), the streams followed for the
monitor and its trips acted on (``watch.py``, the rules in ``monitor.py``), the spend records
(``accounts.py``) and the audit chains' anchors (``anchors.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import statistics
import time
from typing import Any, Literal

from opentelemetry.metrics import Observation

from mesh_budget import metrics as budget_metrics
from mesh_budget.accounts import Accounts
from mesh_budget.anchors import Anchors
from mesh_budget.horizon import Horizon
from mesh_budget.ledger import Cold, Decision, Durable, Held, Outcome, Settled, View, today
from mesh_budget.monitor import Monitor, Trip
from mesh_budget.recent import Recent
from mesh_budget.reserve import CEILINGS, Limits, Step, TaskFacts, denial, read_status, rebuild
from mesh_budget.settings import BudgetSettings, TenantLimits
from mesh_budget.watch import Watch
from mesh_contracts import topology as topo
from mesh_contracts.v1 import (
    BudgetDenied,
    BudgetGranted,
    BudgetReserve,
    BudgetStatusReport,
    BudgetStatusRequested,
    TenantTasks,
    UsageRecorded,
)
from mesh_contracts.v1.records import TERMINAL, StatusRecord
from mesh_durable import chain, guard, records, redis
from mesh_durable.redis import redis_errors
from mesh_durable.tail import Reader
from mesh_host import Mesh
from mesh_kit import Delivery, tasks
from mesh_tenancy import tenancy

log = logging.getLogger("mesh.budget")


class Budget:
    def __init__(self, mesh: Mesh, settings: BudgetSettings | None = None) -> None:
        self.mesh = mesh
        self.audit = chain.of(mesh)
        self.guard: guard.Guard | None = None  # enabled by register()
        self.settings = settings if settings is not None else BudgetSettings.defaults()
        self.tenant_limits = self.settings.limits()
        if not mesh.settings.redis_url:
            raise SystemExit(
                "configuration error: the budget service needs MESH_REDIS_URL (or MESH_REDIS_URL_FILE): "
                "its reservations must be shared by every replica"
            )
        self.view = View(
            mesh.settings.redis_url, self.settings.budget_reservation_ttl_s, self.settings.rules().provider_policy()
        )
        idle_s = self.settings.budget_task_memory_s
        self._provider_reported: Recent[bool] = Recent(idle_s)
        """Tasks told of a failing provider already (once per task, as every other trip)."""
        self.redis = mesh.depend(
            redis.dependency(self.view.redis, required=True, purpose="reservations shared by every replica")
        )
        self.kv: Any = None
        self.status: Any = None
        """KV ``status``: what the budget knows of a task (start, limits, labels; no content)."""
        self.durable: Durable | None = None
        self.horizon = Horizon(mesh, self.settings.budget_horizon_poll_s)
        self.monitor = Monitor(self.settings.rules())
        self.partition = self.settings.partition()
        """The tenants this replica follows (all of them with one partition: ``mesh_budget.partition``)."""
        self._label_cache: Recent[dict[str, str]] = Recent(idle_s)
        every_s = self.settings.budget_audit_anchor_s
        self.anchors = Anchors(mesh, every_s) if every_s > 0 else None
        self._facts: Recent[TaskFacts] = Recent(idle_s)
        """A task's creation time and limits (never change once its status record exists), read
        from that record at its first reservation: the next ones ask the guard's followed views
        whether it may go on instead of reading the record again (``mesh_budget.recent``: kept
        while they save reads, forgotten when the task ends)."""
        self._background: set[asyncio.Task[None]] = set()
        self.accounts: Accounts | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        meter = mesh.telemetry.meter_provider.get_meter("mesh_budget")
        self.m_tokens = meter.create_counter(budget_metrics.M_BUDGET_TOKENS, unit="{token}")
        self.m_cost = meter.create_counter(budget_metrics.M_BUDGET_COST, unit="USD")
        self.m_calls = meter.create_counter(budget_metrics.M_BUDGET_CALLS, unit="{call}")
        self.m_reservations = meter.create_counter(budget_metrics.M_BUDGET_RESERVATIONS, unit="{reservation}")
        self.m_trips = meter.create_counter(budget_metrics.M_BUDGET_TRIPS, unit="{trip}")
        self.watch = Watch(
            mesh,
            self.settings,
            self.monitor,
            self.partition,
            self.m_trips,
            lambda: self.accounts,
            lambda: self.status,
            ended=self._ended,
        )
        # Tasks not ended, per tenant: running or queued (every replica follows every task, so
        # each reports the same numbers: take the max across replicas, not the sum).
        mesh.report("tenants", lambda: self.monitor.per_tenant(time.time()))
        meter.create_observable_gauge(
            budget_metrics.M_TASKS_QUEUED, [lambda _opts: self._gauge("queued")], unit="{task}",
            description="Tasks whose outstanding work all waits to be taken up, per tenant (max over replicas)",
        )  # fmt: skip
        meter.create_observable_gauge(
            budget_metrics.M_TASKS_RUNNING, [lambda _opts: self._gauge("running")], unit="{task}",
            description="Tasks with work taken up and not ended, per tenant (max over replicas)",
        )  # fmt: skip

    def _gauge(self, what: Literal["running", "queued"]) -> list[Observation]:
        return [Observation(v[what], {"tenant": t}) for t, v in self.monitor.per_tenant(time.time()).items()]

    def register(self) -> None:
        self.guard = guard.enable(self.mesh)
        self.mesh.on_start(self.start)
        self.mesh.on_stop(self.stop_following, connected=True)
        self.mesh.on_stop(self.stop)
        self.mesh.serve(BudgetReserve, self.on_reserve)
        self.mesh.serve(BudgetStatusRequested, self.on_status, every_replica=True)
        self.mesh.consume(UsageRecorded, self.on_usage)

    async def start(self) -> None:
        self.kv = await self.mesh.kv("budget")
        self.status = await self.mesh.kv(StatusRecord.bucket)
        self.durable = Durable(await self.mesh.kv(Durable.BUCKET))
        self.accounts = Accounts(self.kv, self._labels, partition=self.partition)
        if self.partition.count > 1:
            log.info("following partition %s of the tenants", self.partition)
        mark = await self.accounts.start(self._last_usage_seq)
        self.horizon.start()
        await self.watch.start(mark)
        self._checkpointer = asyncio.create_task(self._checkpoint_loop())
        self.mesh.report("partition", self._partition_report)
        self.mesh.report("accounts", lambda: {
            "through": self.accounts.position if self.accounts else 0,
            "records_written": self.accounts.written if self.accounts else 0,
        })  # fmt: skip
        self.mesh.report("kept", lambda: {  # tasks held in memory, each bounded (for /status and soaks)
            "facts": len(self._facts), "labels": len(self._label_cache), "monitor": len(self.monitor.tasks),
            "folds": len(self.accounts.tasks) if self.accounts else 0,
        })  # fmt: skip
        if self.anchors is not None:
            await self.anchors.start()

    def _ended(self, tenant: str, task_id: str) -> None:
        """The watch saw the task end: what this replica kept of it saves no read any more (a late
        reservation reads the record, and is refused as the task ended)."""
        key = (tenant, task_id)
        for kept in (self._facts, self._label_cache, self._provider_reported):
            kept.forget(key)

    def _partition_report(self) -> dict[str, Any]:
        """Which tenants this replica follows (for ``/status``): its partition, and the tenants of
        the tasks its monitor holds (the first 50 by name)."""
        followed = sorted({tenant for tenant, _ in self.monitor.tasks})
        return {"index": self.partition.index, "count": self.partition.count, "tasks": len(self.monitor.tasks),
                "tenants": followed[:50], "tenants_total": len(followed)}  # fmt: skip

    async def stop_following(self) -> None:
        """While still connected: stop following the streams, then write what was folded since
        the last checkpoint round (before this ran after the connection had closed, the last
        round was never written: a record read right after a graceful stop missed up to a
        second of spend, until the next replica folded it again)."""
        await self.horizon.stop()
        if self.anchors is not None:
            await self.anchors.stop()
        await tasks.stop(self._checkpointer)
        await self.watch.stop()
        if self.accounts is not None:
            try:
                await self.accounts.checkpoint()  # what was folded since the last round
            except Exception as exc:  # noqa: BLE001 - the next replica to start folds it again
                log.warning("last checkpoint of the spend records not written: %s", exc)

    async def stop(self) -> None:
        await self.view.close()

    async def _last_usage_seq(self) -> int:
        last = await Reader(self.mesh.nc, topo.STREAMS["usage"]).last("usage.>")
        return last.seq if last is not None else 0

    async def _checkpoint_loop(self) -> None:
        assert self.accounts is not None
        while True:
            await asyncio.sleep(self.settings.budget_checkpoint_s)
            try:
                await self.accounts.checkpoint()
            except Exception as exc:  # noqa: BLE001 - broker away: the next round writes it
                log.debug("checkpoint of the spend records failed: %s", exc)

    def _later(self, work: Any) -> None:
        """Run ``work`` (a coroutine) after the reply, logged if it fails."""
        task = asyncio.create_task(work)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("after a reservation: %s", t.exception())

        task.add_done_callback(done)

    # --- what it sees, for operators ----------------------------------------------------------

    async def on_status(self, m: BudgetStatusRequested, d: Delivery) -> BudgetStatusReport:
        """An operator's question (``meshctl top``, ``meshctl status``), answered from memory by
        every replica: each follows every task of its partition (all of them, with one) and
        reaches the same trips as the other replicas of it; the asker adds the partitions up."""
        prefix = "mesh.budget.trips."
        trips = {k.removeprefix(prefix): int(n) for k, n in self.mesh.stats.counters.items() if k.startswith(prefix)}
        after: dict[str, list[float]] = {}
        for kind, seconds in self.watch.detections:
            after.setdefault(kind, []).append(seconds)
        return BudgetStatusReport(
            tenant=m.tenant, task_id=m.task_id, replica=f"{socket.gethostname()}:{os.getpid()}",
            started_at=self.mesh.stats.started_at,
            tenants={t: TenantTasks(**v) for t, v in self.monitor.per_tenant(time.time()).items()},
            trips=trips, detected_after_s={k: round(statistics.median(v), 4) for k, v in after.items()},
            partition=self.partition.index, partitions=self.partition.count,
        )  # fmt: skip

    # --- reserve ------------------------------------------------------------------------------

    def _tenant_limits(self, tenant: str) -> TenantLimits:
        """The settings' ceilings, and over them the tenant's own from its registry record (live)."""
        base = self.tenant_limits.get(tenant) or self.tenant_limits.get("*") or TenantLimits()
        own = self.mesh.verifier.tenants.budget(tenant)
        if not own:
            return base
        return base.model_copy(update={k: (int(v) if k == "daily_tokens" else float(v)) for k, v in own.items()
                                       if k in TenantLimits.model_fields})  # fmt: skip

    async def on_reserve(self, m: BudgetReserve, d: Delivery) -> BudgetGranted | BudgetDenied:
        """A model call's worst case: granted, and held durably before the caller hears of it,
        or denied with a code and a reason (``mesh_budget.reserve``)."""
        self.monitor.started(m.tenant, m.task_id, m.step_id, time.time())  # out of its queue
        facts = await self._task_facts(m)
        if isinstance(facts, BudgetDenied):
            return facts
        if (refused := self._deadline_or_breaker(m, facts)) is not None:
            return refused
        tl = self._tenant_limits(m.tenant)
        day = today()
        limits = (
            facts.limits.max_tokens,
            facts.limits.max_cost_usd,
            tl.daily_tokens if tl.daily_tokens is not None else -1,
            tl.daily_cost_usd if tl.daily_cost_usd is not None else -1.0,
        )
        share = facts.shares.get(m.step_id) if m.step_id else None
        # A workflow node's budget share: its own ceilings, that share of the task's.
        step = (m.step_id, int(share * limits[0]), share * limits[1]) if share is not None else ("", -1, -1.0)
        decision = await self._decide(m, day, limits, facts.created_at, step)
        if decision.open is not None:
            until, failed, calls = decision.open
            return self._deny(m, "provider_breaker", (
                f"provider {m.provider}/{m.model} circuit open for {max(0.0, until - time.time()):.0f} s more: "
                f"{failed} of {calls} calls failed in the last {self.settings.budget_provider_window_s:g} s"
            ))  # fmt: skip
        if not decision.granted:
            return self._deny(m, decision.code, denial(m, decision, limits, share, step))
        # Durable before the caller hears of it: a Redis that loses its data must not forget it.
        assert self.durable is not None
        await self.durable.hold(
            Held(tenant=m.tenant, task_id=m.task_id, call_id=m.call_id, day=day, tokens=m.tokens,
                 cost_usd=m.cost_usd, expires_at=time.time() + self.settings.budget_reservation_ttl_s,
                 step_id=m.step_id)
        )  # fmt: skip
        self.m_reservations.add(1, {"tenant": m.tenant, "outcome": "granted", "code": ""})
        return BudgetGranted(
            tenant=m.tenant,
            task_id=m.task_id,
            reservation_id=m.call_id,
            remaining_tokens=decision.remaining_tokens,
            remaining_cost_usd=decision.remaining_cost_usd,
            expires_in_s=self.settings.budget_reservation_ttl_s,
        )

    def _deny(self, m: BudgetReserve, code: str, reason: str) -> BudgetDenied:
        """The denial, counted. Unless the task is unknown or stopped it is told on the task's
        events, and a ceiling reached is a trip on the tenant's audit chain (both after the reply)."""
        self.m_reservations.add(1, {"tenant": m.tenant, "outcome": "denied", "code": code})
        if code not in ("unknown_task", "stopped"):
            # Tell whoever follows the task, after the reply (the caller is not kept waiting).
            self._later(self.mesh.progress(m.tenant, m.task_id, "budget.denied", reason, step_id=m.step_id,
                        key=m.call_id, detail={"code": code, "agent": m.agent, "call_id": m.call_id}))  # fmt: skip
        if code in CEILINGS:
            # A ceiling stops the task (its step fails without the call): a trip, counted and
            # written to the tenant's audit chain as every other brake is (once per call id).
            self.m_trips.add(1, {"tenant": m.tenant, "kind": "ceiling", "action": "deny"})
            self.mesh.count("mesh.budget.trips.ceiling")
            self._later(self.audit.append(
                m.tenant, m.task_id, "budget.ceiling", f"budget:ceiling:{m.call_id}", actor="budget",
                detail={"code": code, "reason": reason, "agent": m.agent, "step_id": m.step_id, "call_id": m.call_id},
            ))  # fmt: skip
        return BudgetDenied(tenant=m.tenant, task_id=m.task_id, reason=reason, code=code)

    async def _task_facts(self, m: BudgetReserve) -> TaskFacts | BudgetDenied:
        """The task's start, limits and step shares, or the denial of a task unknown or stopped.
        Its first reservation reads its status record, and the kill switches; the next ones take
        the facts kept and ask the guard whether the task may go on."""
        assert self.guard is not None  # enabled by register()
        key = (m.tenant, m.task_id)
        facts = self._facts.get(key)
        if facts is None:
            rec, stop = await asyncio.gather(
                read_status(self.mesh.nc, self.status, m.tenant, m.task_id), self.guard.kill_switch(m.tenant)
            )
            if rec is None or rec.limits is None:  # (no limits: a record of a planner before they were there)
                return self._deny(m, "unknown_task", "unknown task: no status record with its limits")
            if rec.status in TERMINAL or rec.status == "halted":
                return self._deny(m, "stopped", f"task is {rec.status}" + (f": {rec.reason}" if rec.reason else ""))
            facts = self._facts.put(key, TaskFacts(rec.created_at, rec.limits, rec.step_shares))
        else:
            # Halted, ended, cancelled, or a kill switch: what every service's guard consults
            # before a call (the status bucket and control messages, followed, in memory).
            stop = await self.guard.check(m.tenant, m.task_id)
        if stop is not None:
            return self._deny(m, "stopped", stop.reason)
        return facts

    def _deadline_or_breaker(self, m: BudgetReserve, facts: TaskFacts) -> BudgetDenied | None:
        """The denial of a call after its task's deadline, or of a task a breaker tripped on."""
        if facts.created_at and time.time() > facts.created_at + facts.limits.deadline_s:
            return self._deny(m, "deadline", f"task deadline of {facts.limits.deadline_s:g} s has passed")
        w = self.monitor.tasks.get((m.tenant, m.task_id))
        breakers = w.tripped & {"loop", "chatter", "iteration_cap", "deadlock", "retry_storm"} if w else set()
        if w is not None and breakers:
            # Whichever reaches the task first, this refusal or the cancel, the reason is the same.
            why = "; ".join(w.trip_reasons.get(k, k) for k in sorted(breakers))
            return self._deny(m, "breaker", f"circuit breaker tripped: {why}")
        return None

    async def _decide(self, m: BudgetReserve, day: str, limits: Limits, created_at: float, step: Step) -> Decision:
        """The Redis script's decision over spent + outstanding + requested, the view rebuilt
        first if the script finds it cold. Redis unreachable: not ready until the probe reaches it
        again, and the error goes to the caller, who retries."""
        args = (m.tenant, m.task_id, day, m.call_id, m.tokens, m.cost_usd, limits, self.horizon.at, created_at)
        provider = (m.provider, m.model) if m.provider else None
        try:
            try:
                return await self.view.reserve(*args, provider=provider, step=step)
            except Cold as cold:
                assert self.durable is not None
                await rebuild(
                    self.mesh, self.kv, self.durable, self.view, cold, m.tenant, m.task_id, day,
                    horizon=self.horizon.at, ttl_s=self.settings.budget_reservation_ttl_s,
                )  # fmt: skip
                return await self.view.reserve(*args, provider=provider, step=step)
        except redis_errors() as exc:
            self.redis.down(exc)
            raise

    # --- account ------------------------------------------------------------------------------

    async def on_usage(self, m: UsageRecorded, d: Delivery) -> None:
        """Settle the call in the view reservations are decided on (once per call id: its hold is
        released and its cost counted), and count it in the metrics. The spend records are the
        monitor's fold of the same stream (``mesh_budget.accounts``): nothing is written here."""
        tokens = m.input_tokens + m.output_tokens
        at = d.stored_at if d.stored_at is not None else time.time()
        outcome = Outcome(m.provider, m.model, not m.error, at) if m.provider else None
        settled = await self.view.settle(
            m.tenant,
            m.task_id,
            today(),
            m.reservation_id or m.call_id,
            m.call_id,
            tokens,
            m.cost_usd,
            outcome,
            step_id=m.step_id,
        )
        if settled.counted:  # the first time this call id was settled (its task's view counts it now)
            self._count(m, f"{m.agent}/{m.role or m.agent}", await self._labels(m.tenant, m.task_id))
        if settled.trip:
            await self._provider_failing(m, settled, at)

    async def _provider_failing(self, m: UsageRecorded, s: Settled, at: float) -> None:
        """The call's provider/model is failing (its circuit opened on this call, or this call
        failed too while it is): tell the call's task, once. The circuit refuses reservations
        for that provider/model (callers fall back to the next model of their chain); the task
        itself goes on, so the trip only reports."""
        key = (m.tenant, m.task_id)
        if key in self._provider_reported:
            return
        self._provider_reported.put(key, True)
        r = self.settings
        reason = (f"provider {m.provider}/{m.model} failing: {s.failed} of {s.calls} calls in "
                  f"{r.budget_provider_window_s:g} s; circuit open for {r.budget_provider_cooldown_s:g} s")  # fmt: skip
        await self.watch.act(Trip("provider_breaker", m.tenant, m.task_id, reason, action="flag", closed_at=at))

    async def _labels(self, tenant: str, task_id: str) -> dict[str, str]:
        """The task's labels: from its ``task.submitted`` as the monitor saw it, or (a task the
        monitor has not seen: submitted before a restart's look-back) from its status record."""
        w = self.monitor.tasks.get((tenant, task_id))
        if w is not None and w.labels is not None:
            return w.labels
        key = (tenant, task_id)
        if (known := self._label_cache.get(key)) is not None:
            return known  # a record's labels never change
        rec = await records.task_status(self.status, tenant, task_id)
        if rec is None:
            return {}
        return self._label_cache.put(key, dict(rec.labels))

    def _count(self, m: UsageRecorded, agent: str, labels: dict[str, str] | None = None) -> None:
        attrs = {
            "tenant": m.tenant,
            "agent": agent,
            "gen_ai.provider.name": m.provider,
            "gen_ai.request.model": m.model,
        }
        for k in self.settings.metric_labels():  # only the label keys the operator chose: bounded cardinality
            if labels and k in labels:
                attrs[f"mesh.label.{k}"] = labels[k]
        for kind, n in (("input", m.input_tokens - m.cached_input_tokens), ("cached_input", m.cached_input_tokens),
                        ("output", m.output_tokens)):  # fmt: skip
            if n:
                self.m_tokens.add(n, {**attrs, "token.type": kind})
        if m.cost_usd:
            self.m_cost.add(m.cost_usd, attrs)
        self.m_calls.add(1, {**attrs, "outcome": "error" if m.error else "ok"})


async def build(mesh: Mesh, settings: BudgetSettings) -> Budget:
    svc = Budget(mesh, settings)
    tenancy.install(mesh)  # its tenants' doors and quotas (mesh_tenancy)
    svc.register()
    return svc
