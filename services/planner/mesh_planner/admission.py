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
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh_contracts.v1.records import AdmissionRecord
from mesh_kit import state as st

log = logging.getLogger("mesh.planner.admission")

GRACE_S = 60.0
"""How long past its deadline an admitted task whose end was never recorded keeps counting."""


@dataclass(frozen=True)
class Limits:
    max_in_flight: int = 0
    rate_per_s: float = 0.0
    burst: int = 0


@dataclass(frozen=True)
class Refusal:
    code: str
    reason: str
    retry_after_s: float


class Admission:
    def __init__(self, kv: Any, default: Limits, per_tenant: dict[str, Limits] | None = None) -> None:
        self.kv, self.default, self.per_tenant = kv, default, per_tenant or {}
        self._locks: dict[str, asyncio.Lock] = {}
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
        return self.per_tenant.get(tenant, self.default)

    async def admit(self, tenant: str, task_id: str, deadline_s: float, now: float | None = None) -> Refusal | None:
        """Admit the task (None) or say why not. Idempotent for a task already admitted."""
        lim = self.limits(tenant)
        if not lim.max_in_flight and not lim.rate_per_s:
            return None
        at = time.time() if now is None else now
        refusal: Refusal | None = None

        def mutate(rec: AdmissionRecord | None) -> AdmissionRecord | None:
            nonlocal refusal
            refusal = None
            rec = rec or AdmissionRecord(tokens=float(max(lim.burst, 1)), refilled_at=at)
            if task_id in rec.in_flight:
                return None  # admitted before (a redelivered submission)
            for old in [t for t, until in rec.in_flight.items() if until < at]:
                del rec.in_flight[old]
            if lim.rate_per_s:
                cap = float(max(lim.burst, 1))
                rec.tokens = min(cap, rec.tokens + max(0.0, at - rec.refilled_at) * lim.rate_per_s)
                rec.refilled_at = at
            if lim.max_in_flight and len(rec.in_flight) >= lim.max_in_flight:
                # one slot frees up about every mean duration / tasks in flight
                wait = rec.mean_task_s / max(1, len(rec.in_flight)) if rec.mean_task_s else 1.0
                refusal = Refusal(
                    "too_many_in_flight",
                    f"tenant {tenant} has {len(rec.in_flight)} tasks in flight, its limit",
                    round(min(60.0, max(0.1, wait)), 2),
                )
            elif lim.rate_per_s and rec.tokens < 1.0:
                refusal = Refusal(
                    "rate_limited",
                    f"tenant {tenant} is over its {lim.rate_per_s:g} submissions per second (burst {lim.burst})",
                    round(max(0.05, (1.0 - rec.tokens) / lim.rate_per_s), 2),
                )
            if refusal is not None:
                return None  # nothing changes (decided on a value just read: see state.update)
            if lim.rate_per_s:
                rec.tokens -= 1.0
            rec.in_flight[task_id] = at + deadline_s + GRACE_S
            rec.admitted += 1
            self._add_refused(tenant, rec)
            return rec

        async with self._lock(tenant):
            await self._write(tenant, mutate)
            if refusal is not None:
                self._refused.setdefault(tenant, Counter())[refusal.code] += 1
        return refusal

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
        _, changed = await st.update(self.kv, tenant, AdmissionRecord, mutate)
        if changed:
            self._refused.pop(tenant, None)

    async def release(self, tenant: str, task_id: str, took_s: float | None) -> None:
        """The task ended: it no longer counts (and its duration, if known, feeds ``retry_after_s``)."""
        lim = self.limits(tenant)
        if not lim.max_in_flight and not lim.rate_per_s:
            return

        def mutate(rec: AdmissionRecord | None) -> AdmissionRecord | None:
            if rec is None or task_id not in rec.in_flight:
                return None
            del rec.in_flight[task_id]
            if took_s is not None:
                rec.mean_task_s = took_s if not rec.mean_task_s else 0.9 * rec.mean_task_s + 0.1 * took_s
            self._add_refused(tenant, rec)
            return rec

        async with self._lock(tenant):
            await self._write(tenant, mutate)


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
