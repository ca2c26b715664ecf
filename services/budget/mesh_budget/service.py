"""Budget service: grants or denies reservations before model calls and accounts every call.

Spend is derived from the ``usage.recorded`` stream only (deduplicated by call id), so it
is the same whatever service or replica made the call. Reservation decisions run as one
atomic Redis script over spent + outstanding, so replicas never together overspend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import statistics
import time
from collections import OrderedDict
from typing import Any

from opentelemetry.metrics import Observation

from mesh_budget.ledger import Cold, DayUsage, Durable, Held, TaskUsage, View, today
from mesh_budget.monitor import Monitor, Trip
from mesh_budget.settings import BudgetSettings, TenantLimits
from mesh_contracts import ContractError, parse_message
from mesh_contracts import topology as topo
from mesh_contracts.v1 import (
    BudgetDenied,
    BudgetGranted,
    BudgetReserve,
    BudgetStatusReport,
    BudgetStatusRequested,
    ControlCancel,
    ControlHalt,
    TaskLimits,
    TenantTasks,
    TokenUsage,
    UsageRecorded,
)
from mesh_contracts.v1.audit import ANCHOR, ANCHOR_TTL_S, MESH_WIDE
from mesh_contracts.v1.records import TERMINAL
from mesh_kit import Delivery, Mesh, faults, tasks
from mesh_kit import envelope as env
from mesh_kit import state as st
from mesh_kit import telemetry as tel
from mesh_kit.deps import Dependency, redis_errors
from mesh_kit.identity import CLOCK_LEEWAY_S, IdentityError
from mesh_kit.tail import Reader, Stored, Tail

log = logging.getLogger("mesh.budget")
MAX_DAY_LABELS = 256
"""Distinct ``label=value`` keys a tenant-day record keeps; the rest are summed under ``(other)``."""
OTHER_LABELS = "(other)"
USAGE_DURABLE = "budget--usage-recorded"
FACTS_KEPT = 20_000
"""Tasks whose creation time and limits a budget replica keeps (the oldest go first)."""
WATCHED = topo.WATCHERS["budget"]
"""Domains the monitor reads (every replica reads all of them, with direct gets: no consumers)."""


CEILINGS = ("task_tokens", "task_cost", "tenant_daily_tokens", "tenant_daily_cost")
"""Denial codes that are a ceiling reached: a trip (``kind=ceiling``) and an audit record."""
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
        self.settings = settings if settings is not None else BudgetSettings.defaults()
        self.tenant_limits = self.settings.limits()
        if not mesh.settings.redis_url:
            raise SystemExit(
                "configuration error: the budget service needs MESH_REDIS_URL (or MESH_REDIS_URL_FILE): "
                "its reservations must be shared by every replica"
            )
        self.view = View(mesh.settings.redis_url, self.settings.budget_reservation_ttl_s)
        self.redis = mesh.depend(
            Dependency("redis", self.view.redis.ping, required=True, purpose="reservations shared by every replica")
        )
        self.kv: Any = None
        self.tasks: Any = None
        self.durable: Durable | None = None
        self.horizon = 0.0  # nothing expires until the first look at the accounting backlog
        self._samples: list[tuple[float, int]] = []
        self._poller: asyncio.Task[None] | None = None
        self.monitor = Monitor(self.settings.rules())
        self._tails: list[Tail] = []
        self._ticker: asyncio.Task[None] | None = None
        self._anchorer: asyncio.Task[None] | None = None
        self.anchors: Any = None
        self._anchored: dict[str, int] = {}  # tenant -> the chain length last anchored
        self._started_at = 0.0
        self._facts: OrderedDict[tuple[str, str], tuple[float, TaskLimits]] = OrderedDict()
        """A task's creation time and limits (never change once its record exists), read from the
        record at its first reservation: the next ones ask the guard's followed views whether it
        may go on instead of reading the record again."""
        self._background: set[asyncio.Task[None]] = set()
        self._day_done: dict[tuple[str, str], set[str]] = {}  # day writes stored, per task (see on_usage)
        meter = mesh.telemetry.meter_provider.get_meter("mesh_budget")
        self.m_tokens = meter.create_counter(tel.M_BUDGET_TOKENS, unit="{token}")
        self.m_cost = meter.create_counter(tel.M_BUDGET_COST, unit="USD")
        self.m_calls = meter.create_counter(tel.M_BUDGET_CALLS, unit="{call}")
        self.m_reservations = meter.create_counter(tel.M_BUDGET_RESERVATIONS, unit="{reservation}")
        self.m_trips = meter.create_counter(tel.M_BUDGET_TRIPS, unit="{trip}")
        self.detections: list[tuple[str, float]] = []  # (kind, seconds from cause to action), for /status
        # Tasks not ended, per tenant: running or queued (every replica follows every task, so
        # each reports the same numbers: take the max across replicas, not the sum).
        mesh.report("tenants", lambda: self.monitor.per_tenant(time.time()))
        meter.create_observable_gauge(
            tel.M_TASKS_QUEUED, [lambda _opts: self._gauge("queued")], unit="{task}",
            description="Tasks whose outstanding work all waits to be taken up, per tenant (max over replicas)",
        )  # fmt: skip
        meter.create_observable_gauge(
            tel.M_TASKS_RUNNING, [lambda _opts: self._gauge("running")], unit="{task}",
            description="Tasks with work taken up and not ended, per tenant (max over replicas)",
        )  # fmt: skip

    def _gauge(self, what: str) -> list[Observation]:
        return [Observation(v[what], {"tenant": t}) for t, v in self.monitor.per_tenant(time.time()).items()]

    async def start(self) -> None:
        self.kv = await self.mesh.kv("budget")
        self.tasks = await self.mesh.kv("tasks")
        self.durable = Durable(await self.mesh.kv(Durable.BUCKET))
        self._poller = asyncio.create_task(self._poll_horizon())
        await self._watch()
        self._ticker = asyncio.create_task(self._tick())
        if self.settings.budget_audit_anchor_s > 0:
            self.anchors = await self.mesh.kv("anchors")
            self._anchorer = asyncio.create_task(self._anchor_loop())

    async def stop(self) -> None:
        for task in (self._poller, self._ticker, self._anchorer):
            await tasks.stop(task)  # the horizon poll catches what a cancellation becomes in nats-py
        for tail in self._tails:
            await tail.stop()
        await self.view.close()

    # --- the monitor: every message about every task ------------------------------------------

    async def _watch(self) -> None:
        """Follow every watched stream from ``lookback_s`` ago, with direct gets (no consumer: the
        budget holds no right to create, change or delete consumers): the monitor's state is
        rebuilt from the streams on every start (nothing to persist, nothing to lose)."""
        self._started_at = time.time()
        start = self._started_at - self.settings.budget_lookback_s
        for domain in WATCHED:
            stream = topo.STREAMS[domain]

            async def on_msg(msg: Stored, stream: str = stream) -> None:
                await self._on_watched(msg, stream)

            tail = Tail(
                self.mesh.nc, stream, on_msg, start_time=start, feed=topo.watch_feed(stream),
                poll_s=self.settings.budget_watch_poll_s,
            )  # fmt: skip
            tail.start()
            self._tails.append(tail)

    async def _on_watched(self, msg: Stored, stream: str) -> None:
        try:
            model = parse_message(msg.subject, msg.data)
            self.mesh.verifier.verify(msg.headers.get(env.IDENTITY), msg.data, model, at=msg.time)
        except (ContractError, IdentityError):
            return  # its consumer dead-letters it; the monitor only folds in verified facts
        try:
            trips = self.monitor.observe(model, msg.time)
        except Exception:
            log.exception("monitor failed on %s", msg.subject)
            return
        for trip in trips:
            await self._act(trip)

    def caught_up(self) -> bool:
        """Replay done: every stream was read to its end once (or 2 s passed: the broker is slow
        to answer, and the monitor must not stay blind to deadlines meanwhile)."""
        return all(t.caught_up.is_set() for t in self._tails) or time.time() - self._started_at > 2.0

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.settings.budget_tick_s)
            if not self.caught_up():
                continue
            now = time.time()
            for trip in self.monitor.tick(now):
                await self._act(trip)
            self.monitor.forget(now - 600)

    async def _act(self, trip: Trip) -> None:
        """Publish the reasoned event and the control message (deterministic ids: every replica
        reaches the same verdict from the same stream; JetStream keeps one)."""
        try:
            rec = await st.task_record(self.tasks, trip.tenant, trip.task_id)
            if rec is not None and rec.status in TERMINAL:
                return  # replayed history, or the task ended meanwhile
            after = max(0.0, time.time() - trip.closed_at) if trip.closed_at else 0.0
            self.detections.append((trip.kind, after))
            self.detections = self.detections[-1000:]
            self.m_trips.add(1, {"tenant": trip.tenant, "kind": trip.kind, "action": trip.action})
            self.mesh.count(f"mesh.budget.trips.{trip.kind}")
            log.warning("%s/%s: %s -> %s", trip.tenant, trip.task_id, trip.reason, trip.action)
            await self.mesh.progress(
                trip.tenant,
                trip.task_id,
                f"budget.{trip.kind}",
                trip.reason,
                key=trip.kind,
                detail={"action": trip.action, "members": list(trip.members), "detected_after_s": round(after, 4)},
            )
            if trip.action == "cancel":
                await self.mesh.publish(
                    ControlCancel(tenant=trip.tenant, task_id=trip.task_id, reason=trip.reason),
                    key=f"budget:{trip.kind}",
                )
            elif trip.action == "halt":
                await self.mesh.publish(
                    ControlHalt(tenant=trip.tenant, task_id=trip.task_id, reason=trip.reason), key=f"budget:{trip.kind}"
                )
            # After acting (a chain that cannot be appended to must not delay the brake): the
            # trip as a link of the tenant's audit chain; every replica's copy is stored once.
            await self.mesh.audit(
                trip.tenant, trip.task_id, f"budget.{trip.kind}", f"budget:{trip.kind}", actor="budget",
                detail={"reason": trip.reason, "action": trip.action, "members": list(trip.members)},
            )  # fmt: skip
        except Exception:
            log.exception("could not act on %s for %s/%s", trip.kind, trip.tenant, trip.task_id)

    # --- anchoring the audit chains ----------------------------------------------------------

    async def _anchor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.budget_audit_anchor_s)
            try:
                await self.anchor_all()
            except Exception as exc:  # noqa: BLE001 - broker away: the next round anchors
                log.warning("anchoring the audit chains failed: %s", exc)

    async def anchor_all(self) -> int:
        """Sign each chain's length and head hash into KV ``anchors`` (key: the tenant) when it
        grew: a chain later cut short, or rewritten, no longer reaches its anchor. Returns how
        many chains were anchored."""
        tenants = sorted({p.tenant for p in self.mesh.verifier.bundle.principals.values() if p.tenant} | {MESH_WIDE})
        done = 0
        for tenant in tenants:
            head = await self.mesh.audit_head(tenant)
            if head.n == 0 or self._anchored.get(tenant) == head.n:
                continue
            statement = self.mesh.signer.statement(
                ANCHOR, {"ten": tenant, "n": head.n, "head": head.hash, "seq": head.seq}, ttl_s=ANCHOR_TTL_S
            )
            await self.anchors.put(tenant, statement.encode())
            self._anchored[tenant] = head.n
            done += 1
        return done

    def register(self) -> None:
        self.mesh.enable_guard()
        self.mesh.on_start(self.start)
        self.mesh.on_stop(self.stop)
        self.mesh.serve(BudgetReserve, self.on_reserve)
        self.mesh.serve(BudgetStatusRequested, self.on_status)
        self.mesh.consume(UsageRecorded, self.on_usage)

    # --- the expiry horizon -------------------------------------------------------------------

    async def _poll_horizon(self) -> None:
        """Keep ``horizon``: a time before which every stored usage message has been accounted.

        Each poll notes (time, last stored usage sequence). Once the consumer's ack floor has
        passed that sequence, everything stored before that time is counted, so reservations
        that expired before it and are still unsettled were abandoned. With no backlog at all
        the horizon is the poll time itself."""
        js = self.mesh.nc.jetstream()
        usage = Reader(self.mesh.nc, topo.STREAMS["usage"])
        while True:
            sent = time.time()
            try:
                last = await usage.last("usage.>")  # the last stored usage message (a direct get)
                info = await js.consumer_info(topo.STREAMS["usage"], USAGE_DURABLE, timeout=2.0)
            except Exception as exc:  # noqa: BLE001 - broker away: the horizon just stands still
                log.debug("horizon poll failed: %s", exc)
            else:
                if not info.num_pending and not info.num_ack_pending:
                    self.horizon, self._samples = sent, []
                else:
                    self._samples.append((sent, last.seq if last is not None else 0))
                    floor = info.ack_floor.stream_seq if info.ack_floor else 0
                    passed = [t for t, seq in self._samples if seq <= (floor or 0)]
                    if passed:
                        self.horizon = max(self.horizon, max(passed))
                        self._samples = [(t, s) for t, s in self._samples if t > self.horizon]
                    self._samples = self._samples[-600:]
            await asyncio.sleep(self.settings.budget_horizon_poll_s)

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
        """An operator's question (``meshctl top``, ``meshctl status``), answered from memory: any
        replica can, each follows every task and reaches the same trips."""
        prefix = "mesh.budget.trips."
        trips = {k.removeprefix(prefix): int(n) for k, n in self.mesh.stats.counters.items() if k.startswith(prefix)}
        after: dict[str, list[float]] = {}
        for kind, seconds in self.detections:
            after.setdefault(kind, []).append(seconds)
        return BudgetStatusReport(
            tenant=m.tenant, task_id=m.task_id, replica=f"{socket.gethostname()}:{os.getpid()}",
            started_at=self.mesh.stats.started_at,
            tenants={t: TenantTasks(**v) for t, v in self.monitor.per_tenant(time.time()).items()},
            trips=trips, detected_after_s={k: round(statistics.median(v), 4) for k, v in after.items()},
        )  # fmt: skip

    # --- reserve ------------------------------------------------------------------------------

    def _tenant_limits(self, tenant: str) -> TenantLimits:
        return self.tenant_limits.get(tenant) or self.tenant_limits.get("*") or TenantLimits()

    async def on_reserve(self, m: BudgetReserve, d: Delivery) -> BudgetGranted | BudgetDenied:
        base = {"tenant": m.tenant, "task_id": m.task_id}
        self.monitor.started(m.tenant, m.task_id, m.step_id, time.time())  # out of its queue

        def deny(code: str, reason: str) -> BudgetDenied:
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
                self._later(self.mesh.audit(
                    m.tenant, m.task_id, "budget.ceiling", f"budget:ceiling:{m.call_id}", actor="budget",
                    detail={"code": code, "reason": reason, "agent": m.agent, "step_id": m.step_id, "call_id": m.call_id},
                ))  # fmt: skip
            return BudgetDenied(**base, reason=reason, code=code)

        assert self.mesh.guard is not None
        key = (m.tenant, m.task_id)
        facts = self._facts.get(key)
        if facts is None:
            rec, stop = await asyncio.gather(
                st.task_record(self.tasks, m.tenant, m.task_id), self.mesh.guard.kill_switch(m.tenant)
            )
            if rec is None:
                return deny("unknown_task", "unknown task: no task record")
            if rec.status in TERMINAL or rec.status == "halted":
                return deny("stopped", f"task is {rec.status}" + (f": {rec.reason}" if rec.reason else ""))
            facts = self._facts[key] = (rec.created_at, rec.limits)
            while len(self._facts) > FACTS_KEPT:
                self._facts.popitem(last=False)
        else:
            # Halted, ended, cancelled, or a kill switch: what every service's guard consults
            # before a call (the status bucket and control messages, followed, in memory).
            stop = await self.mesh.guard.check(m.tenant, m.task_id)
        if stop is not None:
            return deny("stopped", stop.reason)
        created_at, task_limits = facts
        if created_at and time.time() > created_at + task_limits.deadline_s:
            return deny("deadline", f"task deadline of {task_limits.deadline_s:g} s has passed")
        w = self.monitor.tasks.get((m.tenant, m.task_id))
        breakers = w.tripped & {"loop", "chatter", "iteration_cap", "deadlock", "retry_storm"} if w else set()
        if w is not None and breakers:
            # Whichever reaches the task first, this refusal or the cancel, the reason is the same.
            why = "; ".join(w.trip_reasons.get(k, k) for k in sorted(breakers))
            return deny("breaker", f"circuit breaker tripped: {why}")
        if m.provider and (why := self.monitor.provider_open(m.provider, m.model, time.time())):
            return deny("provider_breaker", why)
        tl = self._tenant_limits(m.tenant)
        day = today()
        limits = (
            task_limits.max_tokens,
            task_limits.max_cost_usd,
            tl.daily_tokens if tl.daily_tokens is not None else -1,
            tl.daily_cost_usd if tl.daily_cost_usd is not None else -1.0,
        )
        args = (m.tenant, m.task_id, day, m.call_id, m.tokens, m.cost_usd, limits, self.horizon, created_at)
        try:
            try:
                decision = await self.view.reserve(*args)
            except Cold as cold:
                await self._rebuild(m.tenant, m.task_id, day, cold)
                decision = await self.view.reserve(*args)
        except redis_errors() as exc:
            self.redis.down(exc)  # not ready until the probe reaches it again; the caller retries
            raise
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
        # Durable before the caller hears of it: a Redis that loses its data must not forget it.
        assert self.durable is not None
        await self.durable.hold(
            Held(tenant=m.tenant, task_id=m.task_id, call_id=m.call_id, day=day, tokens=m.tokens,
                 cost_usd=m.cost_usd, expires_at=time.time() + self.settings.budget_reservation_ttl_s)
        )  # fmt: skip
        self.m_reservations.add(1, {"tenant": m.tenant, "outcome": "granted", "code": ""})
        return BudgetGranted(
            **base,
            reservation_id=m.call_id,
            remaining_tokens=decision.remaining_tokens,
            remaining_cost_usd=decision.remaining_cost_usd,
            expires_in_s=self.settings.budget_reservation_ttl_s,
        )

    async def _rebuild(self, tenant: str, task_id: str, day: str, cold: Cold) -> None:
        """Initialise the missing Redis view (a new task or day, or a Redis that lost its data)
        from the budget bucket's totals and the reservations bucket's outstanding calls."""
        assert self.durable is not None
        task_usage, _ = await st.load(self.kv, TaskUsage.key(tenant, task_id), TaskUsage)
        day_usage, _ = await st.load(self.kv, DayUsage.key(tenant, day), DayUsage)
        horizon = self.horizon
        # A hold counts until its expiry is behind the horizon: only those granted since
        # ``horizon - ttl`` can (the leeway covers clocks; no horizon yet: all of them).
        since = horizon - self.settings.budget_reservation_ttl_s - CLOCK_LEEWAY_S if horizon else 0.0
        nc = self.mesh.nc
        task_held = await self.durable.granted_since(nc, since, tenant, task_id) if cold.task else []
        day_held = await self.durable.granted_since(nc, since, tenant) if cold.day else []
        task_held = [h for h in task_held if h.expires_at >= horizon]  # init leaves out the settled ones
        day_held = await self._unsettled(
            tenant, task_id, task_usage, [h for h in day_held if h.expires_at >= horizon and h.day == day]
        )
        await self.view.init(
            task_usage, day_usage or DayUsage(tenant=tenant, day=day), tenant, task_id, task_held, day_held
        )
        if task_held or day_held:
            self.mesh.count("mesh.budget.reservations_rebuilt")
            log.info("%s/%s: view rebuilt with %d task and %d tenant-day reservations held", tenant, task_id,
                     len(task_held), len(day_held))  # fmt: skip

    async def _unsettled(self, tenant: str, task_id: str, task_usage: TaskUsage | None, held: list[Held]) -> list[Held]:
        """The holds whose call is not counted yet in its task's record (one read per other task
        with a hold in the window: a rebuild is rare, and the window is a reservation's ttl)."""
        counted = {task_id: task_usage.settled() if task_usage else set()}
        for other in sorted({h.task_id for h in held} - counted.keys()):
            rec, _ = await st.load(self.kv, TaskUsage.key(tenant, other), TaskUsage)
            counted[other] = rec.settled() if rec else set()
        return [h for h in held if h.call_id not in counted[h.task_id]]

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
        day = today(d.stored_at or None)  # the same on every redelivery
        key = (m.tenant, m.task_id)
        labels = await self._labels(m.tenant, m.task_id)
        confirmed = self._day_done.pop(key, set())
        first, fresh, redo = [False], [False], [""]

        def add(cur: TaskUsage | None) -> TaskUsage | None:
            first[0], fresh[0], redo[0] = cur is None, False, ""
            cur = cur or TaskUsage(tenant=m.tenant, task_id=m.task_id)
            done = [c for c in cur.day_pending if c in confirmed]
            for c in done:
                del cur.day_pending[c]
            if m.call_id in cur.call_ids:  # the same call recorded twice is counted once
                redo[0] = cur.day_pending.get(m.call_id, "")
                return cur if done else None
            fresh[0] = True
            cur.day_pending[m.call_id] = day
            cur.call_ids.append(m.call_id)
            if m.reservation_id and m.reservation_id != m.call_id:
                cur.reservation_ids.append(m.reservation_id)
            cur.total = cur.total + call
            cur.by_agent[agent] = cur.by_agent.get(agent, TokenUsage()) + call
            cur.by_step[m.step_id or "-"] = cur.by_step.get(m.step_id or "-", TokenUsage()) + call
            cur.by_model[model] = cur.by_model.get(model, TokenUsage()) + call
            cur.errors += 1 if m.error else 0
            cur.updated_at = time.time()
            cur.labels = cur.labels or labels
            return cur

        try:
            task_usage, _ = await st.update(self.kv, TaskUsage.key(m.tenant, m.task_id), TaskUsage, add)
        except BaseException:
            self._confirm(key, confirmed)  # not dropped from the record yet: keep them for next time
            raise
        settle = self.view.settle(
            m.tenant, m.task_id, today(), m.reservation_id or m.call_id, m.call_id, call.total_tokens, call.cost_usd
        )
        if fresh[0]:
            assert task_usage is not None
            faults.crash_point("budget_after_task_usage")  # chaos: die between the task and day writes
            # Independent of each other once the task total is stored: one round trip, not two. (A
            # client following the task sees each call as its caller recorded it: usage.recorded.)
            await asyncio.gather(self._add_day(m, day, call, agent, model, first[0], labels), settle)
            self._count(m, agent, labels)
            self._confirm(key, {m.call_id})
        elif redo[0]:
            # Counted for the task by an attempt that may have died before the day write.
            await asyncio.gather(self._add_day(m, redo[0], call, agent, model, False, labels), settle)
            self._confirm(key, {m.call_id})
        else:
            await settle
        # The call's durable reservation stays: the task's record now says it is settled (a
        # rebuilt view leaves it out), and the bucket's age limit removes it.

    def _confirm(self, key: tuple[str, str], calls: set[str]) -> None:
        """Remember day writes that are stored, to drop them from the task's ``day_pending`` at
        its next write (bounded: a forgotten one only costs a re-applied day write on redelivery,
        and no redelivery comes for a message already acknowledged)."""
        self._day_done.setdefault(key, set()).update(calls)
        while len(self._day_done) > 10_000:
            self._day_done.pop(next(iter(self._day_done)))

    async def _labels(self, tenant: str, task_id: str) -> dict[str, str]:
        """The task's labels: from its ``task.submitted`` as the monitor saw it, or (a task the
        monitor has not seen: submitted before a restart's look-back) from its task record."""
        w = self.monitor.tasks.get((tenant, task_id))
        if w is not None and w.labels is not None:
            return w.labels
        rec = await st.task_record(self.tasks, tenant, task_id)
        return dict(rec.labels) if rec is not None else {}

    async def _add_day(
        self, m: UsageRecorded, day: str, call: TokenUsage, agent: str, model: str, first: bool,
        labels: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        def add_day(cur: DayUsage | None) -> DayUsage:
            cur = cur or DayUsage(tenant=m.tenant, day=day)
            cur.total = cur.total + call
            cur.by_agent[agent] = cur.by_agent.get(agent, TokenUsage()) + call
            cur.by_model[model] = cur.by_model.get(model, TokenUsage()) + call
            for k, v in sorted((labels or {}).items()):
                name = f"{k}={v}"
                if name not in cur.by_label and len(cur.by_label) >= MAX_DAY_LABELS:
                    name = OTHER_LABELS  # a day record stays bounded however many users a tenant has
                cur.by_label[name] = cur.by_label.get(name, TokenUsage()) + call
            cur.tasks += 1 if first else 0
            return cur

        # The tenant-day record is every call's: concurrent calls share a write (they only add).
        await st.accumulate(self.kv, DayUsage.key(m.tenant, day), DayUsage, add_day)

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
    svc.register()
    return svc
