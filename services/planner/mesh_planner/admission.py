"""Admission at the door: per tenant, a ceiling on tasks in flight and on submissions per second.

The planner decides when it takes a submission, before anything is stored about the task: a
tenant over a limit gets ``task.rejected`` at once, with a machine-readable ``code`` and a
``retry_after_s``, and nothing of the task runs. The state is one record per tenant in KV
``admission`` (compare-and-set, so any number of planner replicas share it):

- ``in_flight``: the tasks admitted and not ended. Admitting a task already in it is a no-op (a
  redelivered submission is not counted twice); the planner releases a task when it ends. A
  task whose end was never recorded (a crash between the two writes) stops counting once its
  deadline and a grace have passed: the budget ends every task by its deadline.
- a token bucket (``rate_per_s``, ``burst``) for submissions per second;
- admitted and refused counts. A refusal writes nothing (it is decided on the record as just
  read); the refusals a planner made are added to the record with its next write for the
  tenant (an admission or an end), so ``meshctl status`` may show them a little late.

Run slots (``MESH_RUN_SLOTS``, default 1 and 8 for a tenant alone; 0: off) cap the tasks the
mesh runs at once and share them fairly: an admitted task starts (its plan is made) only while
it holds a slot, and waits for one, queued, otherwise. With ``n`` tenants wanting slots each is
entitled to ``slots // n`` (at least one): a tenant under its share starts at once, even when
the others hold every slot (so the cap may be passed by one task per such tenant until a tenant
over its share ends one); a tenant at or over its share takes a free slot only while no tenant
under its share waits for one. The slots a task holds are ``running`` in its tenant's record,
and every planner replica follows every tenant's record (the bucket's feed), so the count is
mesh-wide. A task waiting for a slot is a submission the planner has not taken up: the budget
counts it queued (queue time, with ``max_queue_s``, not a stall), it is kept alive where it
waits, and a planner that stops hands it back to be taken up elsewhere. Why: on a saturated
machine every task in flight slows every other, so a burst that runs all at once makes a quiet
tenant's task several times slower even when it is always next in every queue (issue 18's
measurements).

A started task that waits only for the world (a workflow's timer, signal, approval or retry
backoff, or its draft plan's reviewer: ``mesh_planner.waits.idle``) is ``idle``: it keeps its
admission (it counts against ``max_in_flight``) but gives its run slot back and does not queue for
one, so a thousand tasks each waiting a day for an approval keep no other task from starting. When
its wait ends it takes a slot again at once, even over the cap (like a tenant under its share): its
work was started and is not queued behind tasks that were not.

A refusal's ``retry_after_s`` comes from how fast the tenant makes room, with jitter
(``mesh_tenancy.retry_after``): each client refused is given its own place in a line on that drain,
so a burst refused together comes back spread over the time the drain needs to take it, not all
at once. Over ``max_in_flight`` the drain is the tenant's tasks ending, about ``n /
mean_task_s`` a second (Little's law; ``n`` its tasks running with run slots on, in flight with
them off; a second per task until one of its tasks has ended); over the rate, the bucket's
refill, never sooner than the next token. Within ``RETRY_FLOOR_S`` and ``RETRY_CEILING_S`` past
the earliest moment anything could pass.

The mesh as a whole refuses new tasks (code ``overloaded``) while one of its streams is filled to
``MESH_STORE_HIGH_WATER`` (90%) of its cap (``StoreLevel``): streams refuse new messages when full
rather than forget old ones, and the last tenth is kept for the tasks already in flight.

Limits come from ``MESH_ADMISSION_MAX_IN_FLIGHT``, ``MESH_ADMISSION_RATE_PER_S`` and
``MESH_ADMISSION_BURST`` (0: no limit), per tenant from ``MESH_ADMISSION_TENANTS`` (JSON:
``{"acme": {"max_in_flight": 200, "rate_per_s": 50, "burst": 100}}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from mesh_contracts import topology as topo
from mesh_contracts.v1.records import AdmissionRecord
from mesh_durable.tail import Reader
from mesh_kit import state as st
from mesh_kit import tasks
from mesh_tenancy.quota import Refusal
from mesh_tenancy.retry_after import RetryLine

log = logging.getLogger("mesh.planner.admission")

GRACE_S = 60.0
"""How long past its deadline an admitted task whose end was never recorded keeps counting."""
WOKEN_S = 30.0
"""How long a waiting task this replica woke for a free slot counts as holding it before the
planner has recorded that it does (its handler normally decides within milliseconds)."""
RECENT_S = 10.0
"""A tenant whose task ended this recently still wants run slots (it sends one task after another,
or one a second): another tenant is not alone (``MESH_RUN_SLOTS_ALONE``) meanwhile."""
RESCAN_S = 10.0
"""How often a replica reads every tenant's record again (a feed message lost in a reconnect)."""
RETRY_FLOOR_S = 0.1
"""The shortest ``retry_after_s`` of a refusal."""
RETRY_CEILING_S = 60.0
"""The longest ``retry_after_s`` of a refusal past the earliest moment it could be admitted (a
client's place further down the line is drawn from the ceiling's second half)."""
UNKNOWN_TASK_SLOT_S = 1.0
"""How often a slot is taken to free up while no task of the tenant has ended yet (its mean
duration unknown)."""


@dataclass(frozen=True)
class Limits:
    max_in_flight: int = 0
    rate_per_s: float = 0.0
    burst: int = 0


@dataclass(frozen=True)
class Wait:
    """Admitted, and waiting for a run slot: ``until()`` returns when this replica sees one free
    for the task's tenant (the task then asks ``admit`` again, which takes it or waits again)."""

    until: Callable[[], Any]


def may_start(
    tenant: str,
    view: Mapping[str, AdmissionRecord],
    slots: int,
    woken: Mapping[str, int] | None = None,
    alone: int = 0,
    now: float | None = None,
) -> bool:
    """Whether ``tenant`` may start one more task now (module docstring: run slots). ``view`` is
    every tenant's record, ``tenant``'s own as just read; ``woken`` counts tasks told a slot is
    theirs that have not yet taken it (they count as running). ``alone``: how many a tenant may
    run while no other tenant has had a task in flight for ``RECENT_S`` (0: ``slots``)."""
    woken = woken or {}
    running = {t: len(r.running) + woken.get(t, 0) for t, r in view.items()}
    waiting = {t: len(r.in_flight) - len(r.running) - len(r.idle) - woken.get(t, 0) for t, r in view.items()}
    active = {t for t in view if running[t] > 0 or waiting[t] > 0} | {tenant}
    if alone > slots:
        at = time.time() if now is None else now
        recent = {t for t, r in view.items() if at - r.last_ended_at < RECENT_S}
        if (active | recent) == {tenant}:
            return running.get(tenant, 0) < alone
    share = max(1, slots // len(active))
    mine = running.get(tenant, 0)
    if mine < share:
        return True
    if sum(running.values()) >= slots:
        return False
    return not any(t != tenant and waiting[t] > 0 and running[t] < share for t in active)


@dataclass
class _Ask:
    """One call of ``Admission.admit``: the task, its tenant's limits and the time, and what the
    latest try of its compare-and-set decided (a try on a newer record decides afresh)."""

    tenant: str
    task_id: str
    deadline_s: float
    lim: Limits
    at: float
    refusal: Refusal | None = None
    drain: tuple[float, float] = (0.0, 0.0)
    """The refusal's: one more admitted every ``[0]`` s, none before ``[1]`` s."""
    waits: bool = False
    """Admitted, and waiting for a run slot."""
    admitted_at: float = 0.0
    """When the task was first admitted: its place in the line for a slot, however often it asks."""


def _drop_lapsed(rec: AdmissionRecord, at: float) -> None:
    """Forget the tasks past their deadline and grace (their end was never recorded), and the run
    slots and idleness of tasks no longer in flight."""
    for old in [t for t, until in rec.in_flight.items() if until < at]:
        del rec.in_flight[old]
    for held in (rec.running, rec.idle):
        for old in [t for t, until in held.items() if until < at or t not in rec.in_flight]:
            del held[old]


def _refill(rec: AdmissionRecord, lim: Limits, at: float) -> None:
    """Add the tokens the tenant's bucket earned since it was last refilled (up to the burst)."""
    if lim.rate_per_s:
        cap = float(max(lim.burst, 1))
        rec.tokens = min(cap, rec.tokens + max(0.0, at - rec.refilled_at) * lim.rate_per_s)
        rec.refilled_at = at


class Admission:
    def __init__(
        self, kv: Any, default: Limits, per_tenant: dict[str, Limits] | None = None, *, slots: int = 0,
        alone: int = 0, line: RetryLine | None = None,
    ) -> None:  # fmt: skip
        self.kv, self.default, self.per_tenant = kv, default, per_tenant or {}
        self.own: Callable[[str], Mapping[str, float]] = lambda _tenant: {}
        """The tenant's own limits from its registry record (``mesh_tenancy.registry``), read live: they
        win over ``per_tenant`` (the settings) and the defaults, key by key."""
        self.slots = slots
        self.alone = alone
        self.line = line or RetryLine(RETRY_FLOOR_S, RETRY_CEILING_S)
        """Refused clients' places on each tenant's drain (``retry_after_s``)."""
        self.view: dict[str, AdmissionRecord] = {}
        """Every tenant's record as last seen (own writes, the bucket's feed, a rescan): run slots."""
        self._revision: dict[str, int] = {}
        self._waiters: dict[str, list[tuple[int, float, int, str, asyncio.Future[None]]]] = {}
        """Per tenant, the tasks waiting here for a slot: highest priority, then first admitted, first.
        A task woken that lost the slot to another replica's waits again in its own place, not
        behind the tasks admitted after it."""
        self._woken: dict[str, dict[str, float]] = {}
        """Per tenant, the tasks told a slot is free (task id -> when) that have not yet asked again."""
        self._order = itertools.count()
        self._sub: Any = None
        self._rescan: asyncio.Task[None] | None = None
        self._nc: Any = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._idle_pending: dict[str, dict[str, bool]] = {}
        """Per tenant, idle changes not yet written (``mark_idle``): task id -> idle."""
        self._idle_writers: dict[str, asyncio.Task[None]] = {}
        self._refused: dict[str, Counter[str]] = {}
        """Refusals not yet in the record: a refusal writes nothing (a burst's refusals would each
        cost a synced write); they are added to the tenant's record with its next write."""

    def _lock(self, tenant: str) -> asyncio.Lock:
        """One write at a time per tenant in this process: a burst's concurrent handlers would
        otherwise collide on the tenant's record and retry their compare-and-sets (other replicas
        still can, and the compare-and-set keeps that correct)."""
        lock = self._locks.get(tenant)
        if lock is None:
            lock = self._locks[tenant] = asyncio.Lock()
        return lock

    def limits(self, tenant: str) -> Limits:
        base = self.per_tenant.get(tenant, self.default)
        own = self.own(tenant)
        if not own:
            return base
        return Limits(
            max_in_flight=int(own.get("max_in_flight", base.max_in_flight)),
            rate_per_s=float(own.get("rate_per_s", base.rate_per_s)),
            burst=int(own.get("burst", base.burst)),
        )

    async def admit(
        self, tenant: str, task_id: str, deadline_s: float, now: float | None = None, priority: int = 5
    ) -> Refusal | Wait | None:
        """Admit the task and let it start (None), admit it to wait for a run slot (``Wait``), or
        say why not (``Refusal``). Idempotent for a task already admitted: asked again, a task
        that waits takes a slot if one is free for it."""
        lim = self.limits(tenant)
        if not lim.max_in_flight and not lim.rate_per_s and not self.slots:
            return None
        ask = _Ask(tenant, task_id, deadline_s, lim, time.time() if now is None else now)
        woken = self._woken.get(tenant)
        if woken is not None:
            woken.pop(task_id, None)  # it asks now: it counts by what the record says
        async with self._lock(tenant):
            await self._write(tenant, lambda rec: self._decide(ask, rec))
            if ask.refusal is not None:
                self._refused.setdefault(tenant, Counter())[ask.refusal.code] += 1
                # the client's own place on the drain (module docstring), once the decision is final
                retry_after_s = self.line.place((tenant, ask.refusal.code), ask.at, *ask.drain)
                ask.refusal = replace(ask.refusal, retry_after_s=retry_after_s)
        if ask.refusal is not None:
            return ask.refusal
        if ask.waits:
            return Wait(lambda: self._wait(tenant, task_id, priority, ask.admitted_at))
        return None

    def _decide(self, ask: _Ask, rec: AdmissionRecord | None) -> AdmissionRecord | None:
        """One try of ``admit``'s compare-and-set, on the tenant's record as just read: the record
        to write (None: nothing changes), the decision left in ``ask``."""
        ask.refusal, ask.waits, ask.admitted_at = None, False, ask.at
        rec = rec or AdmissionRecord(tokens=float(max(ask.lim.burst, 1)), refilled_at=ask.at)
        if ask.task_id in rec.in_flight:  # admitted before (a redelivered submission, or a waiting task)
            ask.admitted_at = rec.in_flight[ask.task_id] - ask.deadline_s - GRACE_S  # as written when admitted
            return self._readmit(ask, rec)
        _drop_lapsed(rec, ask.at)
        _refill(rec, ask.lim, ask.at)
        over = self._over_limit(ask, rec)
        if over is not None:
            ask.refusal, ask.drain = over
            return None  # nothing changes (decided on a value just read: see state.update)
        if ask.lim.rate_per_s:
            rec.tokens -= 1.0
        rec.in_flight[ask.task_id] = ask.at + ask.deadline_s + GRACE_S
        rec.admitted += 1
        ask.waits = not self._take_slot(ask, rec)
        self._add_refused(ask.tenant, rec)
        return rec

    def _readmit(self, ask: _Ask, rec: AdmissionRecord) -> AdmissionRecord | None:
        """A task admitted before: a waiting one takes a run slot if one is free for it now."""
        if not self.slots or ask.task_id in rec.running or ask.task_id in rec.idle:
            return None
        if not self._take_slot(ask, rec):
            ask.waits = True
            return None
        self._add_refused(ask.tenant, rec)
        return rec

    def _take_slot(self, ask: _Ask, rec: AdmissionRecord) -> bool:
        """Take a run slot for the task if one is free for its tenant (True: taken or none needed)."""
        if not self.slots:
            return True
        view = {**self.view, ask.tenant: rec}
        if not may_start(ask.tenant, view, self.slots, self._woken_counts(ask.at), self.alone, ask.at):
            return False
        rec.running[ask.task_id] = rec.in_flight[ask.task_id]
        return True

    def _over_limit(self, ask: _Ask, rec: AdmissionRecord) -> tuple[Refusal, tuple[float, float]] | None:
        """The refusal of a tenant at its ceiling of tasks in flight or out of tokens, and its drain
        (``_Ask.drain``); None when the task may be admitted."""
        lim, tenant = ask.lim, ask.tenant
        if lim.max_in_flight and len(rec.in_flight) >= lim.max_in_flight:
            # One frees up about every mean duration / tasks draining (Little's law). With run
            # slots only the running drain (mean_task_s is a run's: a task's record is made as it
            # starts): a burst queued behind one slot drains one task per mean duration, not
            # one per mean duration / tasks in flight (which told a burst's refused 0.1 s).
            draining = len(rec.running) if self.slots else len(rec.in_flight)
            slot = rec.mean_task_s / max(1, draining) if rec.mean_task_s else UNKNOWN_TASK_SLOT_S
            refusal = Refusal(
                "too_many_in_flight", f"tenant {tenant} has {len(rec.in_flight)} tasks in flight, its limit", 0.0
            )
            return refusal, (slot, 0.0)
        if lim.rate_per_s and rec.tokens < 1.0:
            refusal = Refusal(
                "rate_limited",
                f"tenant {tenant} is over its {lim.rate_per_s:g} submissions per second (burst {lim.burst})",
                0.0,
            )
            return refusal, (1.0 / lim.rate_per_s, (1.0 - rec.tokens) / lim.rate_per_s)  # a token each, the next then
        return None

    def refused(self, tenant: str, code: str) -> None:
        """Count a refusal decided elsewhere (``overloaded``): it reaches the record with the
        tenant's next write, like the others."""
        self._refused.setdefault(tenant, Counter())[code] += 1

    def _add_refused(self, tenant: str, rec: AdmissionRecord) -> None:
        for code, n in self._refused.get(tenant, Counter()).items():
            rec.refused[code] = rec.refused.get(code, 0) + n

    async def _write(self, tenant: str, mutate: Callable[[AdmissionRecord | None], AdmissionRecord | None]) -> None:
        """Compare-and-set the tenant's record (under its lock); a write carried the refusals
        counted so far (``mutate`` added them), so they are no longer pending."""
        rec, changed = await st.update(self.kv, tenant, AdmissionRecord, mutate)
        if changed:
            self._refused.pop(tenant, None)
            if rec is not None and self.slots:
                self._seen(tenant, rec, st.written(self.kv, tenant))

    async def release(self, tenant: str, task_id: str, took_s: float | None) -> None:
        """The task ended: it no longer counts (and its duration, if known, feeds ``retry_after_s``)."""
        lim = self.limits(tenant)
        if not lim.max_in_flight and not lim.rate_per_s and not self.slots:
            return

        def mutate(rec: AdmissionRecord | None) -> AdmissionRecord | None:
            if rec is None or task_id not in rec.in_flight:
                return None
            del rec.in_flight[task_id]
            rec.running.pop(task_id, None)
            rec.idle.pop(task_id, None)
            if took_s is not None:
                rec.mean_task_s = took_s if not rec.mean_task_s else 0.9 * rec.mean_task_s + 0.1 * took_s
            rec.last_ended_at = time.time()
            self._add_refused(tenant, rec)
            return rec

        async with self._lock(tenant):
            await self._write(tenant, mutate)
        woken = self._woken.get(tenant)
        if woken is not None and woken.pop(task_id, None) is not None:
            # Woken for a slot and ended before it took one (cancelled while it waited): the
            # slot it was promised goes to the next waiting task now, not when the promise lapses.
            self._wake()

    def idle_as_seen(self, tenant: str, task_id: str) -> bool:
        """Whether the task is idle (holds no run slot: ``AdmissionRecord.idle``) as this replica
        knows it: a change it has yet to write, else the record as last seen."""
        pending = self._idle_pending.get(tenant, {}).get(task_id)
        if pending is not None:
            return pending
        rec = self.view.get(tenant)
        return rec is not None and task_id in rec.idle

    def mark_idle(self, tenant: str, task_id: str, idle: bool) -> None:
        """A started task now waits only for the world (``idle``: it gives its run slot back), or
        is back at work (it takes its slot again at once, even over the cap: it was started, and
        its work is not queued behind tasks not yet started). Nothing for a task not in flight.

        Not waited for: the changes of a tenant's tasks are written together, one compare-and-set
        for all that came meanwhile, by one writer per tenant, so a burst of wake-ups (200 timers
        due at once) does not make each handler wait its turn on the tenant's record. A change
        lost with the process is repaired by the task's next transition (``Planner.transition``)."""
        if not self.slots:
            return
        self._idle_pending.setdefault(tenant, {})[task_id] = idle
        writer = self._idle_writers.get(tenant)
        if writer is None or writer.done():
            self._idle_writers[tenant] = asyncio.create_task(self._write_idle(tenant), name=f"idle-{tenant}")

    async def idle_written(self, timeout: float | None = None) -> None:
        """Wait until every change marked so far is written (or ``timeout``)."""
        writers = [w for w in self._idle_writers.values() if not w.done()]
        if writers:
            await asyncio.wait(writers, timeout=timeout)

    async def _write_idle(self, tenant: str) -> None:
        while self._idle_pending.get(tenant):
            batch = self._idle_pending.pop(tenant)
            try:
                await self._apply_idle(tenant, batch)
            except Exception as exc:  # noqa: BLE001 - the broker away: each task's next transition repairs it
                log.warning("idle run slots of %s not written (%d tasks): %s", tenant, len(batch), exc)

    async def _apply_idle(self, tenant: str, changes: dict[str, bool]) -> None:
        def mutate(rec: AdmissionRecord | None) -> AdmissionRecord | None:
            if rec is None:
                return None
            changed = False
            for task_id, idle in changes.items():
                if task_id not in rec.in_flight:
                    continue
                src, dst = (rec.running, rec.idle) if idle else (rec.idle, rec.running)
                if task_id in dst and task_id not in src:
                    continue
                dst[task_id] = src.pop(task_id, rec.in_flight[task_id])
                changed = True
            if not changed:
                return None
            self._add_refused(tenant, rec)
            return rec

        async with self._lock(tenant):
            await self._write(tenant, mutate)

    # --- run slots: every tenant's record, followed; tasks waiting here for a slot -------------

    async def follow(self, nc: Any) -> None:
        """Follow every tenant's record (run slots): subscribe to the bucket's feed, then read
        them all (a write stored after the read is fed; one before it is in the read)."""
        if not self.slots:
            return
        self._nc = nc
        self._sub = await nc.subscribe(topo.watch_feed(f"KV_{AdmissionRecord.bucket}"), cb=self._on_feed)
        await nc.flush()
        await self._scan()
        self._rescan = asyncio.create_task(self._rescan_loop(), name="admission-rescan")

    async def close(self) -> None:
        await self.idle_written(timeout=5.0)  # what is pending, before the connection goes (else repaired later)
        if self._rescan is not None:
            await tasks.stop(self._rescan)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for waiters in self._waiters.values():
            for *_, fut in waiters:
                fut.cancel()
        self._waiters.clear()

    async def _scan(self) -> None:
        reader = Reader(self._nc, f"KV_{AdmissionRecord.bucket}")
        try:
            entries = await reader.current(AdmissionRecord.bucket)
        finally:
            await reader.close()
        for tenant, e in entries.items():
            with contextlib.suppress(ValueError):
                self._seen(tenant, AdmissionRecord.model_validate_json(e.data), e.seq)

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(RESCAN_S)
            try:
                await self._scan()
            except Exception as exc:  # noqa: BLE001 - broker away: the feed and the next round
                log.debug("admission records not read again: %s", exc)
            self._wake()  # lapsed wake-ups too

    async def _on_feed(self, msg: Any) -> None:
        headers = msg.headers or {}
        try:
            tenant = headers["Nats-Subject"].removeprefix(f"$KV.{AdmissionRecord.bucket}.")
            seq = int(headers["Nats-Sequence"])
            rec = AdmissionRecord() if headers.get("KV-Operation") else AdmissionRecord.model_validate_json(msg.data)
        except (KeyError, ValueError):
            return
        self._seen(tenant, rec, seq)

    def _seen(self, tenant: str, rec: AdmissionRecord, revision: int) -> None:
        if revision and revision <= self._revision.get(tenant, 0):
            return  # older than what this replica already knows
        self.view[tenant] = rec
        if revision:
            self._revision[tenant] = revision
        self._wake()

    def _woken_counts(self, now: float) -> dict[str, int]:
        out = {}
        for tenant, woken in self._woken.items():
            for task_id in [t for t, at in woken.items() if now - at > WOKEN_S]:
                del woken[task_id]  # its handler never asked again (stopped meanwhile)
            if woken:
                out[tenant] = len(woken)
        return out

    async def _wait(self, tenant: str, task_id: str, priority: int, admitted_at: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        place = (-priority, admitted_at, next(self._order), task_id, fut)
        heapq.heappush(self._waiters.setdefault(tenant, []), place)
        self._wake()
        await fut

    def waiting(self) -> int:
        """Tasks waiting here for a slot."""
        return sum(len(w) for w in self._waiters.values())

    def _wake(self) -> None:
        """Tell waiting tasks a slot is theirs, one at a time, the tenant running fewest first."""
        if not self._waiters:
            return
        now = time.time()
        while True:
            counts = self._woken_counts(now)
            order = sorted(self._waiters, key=lambda t: len(self.view[t].running) if t in self.view else 0)
            for tenant in order:
                q = self._waiters[tenant]
                while q and q[0][-1].done():
                    heapq.heappop(q)  # its handler went away (cancelled)
                if not q:
                    del self._waiters[tenant]
                    continue
                rec = self.view.get(tenant)
                if rec is None or may_start(tenant, self.view, self.slots, counts, self.alone):
                    *_, task_id, fut = heapq.heappop(q)
                    if not q:
                        del self._waiters[tenant]
                    self._woken.setdefault(tenant, {})[task_id] = now
                    fut.set_result(None)
                    break  # counts changed: decide again from the start
            else:
                return


def parse_tenants(raw: dict[str, dict[str, Any]], default: Limits) -> dict[str, Limits]:
    out = {}
    for tenant, values in raw.items():  # keys checked by PlannerSettings
        out[tenant] = Limits(
            max_in_flight=int(values.get("max_in_flight", default.max_in_flight)),
            rate_per_s=float(values.get("rate_per_s", default.rate_per_s)),
            burst=int(values.get("burst", default.burst)),
        )
    return out


class StoreLevel:
    """How full the mesh's capped streams are, read (``STREAM.INFO``, counts only) at most every
    ``every_s``; ``over()`` names the fullest one while it is at or over ``high_water`` of a cap."""

    def __init__(
        self, js: Any, streams: list[str], high_water: float, retry_after_s: float, every_s: float = 1.0
    ) -> None:
        self.js, self.streams, self.high_water = js, streams, high_water
        self.retry_after_s, self.every_s = retry_after_s, every_s
        self.fill: dict[str, float] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def _read(self, stream: str) -> None:
        try:
            info = await self.js.stream_info(stream)
        except Exception as exc:  # noqa: BLE001 - not there (older provisioning) or the broker is away: keep the last
            log.debug("stream info for %s not read: %s", stream, exc)
            return
        cfg, state = info.config, info.state
        fill = 0.0
        if cfg.max_bytes and cfg.max_bytes > 0:
            fill = max(fill, state.bytes / cfg.max_bytes)
        if cfg.max_msgs and cfg.max_msgs > 0:
            fill = max(fill, state.messages / cfg.max_msgs)
        self.fill[stream] = fill

    async def over(self) -> Refusal | None:
        if time.monotonic() - self._read_at >= self.every_s and not self._lock.locked():
            async with self._lock:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await asyncio.gather(*(self._read(s) for s in self.streams))
                self._read_at = time.monotonic()
        if not self.fill:
            return None
        stream, fill = max(self.fill.items(), key=lambda kv: kv[1])
        if fill < self.high_water:
            return None
        return Refusal(
            "overloaded",
            f"the mesh refuses new tasks while a stream is {self.high_water:.0%} full: {stream} is at {fill:.0%} "
            "of its cap (tasks in flight go on)",
            self.retry_after_s,
        )
