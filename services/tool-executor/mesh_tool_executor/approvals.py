"""Durable human approvals: a tool call that needs a person waits in the ``approvals`` bucket.

The wait is a record, not a coroutine: the ``tool.requested`` message is acknowledged once
the record exists, so a restart (or a different replica) loses nothing. The record moves
``pending -> approved | denied | expired | void`` by compare-and-set, so one decision wins even
if a decision, the timeout and the task's end race, and ``done`` marks that the outcome has been
acted on (the tool ran under the ledger, or the refusal was sent), so a crash between the two is
repaired by whichever delivery or sweep comes next.

**An approval is void once its task has ended** (completed, failed, cancelled): a decision that
comes later is recorded, as void, and performs nothing. An approved call is performed only after
``started`` is set on its record, and a record becomes void only while ``started`` is not set:
both by compare-and-set on the one record, so an approval racing its task's end is either
performed (it was started while the task still ran) or void, never performed after being
recorded void. ``started`` is set right after a read of the task that found it running; the
ledger keeps the effect once however often a started call is settled again.

Every replica follows the bucket (direct gets, no consumer), expires overdue records and voids
the waits of tasks that have ended (``ended``, from the guard's view of the ``status`` bucket:
so nothing that can no longer be performed is listed as waiting for a person); the
compare-and-set makes sure only one of them acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict

from mesh_contracts.stored import APPROVAL_RECORD, Sealable
from mesh_contracts.v1 import ToolRequested
from mesh_durable.tail import Stored, Tail
from mesh_kit import state as st

log = logging.getLogger("mesh.tool-executor.approvals")
BUCKET = "approvals"

REPAIR_GRACE_S = 30.0
"""A decided approval whose outcome nobody has acted on after this long is acted on by the sweep."""

VOID_SWEEP_S = 1.0
"""How often the waits are checked against their tasks' ends (from memory: the guard's view)."""

ENDED_BY = "policy:task-ended"
"""``decided_by`` of a wait voided because its task ended before anyone decided."""

Status = Literal["pending", "approved", "denied", "expired", "void"]
Decided = Literal["", "approved", "denied"]

Ended = Callable[[str, str], Awaitable[str | None]]
"""(tenant, task id) -> why the task can no longer have a call performed (``task ended
(cancelled)``), or None while it may."""


def approval_id(tenant: str, task_id: str, call_id: str) -> str:
    """Deterministic (a redelivered request finds its own record) and opaque (it reveals
    neither tenant nor task to whoever sees the id)."""
    return "ap-" + hashlib.sha256(f"{tenant}.{task_id}.{call_id}".encode()).hexdigest()[:20]


class ApprovalRecord(Sealable):
    """The ``approvals`` bucket's value, key: the approval id. The call it holds (its arguments)
    and the person's comment are the tenant's content, sealed at rest (``mesh_contracts.sealing``)."""

    model_config = ConfigDict(extra="allow")
    sealed: ClassVar[tuple[str, ...]] = ("request", "comment")
    seal_name: ClassVar[str] = APPROVAL_RECORD

    approval_id: str
    tenant: str
    task_id: str
    step_id: str
    call_id: str
    tool: str
    request: ToolRequested
    reasons: list[str] = []
    status: Status = "pending"
    requested_at: float = 0.0
    deadline: float = 0.0
    decided_by: str = ""
    comment: str = ""
    decided_at: float = 0.0
    done: bool = False
    void: str = ""
    """Why the approval is void (``task ended (cancelled)``); set with status ``void``."""
    decided: Decided = ""
    """What the person decided when the decision came too late to count (status ``void``)."""
    started: bool = False
    """An approved call's effect was committed to (its task still ran): it is performed, under
    the ledger, and the record can no longer become void."""


class Approvals:
    """The approvals bucket, and the expiry of overdue waits."""

    def __init__(
        self,
        kv: Any,
        on_settled: Callable[[ApprovalRecord], Awaitable[None]],
        *,
        nc: Any = None,
        ended: Ended | None = None,
    ) -> None:
        self.kv = kv
        self.nc = nc
        self.on_settled = on_settled
        self.ended = ended
        self._deadlines: dict[str, float] = {}
        self._waiting: dict[str, tuple[str, str]] = {}  # pending approval id -> (tenant, task id)
        self._tasks: list[asyncio.Task[None]] = []

    async def get(self, aid: str) -> ApprovalRecord | None:
        rec, _ = await st.load(self.kv, aid, ApprovalRecord)
        return rec

    async def open(self, rec: ApprovalRecord) -> tuple[ApprovalRecord, bool]:
        """Create the record unless it exists; returns (the stored record, created)."""

        def create(cur: ApprovalRecord | None) -> ApprovalRecord | None:
            return rec if cur is None else None

        stored, created = await st.update(self.kv, rec.approval_id, ApprovalRecord, create)
        assert stored is not None
        if stored.status == "pending":
            self._deadlines[stored.approval_id] = stored.deadline
            self._waiting[stored.approval_id] = (stored.tenant, stored.task_id)
        return stored, created

    async def decide(
        self, aid: str, status: Status, by: str, comment: str = "", *, void: str = "", decided: Decided = ""
    ) -> tuple[ApprovalRecord | None, bool]:
        """Move a pending record to ``status``; (record, changed). A decided record is left as it
        is. ``void`` (with status ``void``): why, and ``decided``: what the person decided, if anyone."""

        def apply(cur: ApprovalRecord | None) -> ApprovalRecord | None:
            if cur is None or cur.status != "pending":
                return None
            cur.status, cur.decided_by, cur.comment, cur.decided_at = status, by, comment[:500], time.time()
            if status == "void":
                cur.void, cur.decided = void[:300], decided
            return cur

        rec, changed = await st.update(self.kv, aid, ApprovalRecord, apply)
        if rec is None or rec.status != "pending":  # decided, or gone (nothing left to wait for)
            self._deadlines.pop(aid, None)
            self._waiting.pop(aid, None)
        return rec, changed

    async def commit(self, aid: str, void: str | None) -> ApprovalRecord | None:
        """An approved record's last step before its effect: ``started`` (``void`` None: the task
        still runs) or ``void`` (why: the task ended). A record already started stays started
        (someone committed to it first: it is performed), one already void stays void. Returns
        the record as stored."""

        def apply(cur: ApprovalRecord | None) -> ApprovalRecord | None:
            if cur is None or cur.status != "approved" or cur.started:
                return None
            if void:
                cur.status, cur.void, cur.decided = "void", void[:300], "approved"
            else:
                cur.started = True
            return cur

        rec, _ = await st.update(self.kv, aid, ApprovalRecord, apply)
        return rec

    async def mark_done(self, aid: str) -> None:
        def apply(cur: ApprovalRecord | None) -> ApprovalRecord | None:
            if cur is None or cur.done:
                return None
            cur.done = True
            return cur

        await st.update(self.kv, aid, ApprovalRecord, apply)

    # --- expiry -------------------------------------------------------------------------------

    def start(self, tick_s: float = 0.5) -> None:
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._expire(tick_s))]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []

    async def _watch(self) -> None:
        """Learn every pending deadline, including those opened by other replicas and those
        opened before this process started: the bucket read in order from its first entry with
        direct gets (no consumer), then followed."""
        if self.nc is None:
            return  # in-memory bucket (unit tests): only this process's records have deadlines
        # Every write of the bucket rings on a core subscription; the tail then reads what changed
        # (and reads anyway after 2 s of silence).
        tail = Tail(self.nc, f"KV_{BUCKET}", self._seen, feed=f"$KV.{BUCKET}.>", poll_s=2.0)
        try:
            await tail.run()
        finally:
            await tail.stop()

    async def _seen(self, entry: Stored) -> None:
        if entry.operation is not None or not entry.data:
            return
        try:
            rec = ApprovalRecord.from_bytes(entry.data, entry.subject.split(".", 2)[2])
        except ValueError:
            return
        if rec.status == "pending":
            self._deadlines[rec.approval_id] = rec.deadline
            self._waiting[rec.approval_id] = (rec.tenant, rec.task_id)
        else:
            self._deadlines.pop(rec.approval_id, None)
            self._waiting.pop(rec.approval_id, None)
            if not rec.done:
                # decided but not acted on: repair it if nobody has within a grace period
                self._deadlines[rec.approval_id] = time.time() + REPAIR_GRACE_S

    async def _expire(self, tick_s: float) -> None:
        swept = 0.0
        while True:
            await asyncio.sleep(tick_s)
            if self.ended is not None and time.monotonic() - swept >= VOID_SWEEP_S:
                swept = time.monotonic()
                await self._void_ended()
            now = time.time()
            for aid, deadline in list(self._deadlines.items()):
                if deadline > now:
                    continue
                self._deadlines.pop(aid, None)
                try:
                    rec, _ = await self.decide(aid, "expired", "policy:timeout", "no decision before the deadline")
                    if rec is not None and not rec.done:
                        await self.on_settled(rec)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retried on the next tick
                    log.warning("approval %s: expiry not applied yet (%s)", aid, exc)
                    self._deadlines[aid] = now + 1.0

    async def _void_ended(self) -> None:
        """Void the waits whose task has ended: a decision could no longer perform them, so they
        must not sit in ``meshctl approvals`` looking actionable until their timeout (and then
        be reported as expired, which is not what happened)."""
        assert self.ended is not None
        for aid, (tenant, task_id) in list(self._waiting.items()):
            try:
                why = await self.ended(tenant, task_id)
                if why is None:
                    continue
                rec, changed = await self.decide(aid, "void", ENDED_BY, void=why)
                if changed and rec is not None and not rec.done:  # the replica whose write won acts
                    await self.on_settled(rec)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - tried again on the next sweep
                log.warning("approval %s: not voided yet (%s)", aid, exc)
