"""Budget service: grants or denies reservations before model calls and accounts every call.

Spend is derived from the ``usage.recorded`` stream only (deduplicated by call id), so it
is the same whatever service or replica made the call. Reservation decisions run as one
atomic Redis script over spent + outstanding, so replicas never together overspend.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import os
import socket
import statistics
import time
from collections import OrderedDict
from typing import Any, Literal, TypeVar

import nats.errors
from opentelemetry.metrics import Observation

from mesh_budget import metrics as budget_metrics
from mesh_budget.accounts import Accounts, add_call, add_to_day, read_usage
from mesh_budget.ledger import Cold, DayUsage, Durable, Held, Outcome, Settled, TaskUsage, View, today
from mesh_budget.monitor import Monitor, Seen, Trip
from mesh_budget.settings import BudgetSettings, TenantLimits
from mesh_contracts import ContractError, contract_for_subject, parse_message
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
    UsageRecorded,
)
from mesh_contracts.v1.audit import ANCHOR, ANCHOR_TTL_S, MESH_WIDE
from mesh_contracts.v1.records import TERMINAL, StatusRecord, TaskRecord
from mesh_durable import chain, guard, records, redis
from mesh_durable.redis import redis_errors
from mesh_durable.tail import Reader, Stored, Tail
from mesh_identity import CLOCK_LEEWAY_S, IdentityError
from mesh_kit import Delivery, Mesh, tasks
from mesh_kit import envelope as env
from mesh_kit import state as st
from mesh_tenancy import tenancy

log = logging.getLogger("mesh.budget")
UNKNOWN_REREADS_S = (0.0, 0.2, 0.5, 1.0)
"""Waits between the leader reads of a task's status record before its first reservation calls
it unknown (1.7 s in all): a read that failed while the bucket's stream elected a leader."""
USAGE_DURABLE = "budget--usage-recorded"
V = TypeVar("V")
FACTS_KEPT = 20_000
"""Tasks whose creation time and limits a budget replica keeps (the oldest go first)."""
FOLLOWED = (topo.ENVELOPES, topo.STREAMS["usage"])
"""What the monitor reads, every replica all of it, with direct gets (no consumers): every
message of the seven content streams without its body, and the usage records whole."""
ENDS = frozenset({"task.completed", "task.failed", "task.rejected"})


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


def _keep(kept: OrderedDict[Any, Any], key: Any, value: V) -> V:
    """Remember ``value`` under ``key`` in a per-task memory of this replica, the oldest entries
    going first beyond ``FACTS_KEPT``; returns ``value``."""
    kept[key] = value
    while len(kept) > FACTS_KEPT:
        kept.popitem(last=False)
    return value


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
        self._provider_reported: OrderedDict[tuple[str, str], None] = OrderedDict()
        """Tasks told of a failing provider already (once per task, as every other trip)."""
        self.redis = mesh.depend(
            redis.dependency(self.view.redis, required=True, purpose="reservations shared by every replica")
        )
        self.kv: Any = None
        self.status: Any = None
        """KV ``status``: what the budget knows of a task (start, limits, labels; no content)."""
        self.durable: Durable | None = None
        self.horizon = 0.0  # nothing expires until the first look at the accounting backlog
        self._samples: list[tuple[float, int]] = []
        self._poller: asyncio.Task[None] | None = None
        self.monitor = Monitor(self.settings.rules())
        self.partition = self.settings.partition()
        """The tenants this replica follows (all of them with one partition: ``mesh_budget.partition``)."""
        self._label_cache: OrderedDict[tuple[str, str], dict[str, str]] = OrderedDict()
        self._tails: list[Tail] = []
        self._ticker: asyncio.Task[None] | None = None
        self._anchorer: asyncio.Task[None] | None = None
        self.anchors: Any = None
        self._anchored: dict[str, int] = {}  # tenant -> the chain length last anchored
        self._started_at = 0.0
        self._facts: OrderedDict[tuple[str, str], tuple[float, TaskLimits, dict[str, float]]] = OrderedDict()
        """A task's creation time and limits (never change once its status record exists), read
        from that record at its first reservation: the next ones ask the guard's followed views
        whether it may go on instead of reading the record again."""
        self._background: set[asyncio.Task[None]] = set()
        self.accounts: Accounts | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        meter = mesh.telemetry.meter_provider.get_meter("mesh_budget")
        self.m_tokens = meter.create_counter(budget_metrics.M_BUDGET_TOKENS, unit="{token}")
        self.m_cost = meter.create_counter(budget_metrics.M_BUDGET_COST, unit="USD")
        self.m_calls = meter.create_counter(budget_metrics.M_BUDGET_CALLS, unit="{call}")
        self.m_reservations = meter.create_counter(budget_metrics.M_BUDGET_RESERVATIONS, unit="{reservation}")
        self.m_trips = meter.create_counter(budget_metrics.M_BUDGET_TRIPS, unit="{trip}")
        self.detections: list[tuple[str, float]] = []  # (kind, seconds from cause to action), for /status
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

    async def start(self) -> None:
        self.kv = await self.mesh.kv("budget")
        self.status = await self.mesh.kv(StatusRecord.bucket)
        self.durable = Durable(await self.mesh.kv(Durable.BUCKET))
        self.accounts = Accounts(self.kv, self._labels, partition=self.partition)
        if self.partition.count > 1:
            log.info("following partition %s of the tenants", self.partition)
        mark = await self.accounts.start(self._last_usage_seq)
        self._poller = asyncio.create_task(self._poll_horizon())
        await self._watch(mark)
        self._ticker = asyncio.create_task(self._tick())
        self._checkpointer = asyncio.create_task(self._checkpoint_loop())
        self.mesh.report("partition", self._partition_report)
        self.mesh.report("accounts", lambda: {
            "through": self.accounts.position if self.accounts else 0,
            "records_written": self.accounts.written if self.accounts else 0,
        })  # fmt: skip
        if self.settings.budget_audit_anchor_s > 0:
            self.anchors = await self.mesh.kv("anchors")
            self._anchorer = asyncio.create_task(self._anchor_loop())

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
        for task in (self._poller, self._ticker, self._anchorer, self._checkpointer):
            await tasks.stop(task)  # the horizon poll catches what a cancellation becomes in nats-py
        for tail in self._tails:
            await tail.stop()
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

    # --- the monitor: every message about every task ------------------------------------------

    async def _watch(self, mark: int) -> None:
        """Follow the envelopes and the usage stream from ``lookback_s`` ago, with direct gets (no
        consumer: the budget holds no right to create, change or delete consumers): the monitor's
        state is rebuilt from them on every start (nothing to persist, nothing to lose). The usage
        stream is read from the spend records' mark too, if that is earlier: what came after it
        is folded into them (``mesh_budget.accounts``). The content streams themselves it cannot
        read: ENVELOPES holds their messages' headers (``Mesh-Facts``), never a body."""
        self._started_at = time.time()
        start = self._started_at - self.settings.budget_lookback_s
        for stream in FOLLOWED:
            start_seq = None
            if stream == topo.STREAMS["usage"]:
                first = await Reader(self.mesh.nc, stream).read(start_time=start, batch=1)
                at_lookback = first.messages[0].seq if first.messages else mark + 1
                start_seq = max(1, min(mark + 1, at_lookback))

            async def on_msg(msg: Stored, stream: str = stream) -> None:
                await self._on_watched(msg, stream)

            tail = Tail(
                self.mesh.nc, stream, on_msg, start_seq=start_seq, start_time=None if start_seq else start,
                feed=topo.watch_feed(stream), poll_s=self.settings.budget_watch_poll_s,
            )  # fmt: skip
            tail.start()
            self._tails.append(tail)
        if self.partition.count > 1:
            # A reservation for one of our tasks may reach a replica of another partition: the
            # hold it stores says the step started (out of its queue), for our monitor to see.
            holds = Tail(self.mesh.nc, f"KV_{Durable.BUCKET}", self._on_hold, start_time=time.time())
            holds.start()
            self._tails.append(holds)

    async def _on_hold(self, msg: Stored) -> None:
        parts = msg.subject.split(".")  # $KV.reservations.<tenant>.<task>.<call>
        if len(parts) != 5 or not self.partition.owns(parts[2]) or msg.operation or not msg.data:
            return
        try:
            held = Held.model_validate_json(msg.data)
        except ValueError:
            return
        self.monitor.started(held.tenant, held.task_id, held.step_id, msg.time)

    async def _on_watched(self, msg: Stored, stream: str) -> None:
        usage_stream = self.accounts is not None and stream == topo.STREAMS["usage"]
        parts = msg.subject.split(".")  # <domain>.v<major>.<tenant>.<task>.<event>
        if self.partition.count > 1 and len(parts) == 5 and not self.partition.owns(parts[2]):
            if usage_stream and self.accounts is not None:
                self.accounts.seen(msg.seq)  # another partition's records
            return  # another partition's tenant: not even parsed
        try:
            if stream == topo.ENVELOPES:  # a message's headers: no body to parse, its facts instead
                contract = contract_for_subject(msg.subject)
                _, told = self.mesh.verifier.verify_envelope(
                    msg.headers.get(env.IDENTITY), msg.headers.get(env.FACTS), contract, parts[2], at=msg.time
                )
                seen, model = Seen(contract.type_name(), parts[2], parts[3], told), None
            else:
                model = parse_message(msg.subject, msg.data)
                self.mesh.verifier.verify(msg.headers.get(env.IDENTITY), msg.data, model, at=msg.time)
                seen = Seen.of(model)
        except (ContractError, IdentityError):
            if usage_stream and self.accounts is not None:
                self.accounts.seen(msg.seq)  # nothing to fold: the records are complete past it
            return  # its consumer dead-letters it; the monitor only folds in verified facts
        if self.accounts is not None:
            if isinstance(model, UsageRecorded):
                await self.accounts.fold(model, msg.seq, msg.time)  # waits for the broker if it must
            elif usage_stream:
                self.accounts.seen(msg.seq)
            elif seen.type in ENDS:
                self.accounts.ended(seen.tenant, seen.task_id)
        if msg.time < self._started_at - self.settings.budget_lookback_s:
            return  # read for the spend records only (before the monitor's look-back)
        if not self.partition.owns(seen.tenant):
            return
        try:
            trips = self.monitor.observe(seen, msg.time)
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
            rec = await records.task_status(self.status, trip.tenant, trip.task_id)
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
            await self.audit.append(
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
            head = await self.audit.head(tenant)
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
        self.guard = guard.enable(self.mesh)
        self.mesh.on_start(self.start)
        self.mesh.on_stop(self.stop_following, connected=True)
        self.mesh.on_stop(self.stop)
        self.mesh.serve(BudgetReserve, self.on_reserve)
        self.mesh.serve(BudgetStatusRequested, self.on_status, every_replica=True)
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
        """An operator's question (``meshctl top``, ``meshctl status``), answered from memory by
        every replica: each follows every task of its partition (all of them, with one) and
        reaches the same trips as the other replicas of it; the asker adds the partitions up."""
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
            partition=self.partition.index, partitions=self.partition.count,
        )  # fmt: skip

    # --- reserve ------------------------------------------------------------------------------

    def _tenant_limits(self, tenant: str) -> TenantLimits:
        return self.tenant_limits.get(tenant) or self.tenant_limits.get("*") or TenantLimits()

    async def on_reserve(self, m: BudgetReserve, d: Delivery) -> BudgetGranted | BudgetDenied:
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
                self._later(self.audit.append(
                    m.tenant, m.task_id, "budget.ceiling", f"budget:ceiling:{m.call_id}", actor="budget",
                    detail={"code": code, "reason": reason, "agent": m.agent, "step_id": m.step_id, "call_id": m.call_id},
                ))  # fmt: skip
            return BudgetDenied(tenant=m.tenant, task_id=m.task_id, reason=reason, code=code)

        assert self.guard is not None  # enabled by register()
        key = (m.tenant, m.task_id)
        facts = self._facts.get(key)
        if facts is None:
            rec, stop = await asyncio.gather(self._started(m.tenant, m.task_id), self.guard.kill_switch(m.tenant))
            if rec is None or rec.limits is None:  # (no limits: a record of a planner before they were there)
                return deny("unknown_task", "unknown task: no status record with its limits")
            if rec.status in TERMINAL or rec.status == "halted":
                return deny("stopped", f"task is {rec.status}" + (f": {rec.reason}" if rec.reason else ""))
            facts = _keep(self._facts, key, (rec.created_at, rec.limits, rec.step_shares))
        else:
            # Halted, ended, cancelled, or a kill switch: what every service's guard consults
            # before a call (the status bucket and control messages, followed, in memory).
            stop = await self.guard.check(m.tenant, m.task_id)
        if stop is not None:
            return deny("stopped", stop.reason)
        created_at, task_limits, shares = facts
        if created_at and time.time() > created_at + task_limits.deadline_s:
            return deny("deadline", f"task deadline of {task_limits.deadline_s:g} s has passed")
        w = self.monitor.tasks.get((m.tenant, m.task_id))
        breakers = w.tripped & {"loop", "chatter", "iteration_cap", "deadlock", "retry_storm"} if w else set()
        if w is not None and breakers:
            # Whichever reaches the task first, this refusal or the cancel, the reason is the same.
            why = "; ".join(w.trip_reasons.get(k, k) for k in sorted(breakers))
            return deny("breaker", f"circuit breaker tripped: {why}")
        tl = self._tenant_limits(m.tenant)
        day = today()
        limits = (
            task_limits.max_tokens,
            task_limits.max_cost_usd,
            tl.daily_tokens if tl.daily_tokens is not None else -1,
            tl.daily_cost_usd if tl.daily_cost_usd is not None else -1.0,
        )
        args = (m.tenant, m.task_id, day, m.call_id, m.tokens, m.cost_usd, limits, self.horizon, created_at)
        provider = (m.provider, m.model) if m.provider else None
        share = shares.get(m.step_id) if m.step_id else None
        # A workflow node's budget share: its own ceilings, that share of the task's.
        step = (m.step_id, int(share * limits[0]), share * limits[1]) if share is not None else ("", -1, -1.0)
        try:
            try:
                decision = await self.view.reserve(*args, provider=provider, step=step)
            except Cold as cold:
                await self._rebuild(m.tenant, m.task_id, day, cold)
                decision = await self.view.reserve(*args, provider=provider, step=step)
        except redis_errors() as exc:
            self.redis.down(exc)  # not ready until the probe reaches it again; the caller retries
            raise
        if decision.open is not None:
            until, failed, calls = decision.open
            return deny("provider_breaker", (
                f"provider {m.provider}/{m.model} circuit open for {max(0.0, until - time.time()):.0f} s more: "
                f"{failed} of {calls} calls failed in the last {self.settings.budget_provider_window_s:g} s"
            ))  # fmt: skip
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
                step=m.step_id,
                share=share or 0.0,
                slim_t=step[1],
                slim_c=step[2],
            )
            return deny(decision.code, text)
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

    async def _rebuild(self, tenant: str, task_id: str, day: str, cold: Cold) -> None:
        """Initialise the missing Redis view (a new day, a task from before this view began, a
        Redis that lost its data) from the usage stream, which is the record of spend: each
        record's checkpoint and the messages after it, and from the reservations bucket's
        outstanding calls (those whose usage is not in the stream)."""
        assert self.durable is not None
        nc, verifier = self.mesh.nc, self.mesh.verifier
        horizon = self.horizon
        # A hold counts until its expiry is behind the horizon: only those granted since
        # ``horizon - ttl`` can (the leeway covers clocks; no horizon yet: all of them).
        since = horizon - self.settings.budget_reservation_ttl_s - CLOCK_LEEWAY_S if horizon else 0.0
        task_usage: TaskUsage | None = None
        task_held: list[Held] = []
        if cold.task:
            task_usage, _ = await st.load(self.kv, TaskUsage.key(tenant, task_id), TaskUsage)
            task_usage = task_usage or TaskUsage(tenant=tenant, task_id=task_id)
            subject = f"usage.*.{tenant}.{task_id}.*"
            for seq, _, m in await read_usage(nc, verifier, subject, seq=task_usage.through + 1):
                if m.call_id not in task_usage.call_seqs and m.call_id not in task_usage.call_ids:
                    add_call(task_usage, m, seq, task_usage.labels)
            held = await self.durable.granted_since(nc, since, tenant, task_id)
            task_held = [h for h in held if h.expires_at >= horizon]  # init leaves out the settled ones
        day_usage, _ = await st.load(self.kv, DayUsage.key(tenant, day), DayUsage)
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
            held = await self.durable.granted_since(nc, since, tenant)
            held = [h for h in held if h.expires_at >= horizon and h.day == day]
            if held:  # settled: its usage is in the stream, stored since the oldest was granted
                oldest = min(h.expires_at for h in held) - self.settings.budget_reservation_ttl_s - CLOCK_LEEWAY_S
                settled = {
                    x for _, _, m in await read_usage(nc, verifier, tenant_usage, since=oldest)
                    for x in (m.call_id, m.reservation_id) if x
                }  # fmt: skip
                held = [h for h in held if h.call_id not in settled]
            day_held = held
        await self.view.init(task_usage, day_usage, tenant, task_id, task_held, day_held)
        if task_held or day_held:
            self.mesh.count("mesh.budget.reservations_rebuilt")
            log.info("%s/%s: view rebuilt with %d task and %d tenant-day reservations held", tenant, task_id,
                     len(task_held), len(day_held))  # fmt: skip

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
        _keep(self._provider_reported, key, None)
        r = self.settings
        reason = (f"provider {m.provider}/{m.model} failing: {s.failed} of {s.calls} calls in "
                  f"{r.budget_provider_window_s:g} s; circuit open for {r.budget_provider_cooldown_s:g} s")  # fmt: skip
        await self._act(Trip("provider_breaker", m.tenant, m.task_id, reason, action="flag", closed_at=at))

    async def _started(self, tenant: str, task_id: str) -> StatusRecord | None:
        """The task's status record as the planner wrote it when the task started. A direct get
        first (any replica answers); if that has no record with limits, the stream's leader, which
        holds every write acknowledged so far, the planner's included: it wrote the record before
        the model call whose reservation asks. A replica that just rejoined its cluster answers a
        direct get without it for as long as it takes to catch up; the cluster chaos test lost a
        task to that ('unknown task') in two loaded runs, the second time past 3 s of re-reads."""
        rec = await records.task_status(self.status, tenant, task_id)
        if rec is not None and rec.limits is not None:
            return rec
        key = TaskRecord.key(tenant, task_id)  # (the status record's key is the task record's)
        for wait in UNKNOWN_REREADS_S:
            if wait:
                await asyncio.sleep(wait)
            try:
                rec = await st.from_leader(self.mesh.nc, StatusRecord.bucket, key, StatusRecord)
            except (nats.errors.Error, TimeoutError) as exc:  # no leader for a moment: ask again
                log.info("status record %s: leader read failed (%s); again", key, exc)
                continue
            if rec is not None and rec.limits is not None:
                return rec
        return rec

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
        return _keep(self._label_cache, key, dict(rec.labels))

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
